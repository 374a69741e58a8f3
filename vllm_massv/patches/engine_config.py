"""Engine-config policy for MASSV and MSD drafters, applied while vLLM builds its config (before any
engine process starts): MASSV and MSD run on the model runner vLLM picks (V1 or Model Runner
V2), except `positions: mrope` MASSV drafters, pinned to the V1 runner where one exists and the
user did not ask for V2 (`VllmConfig.use_v2_model_runner`, vLLM 0.32/0.33),
vLLM modes that break these drafters (and what MRV2 does not do for them) are refused, and MASSV
pairs with sliding-window layers get one KV-cache group (`VllmConfig.__post_init__`); the
drafter's pairing and weight checks replace the bare vocab-size check (`SpeculativeConfig.verify_equal_vocab_size_if_draft_model`).
Two warnings, for these drafters only: a drafter whose context is shorter than the target's
(`context_length_warning`; on vLLM 0.32's Model Runner V2 the plugin also lowers max_model_len
to the MASSV drafter's, as vLLM 0.33/0.34 do), and a drafter served with another target than the
one it records (`recorded_target_mismatch`). Why, symbol by symbol: docs/design/vllm-integration.md.
"""

from __future__ import annotations

from typing import Any, Literal

from vllm_massv import envs
from vllm_massv.drafters.massv.config import (MRV2_MROPE_REFUSAL, MassvConfig,
                                              check_checkpoint_weights, recorded_target_mismatch,
                                              validate_pair)
from vllm_massv.drafters.msd import config as msd
from vllm_massv.patches.drafters import draft_is_massv, draft_is_msd
from vllm_massv.patches.hook import patches_class


def _log_once(message: str) -> None:
    from vllm.logger import init_logger  # vLLM is imported by then: this runs inside its config

    init_logger("vllm.massv").info_once(message)


#: Messages `_log` has logged in this process (vLLM validates a `SpeculativeConfig` more than
#: once, and the V1 draft-model proposer validates it again in the worker).
LOGGED: set[str] = set()


def _log(level: Literal["warning", "info"], message: str) -> None:
    """Log on vLLM's "vllm.massv" logger, once per process and message."""
    if message not in LOGGED:
        LOGGED.add(message)
        emit(level, message)


def emit(level: Literal["warning", "info"], message: str) -> None:
    """Write one line on vLLM's "vllm.massv" logger (tests wrap this to read the lines: vLLM
    reconfigures its loggers' handlers while it builds a config)."""
    from vllm.logger import init_logger

    getattr(init_logger("vllm.massv"), level)(message)


@patches_class("VllmConfig")
def apply_engine_policy(cls: type) -> None:
    """`vllm.config.vllm.VllmConfig`: the mode policy, runner checks and the V1 pin of M-RoPE
    MASSV drafters (module docstring). 1-D MASSV drafters and MSD drafters run on whichever
    model runner vLLM picks."""
    stock_runner = getattr(cls, "use_v2_model_runner", None)  # gone in vLLM 0.34 (MRV2 only)
    if stock_runner is not None:

        def use_v2_model_runner(self) -> bool:
            if _is_mrope_massv(self.speculative_config) and not envs.v2_model_runner_requested():
                _log_once("MASSV drafter with positions='mrope': using the V1 model runner "
                          "(Model Runner V2 gives drafters 1-D positions).")
                return False
            return stock_runner.fget(self)

        cls.use_v2_model_runner = property(use_v2_model_runner, doc=stock_runner.__doc__)
    stock_post_init = cls.__post_init__

    def __post_init__(self) -> None:
        massv = draft_is_massv(self.speculative_config)
        msd = not massv and draft_is_msd(self.speculative_config)
        if massv:
            refuse_unsupported_modes(self)
            _single_kv_cache_group_for_massv(self)
        elif msd:
            refuse_unsupported_modes(self, drafter="MSD")
        lengths = _shorter_drafter_context(self) if massv or msd else None
        stock_post_init(self)
        if massv and uses_model_runner_v2(self):
            _refuse_on_model_runner_v2(self)
        if lengths is not None:
            _handle_shorter_drafter_context(self, *lengths, drafter="MASSV" if massv else "MSD")

    cls.__post_init__ = __post_init__


def uses_model_runner_v2(vllm_config: Any) -> bool:
    """Whether vLLM runs this config on Model Runner V2: its own choice on vLLM 0.32/0.33
    (`VllmConfig.use_v2_model_runner`), always on vLLM 0.34 (the V1 runner is gone)."""
    if getattr(type(vllm_config), "use_v2_model_runner", None) is None:
        return True
    return bool(vllm_config.use_v2_model_runner)


ContextOutcome = Literal["v1_skip", "lowered_by_vllm", "lowered_by_plugin", "mrv2_unchecked"]


