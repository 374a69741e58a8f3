"""Drafter checkpoint directories, for every method: the self-describing config block base
(:class:`DrafterBlock`), the error base, safetensors headers and weight reading, tokenizer files,
and the weight-name layouts of the VLM checkpoints drafters are built from.

A leaf module: it imports no other part of the package.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

#: The tokenizer / chat-template files a drafter copies from its target.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
                   "chat_template.json", "added_tokens.json")
#: Weight-name prefixes of a VLM's language model, by checkpoint layout, and their text-LM names:
#: transformers >= 4.52 (`model.language_model.*`), Gemma3 hub (`language_model.model.*`).
LM_PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.",
               "language_model.lm_head.": "lm_head."}
#: Vision-side weights of a VLM (Qwen `visual`, Gemma3 `vision_tower` + `multi_modal_projector`).
VISION_PREFIXES = ("model.visual.", "visual.", "model.vision_tower.", "vision_tower.",
                   "model.multi_modal_projector.", "multi_modal_projector.")


class DrafterConfigError(ValueError):
    """A drafter checkpoint (any method) or its pairing with a target is invalid. The message
    names the fix."""


class DrafterBlock(BaseModel):
    """A drafter's self-describing block in its `config.json` (`massv`, `msd`): a pydantic model
    whose `Field(description=...)` is the documentation, serialized under `block_key`. Serving
    (the plugin) and training read the same fields. Subclasses set the class variables."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    block_key: ClassVar[str]
    error: ClassVar[type[DrafterConfigError]]
    drafter_kind: ClassVar[str]  # "a MASSV drafter", for messages
    create_hint: ClassVar[str]   # the command that makes such a drafter

    @classmethod
    def from_hf_config(cls, hf_config: Any):
        """Read the block from a transformers `PretrainedConfig` (vLLM's `EAGLEConfig` copies
        it) or a plain dict.

        Raises:
            cls.error: the block is missing or malformed.
        """
        raw = hf_config.get(cls.block_key) if isinstance(hf_config, dict) else getattr(
            hf_config, cls.block_key, None)
        if raw is None:
            raise cls.error(f"config.json has no '{cls.block_key}' block; this is not "
                            f"{cls.drafter_kind}. Create one with `{cls.create_hint}`.")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise cls.error(f"invalid '{cls.block_key}' block in config.json: {e}") from e

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def archs(hf_config: Any) -> str:
    """A config's architectures as "A,B" (or "?"), for messages."""
    return ",".join(getattr(hf_config, "architectures", None) or ["?"])


