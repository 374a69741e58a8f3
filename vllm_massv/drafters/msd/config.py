"""The `msd` block of an MSD drafter's `config.json` (:class:`MsdConfig`), and the checks that run
before serving (:func:`validate`, :func:`check_checkpoint_weights`).

All checks raise :class:`MsdConfigError` (a `ValueError`) whose message names the fix. The MSD
architecture and checkpoint layout: docs/design/msd.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from vllm_massv.checkpoint import DrafterBlock, DrafterConfigError, archs, checkpoint_header
from vllm_massv.rope import has_mrope

MSD_CONFIG_KEY = "msd"
#: The vLLM architecture name (`vllm_model.py`); vLLM's `EAGLEConfig` keeps names that
#: already start with "Eagle" (`vllm/transformers_utils/configs/eagle.py`).
MSD_ARCHITECTURE = "EagleMsdQwen2ForCausalLM"
#: Target VLM families an MSD drafter serves (their text model is Qwen2-style).
MSD_TARGET_TYPES = ("qwen2_vl", "qwen2_5_vl")
#: Text-only targets accepted by a drafter with `decouple_visual_tokens: false` (plain EAGLE-1).
MSD_TEXT_TARGET_TYPES = ("qwen2",)


class MsdConfigError(DrafterConfigError):
    """An MSD drafter checkpoint or its pairing with a target is invalid."""


class MsdConfig(DrafterBlock):
    """What serving and training need to know about an MSD drafter.

    Serialized as the `msd` block of the drafter's `config.json`.
    """

    block_key: ClassVar[str] = MSD_CONFIG_KEY
    error: ClassVar[type[ValueError]] = MsdConfigError
    drafter_kind: ClassVar[str] = "an MSD drafter"
    create_hint: ClassVar[str] = "massv init --method msd --target TARGET --out DIR"

    format_version: int = Field(1, ge=1, le=1, description="Version of this block's schema.")
    target: str = Field(
        ..., description="Name or path of the target VLM the drafter was built for.")
    target_architecture: str = Field(..., description="The target's architecture class name.")
    target_hidden_size: int = Field(
        ..., gt=0,
        description="Width of the target's last-layer hidden states f_t (the fc's second input) "
        "and of its image embeddings; equals the drafter's hidden_size.")
    image_token_id: int = Field(..., ge=0, description="The target's image placeholder token id.")
    video_token_id: int | None = Field(None, ge=0, description="The target's video placeholder id.")
    decouple_visual_tokens: bool = Field(
        True,
        description="MSD §3.2: rows whose next token is an image/video placeholder take the "
        "target's image embedding (post-merger, what vLLM caches) as decoder-layer input instead "
        "of fc([embedding; hidden]). False = the plain EAGLE-1-style ablation (fc at every row, "
        "with the image embedding as the row's token embedding).")
    fc_bias: bool = Field(
        True, description="Whether the fc has a bias (as in MSD's released code).")


def is_msd_hf_config(hf_config: Any) -> bool:
    """True when a drafter's HF config names the MSD architecture (with or without vLLM's
    "Eagle" prefix) or carries an `msd` block."""
    archs = getattr(hf_config, "architectures", None) or []
    return any(a in (MSD_ARCHITECTURE, MSD_ARCHITECTURE.removeprefix("Eagle")) for a in archs) \
        or getattr(hf_config, MSD_CONFIG_KEY, None) is not None


def expected_weight_names(num_layers: int, fc_bias: bool) -> list[str]:
    """The tensor names an MSD drafter checkpoint must hold (vLLM and transformers layouts)."""
    names = ["model.fc.weight"] + (["model.fc.bias"] if fc_bias else [])
    for i in range(num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                  p + "self_attn.o_proj.weight", p + "mlp.gate_proj.weight",
                  p + "mlp.up_proj.weight", p + "mlp.down_proj.weight"]
        names += [p + f"self_attn.{n}_proj.{w}" for n in "qkv" for w in ("weight", "bias")]
    return names


def validate(draft_hf_config: Any, target_hf_config: Any, *, method: str,
             target_vocab_size: int, draft_vocab_size: int) -> MsdConfig:
    """Check that an MSD drafter can serve a target. Runs while vLLM builds the
    `SpeculativeConfig` (before any engine process starts; `vllm_massv/patches/engine_config.py`).

    Checks, in order: the method is `eagle`; the `msd` block; the target family (Qwen2-VL /
    Qwen2.5-VL, or a text-only Qwen2 with decoupling off); decoupling needs a multimodal target;
    hidden size == the target's text hidden size == `target_hidden_size` (and == the target's
    image-embedding width when decoupling); vocab sizes agree; image/video token ids agree; no
    M-RoPE in the drafter's rope config (MSD uses 1-D positions).

    Returns:
        The parsed :class:`MsdConfig`.
    Raises:
        MsdConfigError: with a message that names the fix.
    """
    if method != "eagle":
        raise MsdConfigError(
            f"MSD drafters are EAGLE-style heads over the target's hidden states; serve them with "
            f"method 'eagle' (got {method!r}): --speculative-config '{{\"method\": \"eagle\", "
            f"\"model\": DIR, \"num_speculative_tokens\": 3}}'.")
    cfg = MsdConfig.from_hf_config(draft_hf_config)
    target_type = getattr(target_hf_config, "model_type", "?")
    multimodal = getattr(target_hf_config, "vision_config", None) is not None
    if target_type not in MSD_TARGET_TYPES + MSD_TEXT_TARGET_TYPES:
        raise MsdConfigError(
            f"target model_type {target_type!r} ({archs(target_hf_config)}) is not supported: "
            f"MSD drafters (a Qwen2 decoder layer) serve {', '.join(MSD_TARGET_TYPES)} targets.")
    if cfg.decouple_visual_tokens and not multimodal:
        raise MsdConfigError(
            f"msd.decouple_visual_tokens is on but the target ({archs(target_hf_config)}) is "
            "text-only: there are no image embeddings to decouple. Serve a vision-language "
            "target, or set decouple_visual_tokens to false (plain EAGLE-1 head).")
    target_text = target_hf_config.get_text_config()
    target_hidden = int(target_text.hidden_size)
    draft_hidden = int(getattr(draft_hf_config, "hidden_size", -1))
    if draft_hidden != target_hidden or cfg.target_hidden_size != target_hidden:
        raise MsdConfigError(
            f"drafter hidden_size={draft_hidden} (msd.target_hidden_size="
            f"{cfg.target_hidden_size}) != the target's hidden size {target_hidden} "
            f"({archs(target_hf_config)}). The drafter was built for another target "
            f"({cfg.target or 'unknown'}); rebuild it with `massv init --method msd --target "
            "<this target>` and retrain.")
    if multimodal and cfg.decouple_visual_tokens:
        out = getattr(target_hf_config.vision_config, "out_hidden_size", None)
        if out is not None and int(out) != target_hidden:
            raise MsdConfigError(
                f"the target's image embeddings are {out} wide but its hidden size is "
                f"{target_hidden}; decoupled visual tokens need them equal.")
    if draft_vocab_size != target_vocab_size:
        raise MsdConfigError(
            f"drafter vocab_size={draft_vocab_size} != target vocab_size={target_vocab_size}: MSD "
            "reuses the target's embedding and LM head; rebuild with `massv init --method msd`.")
    image_id = getattr(target_hf_config, "image_token_id", None)
    video_id = getattr(target_hf_config, "video_token_id", None)
    if multimodal and (cfg.image_token_id != image_id or (
            video_id is not None and cfg.video_token_id is not None
            and cfg.video_token_id != video_id)):
        raise MsdConfigError(
            f"image/video token ids differ: drafter has image={cfg.image_token_id} "
            f"video={cfg.video_token_id}, target has image={image_id} video={video_id}; rebuild "
            "the drafter with `massv init --method msd` against this target.")
    if has_mrope(draft_hf_config):
        raise MsdConfigError(
            "the MSD drafter's rope config has an mrope_section: MSD uses 1-D RoPE positions "
            "(absolute token index); remove mrope_section from config.json.")
    return cfg


def check_checkpoint_weights(model_dir: str | Path, draft_hf_config: Any, cfg: MsdConfig) -> None:
    """Check that a local MSD drafter directory holds exactly the weights the contract names,
    with the right shapes (fc [H, 2H], bias [H]). Reads only safetensors headers; remote (hub)
    names are skipped (the model's `load_weights` repeats the check).

    Raises:
        MsdConfigError: no or unreadable (truncated) safetensors files, missing weights, a
            wrong fc shape, or an own embedding / LM head / final norm (MSD reuses the
            target's; a checkpoint with them is not in this layout).
    """
    header = checkpoint_header(model_dir, MsdConfigError)
    if header is None:
        return
    path = Path(model_dir)
    num_layers = int(getattr(draft_hf_config, "num_hidden_layers", 1))
    missing = [n for n in expected_weight_names(num_layers, cfg.fc_bias) if n not in header]
    if missing:
        raise MsdConfigError(
            f"{path}: missing MSD weights {missing[:6]}{' ...' if len(missing) > 6 else ''}. "
            "Re-export the drafter with `massv init --method msd` / `massv train`.")
    extra = sorted(n for n in header if n.startswith(("lm_head.", "model.embed_tokens.",
                                                       "model.norm.")))
    if extra:
        raise MsdConfigError(
            f"{path}: unexpected weights {extra}: an MSD drafter reuses the target's embedding "
            "and LM head and has no final norm; drop these tensors.")
    if not cfg.fc_bias and "model.fc.bias" in header:
        raise MsdConfigError(f"{path}: model.fc.bias present but msd.fc_bias is false.")
    h = int(getattr(draft_hf_config, "hidden_size", 0))
    shape = header["model.fc.weight"]["shape"]
    if list(shape) != [h, 2 * h]:
        raise MsdConfigError(
            f"{path}: model.fc.weight has shape {shape}, expected [{h}, {2 * h}] "
            "(input = concat(token embedding, target hidden state)).")