def context_length_warning(drafter: str, draft_len: int, target_len: int, k: int,
                           outcome: ContextOutcome) -> str:
    """The startup warning for a drafter whose context (`draft_len`, its max_model_len from its
    own config) is shorter than the target's max_model_len (`target_len`), e.g. Qwen2.5-1.5B
    (32768) drafting for Qwen2.5-VL-7B (128000).

    `outcome` is what this engine does about it:
    * "v1_skip": vLLM's V1 runner drafts a step only if the batch's longest sequence + k fits
      in the drafter (`GPUModelRunner._input_fits_in_drafter`,
      vllm/v1/worker/gpu_model_runner.py), otherwise the whole batch runs without drafts;
    * "lowered_by_vllm": vLLM lowered max_model_len to the drafter's (Model Runner V2 on
      0.33/0.34: `VllmConfig._limit_max_model_len_to_draft`);
    * "lowered_by_plugin": Model Runner V2 on vLLM 0.32 has no such check (its speculator feeds
      the drafter positions up to the target's max_model_len, past the drafter's RoPE table), so
      the plugin lowered max_model_len for a MASSV drafter as vLLM 0.33/0.34 do;
    * "mrv2_unchecked": Model Runner V2 without either (an MSD drafter on vLLM 0.32).
    """
    head = (f"{drafter} drafter context is shorter than the target's: the drafter's "
            f"max_model_len is {draft_len}, the target's {target_len}. ")
    consequence = {
        "v1_skip": (
            f"vLLM's V1 runner drafts a step only when the longest sequence in the batch plus "
            f"k = {k} fits in the drafter (GPUModelRunner._input_fits_in_drafter): once any "
            f"request is longer than {draft_len - k} tokens, speculative decoding stops for "
            "every request in its batch until that request finishes (τ = 1; output unchanged). "
            "To keep drafting, serve with "),
        "lowered_by_vllm": (
            f"vLLM lowered the served max_model_len to {draft_len} "
            "(VllmConfig._limit_max_model_len_to_draft): longer requests are refused. "
            "To serve longer contexts, "),
        "lowered_by_plugin": (
            "vLLM 0.32's Model Runner V2 does not check the drafter's length (past it the "
            "drafter would read beyond its RoPE table), so the served max_model_len is lowered "
            f"to {draft_len}, as vLLM 0.33/0.34 do: longer requests are refused. "
            "To serve longer contexts, "),
        "mrv2_unchecked": (
            f"Model Runner V2 feeds the drafter positions up to {target_len}, past its "
            "context (undefined drafts beyond it). Serve with "),
    }[outcome]
    fix = ("give the drafter a longer context if its RoPE allows it: raise "
           "max_position_embeddings in the drafter's config.json, with a RoPE scaling (e.g. "
           "YaRN) that its base LM supports (see the LM's model card).")
    if outcome in ("v1_skip", "mrv2_unchecked"):
        return head + consequence + f"--max-model-len {draft_len} (or less), or " + fix
    return head + consequence + fix


def _shorter_drafter_context(vllm_config: Any) -> tuple[int, int] | None:
    """(drafter's max_model_len, target's) when the drafter's is shorter, before vLLM's
    `__post_init__` (which may lower the target's). None when it is not shorter, or when the
    user set the speculative config's own `max_model_len` (vLLM's knob for a shorter draft
    length: the user asked for it)."""
    spec = vllm_config.speculative_config
    draft = getattr(spec, "draft_model_config", None)
    if draft is None or vllm_config.model_config is None or \
            getattr(spec, "max_model_len", None) is not None:
        return None
    draft_len, target_len = draft.max_model_len, vllm_config.model_config.max_model_len
    if draft_len is None or target_len is None or draft_len >= target_len:
        return None
    return int(draft_len), int(target_len)


def _handle_shorter_drafter_context(vllm_config: Any, draft_len: int, target_len: int,
                                    drafter: Literal["MASSV", "MSD"]) -> None:
    """After vLLM's `__post_init__`: find what this engine does with a drafter context shorter
    than the target's (lowering max_model_len for a MASSV drafter on vLLM 0.32's Model Runner
    V2), and log `context_length_warning` once for this config."""
    model_config = vllm_config.model_config
    if model_config.max_model_len <= draft_len:
        outcome: ContextOutcome = "lowered_by_vllm"
    elif not uses_model_runner_v2(vllm_config):
        outcome = "v1_skip"
    elif drafter == "MASSV":
        model_config.max_model_len = draft_len
        outcome = "lowered_by_plugin"
    else:
        outcome = "mrv2_unchecked"
    k = int(getattr(vllm_config.speculative_config, "num_speculative_tokens", 0) or 0)
    _log("warning", context_length_warning(drafter, draft_len, target_len, k, outcome))


