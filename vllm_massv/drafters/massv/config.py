"""The `massv` block of a MASSV drafter's `config.json`, and the checks that run before serving.

A MASSV drafter checkpoint is an HF-style directory whose `config.json` is the text LM's own config
(e.g. `model_type: "qwen2"`) with `architectures: ["MassvQwen2ForCausalLM"]` and one extra block,
`"massv": {...}`, described by :class:`MassvConfig`. The block makes the checkpoint describe itself:
serving (the plugin) and training (`vllm_massv.training`) read the same fields.

All checks raise :class:`MassvConfigError` (a `ValueError`) whose message names the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from vllm_massv import methods
from vllm_massv.checkpoint import DrafterBlock, DrafterConfigError, archs, checkpoint_header
from vllm_massv.rope import has_mrope

MASSV_CONFIG_KEY = "massv"
#: Weight-name prefix of the projector in a drafter checkpoint (`mm_projector.linear_1.weight`).
PROJECTOR_PREFIX = "mm_projector"
ProjectorKind = Literal["mlp2x_gelu", "linear", "identity", "none"]
#: Projectors with trained weights (the others: `identity` passes widths through, `none` has none).
TRAINED_PROJECTORS = ("mlp2x_gelu", "linear")
PositionScheme = Literal["1d", "mrope"]
FeatureTap = Literal["post_merger", "post_merger_deepstack"]


class MassvConfigError(DrafterConfigError):
    """A MASSV drafter checkpoint or its pairing with a target is invalid."""


class MassvConfig(DrafterBlock):
    """What serving and training need to know about a MASSV drafter (MASSV, arXiv 2505.10526 §3).

    Serialized as the `massv` block of the drafter's `config.json`.
    """

    block_key: ClassVar[str] = MASSV_CONFIG_KEY
    error: ClassVar[type[ValueError]] = MassvConfigError
    drafter_kind: ClassVar[str] = "a MASSV drafter"
    create_hint: ClassVar[str] = "massv init --target TARGET --draft-lm LM --out DIR"

    format_version: int = Field(1, description="Version of this block's schema.")
    vision_feature_dim: int = Field(
        ..., gt=0,
        description="Width of the target's image embeddings fed to the projector: the post-merger "
        "vision output that vLLM caches (Qwen2.5-VL: vision_config.out_hidden_size, 3584 for 7B; "
        "Qwen3-VL with feature_tap 'post_merger_deepstack': out_hidden_size * (1 + L)).",
    )
    projector: ProjectorKind = Field(
        "mlp2x_gelu",
        description="Projector from target image embeddings to drafter embeddings: 'mlp2x_gelu' "
        "(Linear-GELU-Linear, LLaVA-1.5 style), 'linear', 'identity' (dims must match) or 'none' "
        "(text-only drafter: image placeholders keep their token embedding).",
    )
    projector_hidden_size: int | None = Field(
        None, gt=0, description="Hidden width of 'mlp2x_gelu' (default: the drafter hidden size)."
    )
    orig_vocab_size: int = Field(
        ..., gt=0,
        description="Vocabulary size of the base text LM before padding to the target's size. "
        "Logits of padded rows are -inf, so they are never proposed.",
    )
    image_token_id: int = Field(..., ge=0, description="The target's image placeholder token id.")
    video_token_id: int | None = Field(None, ge=0, description="The target's video placeholder id.")
    positions: PositionScheme = Field(
        "1d",
        description="Drafter RoPE positions: '1d' = absolute token index over the whole sequence "
        "(image placeholders included; what a text LM was trained with) or 'mrope' = the target's "
        "own M-RoPE positions (needs an M-RoPE LM, e.g. the target's language model).",
    )
    target: str = Field("", description="Name or path of the target VLM the drafter was built for.")
    target_architecture: str = Field("", description="The target's architecture class name.")
    feature_tap: FeatureTap = Field(
        "post_merger",
        description="Which of the image embeddings vLLM caches the projector consumes: "
        "'post_merger' = the main (post-merger) embedding, out_hidden_size wide (every target); "
        "'post_merger_deepstack' = Qwen3-VL's whole cached row, the main embedding followed by "
        "its L DeepStack levels (out_hidden_size * (1 + L) wide; vLLM "
        "`models/qwen3_vl.py::Qwen3_VisionTransformer.forward`; `massv init`'s default for "
        "trained projectors on DeepStack targets, chosen by testbed tau). Only cached outputs "
        "can be tapped: vLLM keeps no other vision-tower state.",
    )

    deepstack: bool = Field(
        False,
        description="Qwen3-VL targets: also add the target's DeepStack levels (the columns after "
        "the main block of each cached image embedding) to the drafter's hidden states after "
        "its first L decoder layers at the image positions, as the target does (vLLM "
        "`models/qwen3_vl.py::Qwen3LLMModel.forward`). Needs projector 'identity' (the levels are "
        "in the target's hidden width; a trained per-level projector is future work). Written to "
        "config.json only when true.",
    )

    @model_validator(mode="after")
    def _deepstack_needs_identity(self) -> MassvConfig:
        if self.feature_tap != "post_merger" and self.projector not in TRAINED_PROJECTORS:
            raise ValueError(
                f"feature_tap {self.feature_tap!r} needs a trained projector ('mlp2x_gelu' or "
                f"'linear'), not {self.projector!r}")
        if self.deepstack and self.projector != "identity":
            raise ValueError(
                f"deepstack: true needs projector 'identity' (got {self.projector!r}): the "
                "DeepStack levels are added unprojected, in the target's hidden width; a trained "
                "per-level projector is not implemented. Set deepstack to false.")
        return self

    @property
    def uses_projector(self) -> bool:
        """False for a text-only (`projector: none`) drafter."""
        return self.projector != "none"

    def to_json_dict(self) -> dict[str, Any]:
        """The block as written to config.json; `deepstack` only when true (drafters without it
        keep the exact config.json they had before the field existed)."""
        out = super().to_json_dict()
        if not self.deepstack:
            out.pop("deepstack")
        return out


#: Why a `positions: mrope` MASSV drafter is refused on vLLM's Model Runner V2 (before serving,
#: `vllm_massv/patches/engine_config.py`).
MRV2_MROPE_REFUSAL = (
    "MASSV drafters with massv.positions='mrope' run on vLLM's V1 model runner only: Model "
    "Runner V2 gives drafters 1-D positions (the target's M-RoPE positions stay in its rope "
    "state, vllm/v1/worker/gpu/mm/rope.py). Serve a `positions: 1d` drafter (`massv init` "
    "writes 1-D drafters by default), or, on vLLM 0.32/0.33, the V1 runner (unset "
    "VLLM_USE_V2_MODEL_RUNNER: the plugin then picks V1 for this drafter).")


def is_massv_hf_config(hf_config: Any) -> bool:
    """True when a drafter's HF config names a MASSV architecture."""
    names = getattr(hf_config, "architectures", None) or []
    return any(a in methods.METHODS["massv"].vllm_architectures for a in names)