def safetensors_header(file: Path) -> dict[str, Any]:
    """A safetensors file's tensor entries (name -> {dtype, shape, data_offsets}), from its JSON
    header, validated against the file size (a truncated file raises).

    Raises:
        DrafterConfigError: the header or the data do not fit the file.
    """
    size = file.stat().st_size
    try:
        with open(file, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length exceeds file size")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
        if 8 + n + end > size:
            raise ValueError(f"data ends at byte {8 + n + end} but file has {size} bytes")
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        raise DrafterConfigError(
            f"{file}: unreadable safetensors file ({e}); it is truncated or corrupt. "
            "Re-download or re-export the drafter.") from e
    return {k: v for k, v in header.items() if k != "__metadata__"}


def checkpoint_header(model_dir: str | os.PathLike, error: type[DrafterConfigError]
                      ) -> dict[str, Any] | None:
    """The union of the safetensors headers of a local drafter directory, for the pre-serving
    weight checks; None for a remote (hub) name (vLLM downloads it later and the model's
    `load_weights` repeats the check).

    Raises:
        error: no safetensors files, or an unreadable (e.g. truncated) one.
    """
    path = Path(model_dir)
    if not path.is_dir():
        return None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise error(f"{path} has no *.safetensors weights; re-export the drafter.")
    header: dict[str, Any] = {}
    for f in files:
        try:
            header |= safetensors_header(f)
        except DrafterConfigError as e:
            raise (e if isinstance(e, error) else error(str(e))) from e
    return header


def read_safetensors_dir(path: Path) -> dict[str, Any]:
    """Every tensor of a directory's `*.safetensors` files (name -> torch.Tensor).

    Raises:
        DrafterConfigError: the directory has no safetensors files.
    """
    from safetensors.torch import load_file  # torch only where weights are read

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise DrafterConfigError(f"{path} has no *.safetensors weights")
    state: dict[str, Any] = {}
    for f in files:
        state.update(load_file(f))
    return state


def language_model_state(vlm_dir: Path) -> dict[str, Any]:
    """The language-model weights of a VLM checkpoint under its text LM's names
    (`model.*`, `lm_head.*`); vision tower and multimodal projector dropped.

    Layouts: transformers >= 4.52 (`model.language_model.*`), the original Qwen2-VL hub layout
    (`model.*`, `visual.*`) and the Gemma3 hub layout (`language_model.model.*`,
    `vision_tower.*`, `multi_modal_projector.*`).
    """
    state = {}
    for name, tensor in read_safetensors_dir(vlm_dir).items():
        if name.startswith(VISION_PREFIXES):
            continue
        prefix = next((p for p in LM_PREFIXES if name.startswith(p)), None)
        if prefix is not None:
            state[LM_PREFIXES[prefix] + name[len(prefix):]] = tensor
        elif name.startswith(("model.", "lm_head.")):
            state[name] = tensor
    return state


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer / chat-template files present in `src` (a drafter uses the target's)."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def local_dir(name_or_path: str | Path) -> Path:
    """A local directory for a model: the path itself, or a hub snapshot (config, tokenizer and
    safetensors files only).

    Raises:
        DrafterConfigError: neither a directory nor a hub name ("org/name").
    """
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).count("/") != 1:
        raise DrafterConfigError(f"{name_or_path} is neither a model directory nor a hub name")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), allow_patterns=[
        "*.json", "*.safetensors", "*.txt", "*.jinja", "tokenizer*"]))


#: Qwen2 config fields copied from a VLM's text config (sanity drafters, MSD heads).
QWEN2_TEXT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "hidden_act",
                     "max_position_embeddings", "rms_norm_eps", "rope_parameters",
                     "attention_dropout", "initializer_range", "bos_token_id", "eos_token_id",
                     "head_dim")


def _text_lm_config(text_cfg: Any, fields: tuple[str, ...], model_type: str) -> dict[str, Any]:
    """A `model_type` text-LM config dict with `fields` (those set) of a VLM's text config (a
    transformers `PretrainedConfig`), its vocab size, tied-embedding flag and dtype; no sliding
    window."""
    src = text_cfg.to_dict()
    cfg = {k: src[k] for k in fields if k in src and src[k] is not None}
    cfg.update(vocab_size=src["vocab_size"], model_type=model_type,
               tie_word_embeddings=bool(src.get("tie_word_embeddings", False)),
               use_sliding_window=False, dtype=src.get("dtype") or src.get("torch_dtype"))
    return cfg


def qwen2_config_from_text_config(text_cfg: Any) -> dict[str, Any]:
    """A Qwen2 config dict with every numeric setting of a VLM's text config (a transformers
    `PretrainedConfig`)."""
    return _text_lm_config(text_cfg, QWEN2_TEXT_FIELDS, "qwen2")


#: Qwen3 config fields copied from a Qwen3-VL text config (sanity drafters): Qwen2's plus the
#: attention bias flag (Qwen3 has per-head q_norm / k_norm and an explicit head_dim).
QWEN3_TEXT_FIELDS = (*QWEN2_TEXT_FIELDS, "attention_bias")


def qwen3_config_from_text_config(text_cfg: Any) -> dict[str, Any]:
    """A Qwen3 config dict with every numeric setting of a Qwen3-VL text config (a transformers
    `Qwen3VLTextConfig`; its rope parameters keep `mrope_section` / `mrope_interleaved`, which
    the caller rewrites for the drafter's position scheme)."""
    return _text_lm_config(text_cfg, QWEN3_TEXT_FIELDS, "qwen3")