def _is_mrope_massv(speculative_config: Any) -> bool:
    """A MASSV drafter with `positions: mrope` (the target's own M-RoPE; V1 runner only)."""
    return draft_is_massv(speculative_config) and MassvConfig.from_hf_config(
        speculative_config.draft_model_config.hf_config).positions != "1d"


def _refuse_on_model_runner_v2(vllm_config: Any) -> None:
    """Raise (before any engine process starts) for a MASSV drafter Model Runner V2 cannot serve.

    Raises:
        ValueError: a `positions: mrope` MASSV drafter (MRV2 gives drafters 1-D positions).
    """
    if _is_mrope_massv(vllm_config.speculative_config):
        raise ValueError(MRV2_MROPE_REFUSAL)
    _log_once("MASSV drafter on vLLM's Model Runner V2 (image-aware MASSV speculator).")


@patches_class("SpeculativeConfig")
def check_pairing(cls: type) -> None:
    """`vllm.config.speculative.SpeculativeConfig`: MASSV and MSD pairing and weight checks in
    place of the bare vocab-size check."""
    stock = cls.verify_equal_vocab_size_if_draft_model

    def verify_equal_vocab_size_if_draft_model(self) -> None:
        target = self.target_model_config
        if target is not None and draft_is_msd(self):
            cfg = msd.validate(
                self.draft_model_config.hf_config, target.hf_config,
                method=self.method, target_vocab_size=target.get_vocab_size(),
                draft_vocab_size=self.draft_model_config.get_vocab_size())
            msd.check_checkpoint_weights(self.draft_model_config.model,
                                         self.draft_model_config.hf_config, cfg)
        elif target is None or not draft_is_massv(self):
            return stock(self)
        else:
            cfg = validate_pair(
                self.draft_model_config.hf_config, target.hf_config,
                target_vocab_size=target.get_vocab_size(),
                draft_vocab_size=self.draft_model_config.get_vocab_size())
            check_checkpoint_weights(self.draft_model_config.model, cfg)
        mismatch = recorded_target_mismatch(cfg, target.hf_config, str(target.model))
        if mismatch is not None:
            _log(*mismatch)
        return None

    cls.verify_equal_vocab_size_if_draft_model = verify_equal_vocab_size_if_draft_model


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
            * `use_heterogeneous_vocab` (vLLM 0.32/0.33, V1): skips the vocab check, and with
              it the pairing checks; MASSV drafters share the target's token ids;
            * video token pruning (EVS, `--video-pruning-rate` > 0): pruned videos keep only some
              of their placeholder tokens and vLLM caches extra position columns with their
              embeddings (`multimodal/video_prune/evs.py`), which MASSV drafters, built for one embedding per
              placeholder, do not read (a Qwen3-VL request would fail mid-serving);
            * HiSparse attention or watermarking: features of Model Runner V2 only
              (`VllmConfig.use_v2_model_runner` picks MRV2 for them), never tested with these
              drafters.
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
    if massv and getattr(spec, "use_heterogeneous_vocab", False):
        problems.append(
            "use_heterogeneous_vocab: MASSV drafters share the target's token ids (their "
            "vocabulary is padded to the target's). Remove it from the speculative config.")
    if massv and getattr(spec, "disable_padded_drafter_batch", False):
        problems.append(
            "disable_padded_drafter_batch: vLLM's draft_model proposer only supports the "
            "padded drafter batch. Remove it from the speculative config.")
    mm = getattr(getattr(vllm_config, "model_config", None), "multimodal_config", None)
    if massv and mm is not None and (getattr(mm, "video_pruning_rate", None) or 0) > 0:
        problems.append(
            f"video_pruning_rate={mm.video_pruning_rate} (EVS video token pruning): MASSV "
            "drafters take one image/video embedding per placeholder token, and pruned videos "
            "are cached with extra position columns they do not read. Remove "
            "--video-pruning-rate (or set it to 0).")
    v2_only = [name for name, on in (
        ("HiSparse attention", getattr(getattr(vllm_config, "attention_config", None),
                                       "hisparse_config", None) is not None),
        ("watermarking", getattr(vllm_config, "watermark_config", None) is not None)) if on]
    for name in v2_only:
        problems.append(
            f"{name}: not supported with {drafter} drafters (a Model Runner V2 feature, "
            f"untested with {drafter} drafting). Remove it.")
    if problems:
        raise ValueError(f"{drafter} drafter: unsupported vLLM mode(s):\n- "
                         + "\n- ".join(problems))


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
    """Make all draft layers share one KV-cache group (docs/design/vllm-integration.md).

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
        _log_once(
            "MASSV drafter with sliding-window layers: disabling the hybrid KV-cache manager "
            "(draft layers must share one KV-cache group; sliding layers keep their window "
            "but hold KV for the full context).")
        sched.disable_hybrid_kv_cache_manager = True