def target_image_embedding_dim(target_hf_config: Any, feature_tap: str = "post_merger") -> int:
    """Width of the image embeddings a MASSV projector reads from what vLLM caches for a target.

    Qwen2-VL / Qwen2.5-VL: `vision_config.out_hidden_size` (post-merger; vLLM
    `models/qwen2_5_vl.py::embed_multimodal`). Qwen3-VL: the same, the *main* embedding's width,
    for `feature_tap` 'post_merger'; vLLM caches `out_hidden_size * (1 + L)` columns per image
    token, L = `len(deepstack_visual_indexes)` (`models/qwen3_vl.py`), all of which
    'post_merger_deepstack' reads (`vllm_model.py::MassvQwen3ForCausalLM` slices the rest
    off otherwise). Others: the text hidden size (the VLM's own multimodal projector maps into
    it, e.g. Gemma3).

    Raises:
        MassvConfigError: the target has no vision tower (a text-only model), or
            'post_merger_deepstack' on a target without DeepStack levels.
    """
    vision = getattr(target_hf_config, "vision_config", None)
    if vision is None:
        raise MassvConfigError(
            f"the target ({archs(target_hf_config)}) is a text-only model: MASSV drafts for "
            "vision-language targets. For a text-only target use a plain draft model "
            "(`method: draft_model` with a stock architecture) instead of a MASSV drafter.")
    out = getattr(vision, "out_hidden_size", None)
    width = int(out if out is not None else target_hf_config.get_text_config().hidden_size)
    if feature_tap == "post_merger":
        return width
    levels = deepstack_levels(target_hf_config)
    if not levels:
        raise MassvConfigError(
            f"feature_tap {feature_tap!r} reads DeepStack levels, which the target "
            f"({archs(target_hf_config)}) does not have (Qwen3-VL targets do); use "
            "'post_merger' (massv init --feature-tap post_merger).")
    return width * (1 + levels)


#: The MASSV drafter that reads a DeepStack target's cached image embeddings (Qwen3-VL).
DEEPSTACK_DRAFTER = "MassvQwen3ForCausalLM"


def deepstack_levels(target_hf_config: Any) -> int:
    """How many DeepStack levels a target's cached image embeddings carry after the main block:
    `len(vision_config.deepstack_visual_indexes)` (Qwen3-VL; vLLM `models/qwen3_vl.py` caches
    [n, out_hidden_size * (1 + levels)]), 0 for targets without DeepStack."""
    vision = getattr(target_hf_config, "vision_config", None)
    return len(getattr(vision, "deepstack_visual_indexes", None) or [])


def target_token_ids(target_hf_config: Any) -> tuple[int, int | None]:
    """(image_token_id, video_token_id) of a target VLM config."""
    image = getattr(target_hf_config, "image_token_id", None)
    if image is None:
        image = getattr(target_hf_config, "image_token_index", None)
    if image is None:
        raise MassvConfigError(
            f"the target ({archs(target_hf_config)}) declares no image_token_id; "
            "MASSV needs a vision-language target.")
    return int(image), getattr(target_hf_config, "video_token_id", None)


def validate_pair(draft_hf_config: Any, target_hf_config: Any, *, target_vocab_size: int,
                  draft_vocab_size: int) -> MassvConfig:
    """Check that a MASSV drafter can serve a target. Runs before the engine starts.

    Checks, in order: the `massv` block; the target is a VLM; projector input width == the
    target's image-embedding width (and, for `identity`, == the drafter's hidden size);
    vocabularies reconcile; image/video token ids agree; the position scheme matches the
    drafter's RoPE config.

    Returns:
        The parsed :class:`MassvConfig`.
    Raises:
        MassvConfigError: with a message that names the fix.
    """
    cfg = MassvConfig.from_hf_config(draft_hf_config)
    feat_dim = target_image_embedding_dim(target_hf_config, cfg.feature_tap)
    image_id, video_id = target_token_ids(target_hf_config)
    if cfg.uses_projector and cfg.vision_feature_dim != feat_dim:
        raise MassvConfigError(
            f"projector input dim {cfg.vision_feature_dim} != the target's image-embedding dim "
            f"{feat_dim} ({archs(target_hf_config)}). The drafter was built for another target "
            f"({cfg.target or 'unknown'}); rebuild it with `massv init --target <this target>` "
            "and retrain the projector.")
    levels = deepstack_levels(target_hf_config)
    main = target_image_embedding_dim(target_hf_config)
    if cfg.uses_projector and levels and DEEPSTACK_DRAFTER not in (
            getattr(draft_hf_config, "architectures", None) or []):
        raise MassvConfigError(
            f"the target ({archs(target_hf_config)}) caches each image token as "
            f"{main} * (1 + {levels}) columns (main embedding + DeepStack levels), which "
            f"only {DEEPSTACK_DRAFTER} reads; this drafter is "
            f"{archs(draft_hf_config)}. Build the drafter with `massv init --target <this "
            "target>` and a Qwen3 text LM.")
    layers = getattr(draft_hf_config, "num_hidden_layers", None)
    if cfg.deepstack and not levels:
        raise MassvConfigError(
            f"massv.deepstack is true but the target ({archs(target_hf_config)}) has no "
            "DeepStack levels (vision_config.deepstack_visual_indexes); set deepstack to false.")
    if cfg.deepstack and layers is not None and layers < levels:
        raise MassvConfigError(
            f"massv.deepstack: the target adds {levels} DeepStack levels after its first "
            f"{levels} decoder layers, but the drafter has {layers} layers; set deepstack to "
            "false.")
    draft_hidden = getattr(draft_hf_config, "hidden_size", None)
    if cfg.projector == "identity" and draft_hidden is not None and draft_hidden != feat_dim:
        raise MassvConfigError(
            f"projector 'identity' needs vision_feature_dim ({feat_dim}) == drafter hidden size "
            f"({draft_hidden}); use 'linear' or 'mlp2x_gelu'.")
    if draft_vocab_size != target_vocab_size:
        hint = ("pad the drafter's vocabulary to the target's with `massv init`"
                if cfg.orig_vocab_size <= target_vocab_size else
                "the drafter's tokenizer is larger than the target's; use a drafter that shares "
                "the target's tokenizer")
        raise MassvConfigError(
            f"vocab sizes cannot be reconciled: drafter vocab_size={draft_vocab_size}, target "
            f"vocab_size={target_vocab_size} (drafter's original vocab {cfg.orig_vocab_size}); "
            f"{hint}.")
    if cfg.orig_vocab_size > draft_vocab_size:
        raise MassvConfigError(
            f"massv.orig_vocab_size={cfg.orig_vocab_size} exceeds vocab_size={draft_vocab_size}; "
            "the checkpoint is corrupt, rebuild it with `massv init`.")
    if cfg.image_token_id != image_id or (
            video_id is not None and cfg.video_token_id is not None
            and cfg.video_token_id != video_id):
        raise MassvConfigError(
            f"image/video token ids differ: drafter has image={cfg.image_token_id} "
            f"video={cfg.video_token_id}, target has image={image_id} video={video_id}. "
            "The drafter must use the target's tokenizer; rebuild it with `massv init` "
            "against this target.")
    draft_mrope = has_mrope(draft_hf_config)
    if cfg.positions == "mrope" and not has_mrope(target_hf_config.get_text_config()):
        raise MassvConfigError(
            f"massv.positions='mrope' but the target ({archs(target_hf_config)}) uses 1-D "
            "positions; set positions to '1d'.")
    if cfg.positions == "mrope" and not draft_mrope:
        raise MassvConfigError(
            "massv.positions='mrope' but the drafter's rope config has no mrope_section; set "
            "positions to '1d' or copy the target's rope parameters (massv init does).")
    if cfg.positions == "mrope" and (_mrope_interleaved(draft_hf_config)
                                     != _mrope_interleaved(target_hf_config.get_text_config())):
        raise MassvConfigError(
            "massv.positions='mrope' but the drafter's mrope_interleaved "
            f"({_mrope_interleaved(draft_hf_config)}) differs from the target's "
            f"({_mrope_interleaved(target_hf_config.get_text_config())}; Qwen3-VL interleaves "
            "the t/h/w frequencies, Qwen2-VL splits them in sections); copy the target's rope "
            "parameters (massv init does).")
    if cfg.positions == "1d" and draft_mrope:
        raise MassvConfigError(
            "massv.positions='1d' but the drafter's rope config has an mrope_section; remove it "
            "or set positions to 'mrope'.")
    return cfg


def _mrope_interleaved(hf_config: Any) -> bool:
    """The `mrope_interleaved` flag of a (text) config's rope parameters (Qwen3-VL: True;
    absent, i.e. False, for Qwen2-VL / Qwen2.5-VL). vLLM `layers/rotary_embedding/__init__.py`
    (`get_rope`) reads the same key."""
    params = getattr(hf_config, "rope_parameters", None)
    if params is None and hasattr(hf_config, "to_dict"):
        params = hf_config.to_dict().get("rope_parameters")
    return bool(isinstance(params, dict) and params.get("mrope_interleaved", False))


def model_basename(name_or_path: str) -> str:
    """A model's name without its organisation or directory, lower-cased, for comparing a hub
    name with a local path: "Qwen/Qwen2.5-VL-7B-Instruct", "/models/Qwen2.5-VL-7B-Instruct/" and
    a hub cache snapshot ".../models--Qwen--Qwen2.5-VL-7B-Instruct/snapshots/<hash>" all give
    "qwen2.5-vl-7b-instruct"."""
    parts = [p for p in str(name_or_path).replace("\\", "/").split("/") if p]
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].split("--")[-1].lower()
    return parts[-1].lower() if parts else ""


def recorded_target_mismatch(block: DrafterBlock, target_hf_config: Any, target_name: str
                             ) -> tuple[Literal["warning", "info"], str] | None:
    """Compare the target a drafter records (`massv`/`msd` block: `target`, `target_architecture`,
    written by `massv init`) with the target it is served with (the two-argument form names the
    target freely). The pairing checks compare widths, vocabularies and token ids, which a
    sibling target of the same width passes (e.g. a drafter trained for Qwen2-VL-7B on
    Qwen2.5-VL-7B): serving stays lossless but acceptance is low.

    Returns:
        ("warning", message) when the recorded architecture is not among the served target's
        architectures; ("info", message) when the architectures agree (or one is not recorded)
        but the model names differ (compared by :func:`model_basename`, so a hub name and a
        local copy of it agree); None when they agree or the drafter records nothing.
    """
    key = block.block_key
    recorded_arch = getattr(block, "target_architecture", "") or ""
    recorded = getattr(block, "target", "") or ""
    served_archs = list(getattr(target_hf_config, "architectures", None) or [])
    what = block.drafter_kind.removeprefix("a ").removeprefix("an ")
    if recorded_arch and served_archs and recorded_arch not in served_archs:
        return ("warning",
                f"this {what} was built for {recorded or 'another target'} "
                f"({recorded_arch}), but the served target {target_name} is a "
                f"{','.join(served_archs)} model. The pairing checks pass (same widths, "
                "vocabulary and image token ids), so the output stays identical to the target "
                "alone, but a drafter trained for another model drafts that model's answers: "
                "expect low acceptance. Serve the drafter's own target, or build and train one "
                f"for this target (`massv init --target {target_name} ...`). If this drafter "
                "was trained for this target, record it in the drafter's config.json "
                f"({key}.target and {key}.target_architecture, and "
                "speculators_config.verifier) to silence this warning.")
    if recorded and target_name and model_basename(recorded) != model_basename(target_name):
        return ("info",
                f"this {what} records its target as {recorded}; serving it with "
                f"{target_name} ({','.join(served_archs) or '?'}). If that is another "
                "checkpoint than the one it was trained for (a fine-tune, another size), "
                "expect lower acceptance.")
    return None


def check_checkpoint_weights(model_dir: str | os.PathLike, cfg: MassvConfig) -> None:
    """Check that a local drafter directory holds the projector weights its config promises.

    Reads only safetensors headers. Remote (hub) names are skipped: vLLM downloads them later and
    the model's `load_weights` repeats the check.

    Raises:
        MassvConfigError: no safetensors files, an unreadable (e.g. truncated) file, or missing
            projector weights.
    """
    header = checkpoint_header(model_dir, MassvConfigError)
    if header is None:
        return
    missing = sorted(n for n in expected_projector_weight_names(cfg) if n not in header)
    if missing:
        raise MassvConfigError(
            f"{Path(model_dir)}: missing projector weights {missing} "
            f"(massv.projector={cfg.projector!r}). Re-export the drafter with `massv init` / `massv train`, or set the projector kind "
            "that matches the weights.")


def expected_projector_weight_names(cfg: MassvConfig) -> list[str]:
    """Checkpoint tensor names the projector of `cfg` needs (empty for identity/none)."""
    names = {
        "mlp2x_gelu": ["linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"],
        "linear": ["linear.weight", "linear.bias"],
    }.get(cfg.projector, [])
    return [f"{PROJECTOR_PREFIX}.{n}" for n in names]
