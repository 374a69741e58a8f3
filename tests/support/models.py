"""The session's tiny models (`TinyModels`, built by the `models` fixture) and helpers that
derive broken or edited copies of them."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from safetensors.torch import load_file, save_file

from vllm_massv import testing as mt
from vllm_massv.drafters.massv.init import init_drafter


@dataclass(frozen=True)
class TinyModels:
    target: Path          # Qwen2.5-VL target (random weights)
    text_lm: Path         # small Qwen2 text LM ("blind" base LM)
    sanity: Path          # target's own LM + identity projector, M-RoPE positions
    sanity_1d: Path       # same, 1-D positions
    sanity_zeroed: Path   # target's own LM, M-RoPE, projector outputs zeros (image features zeroed)
    blind: Path           # text LM + random mlp2x_gelu projector, 1-D positions
    stock: Path           # target's LM as a plain Qwen2ForCausalLM (stock vLLM draft_model)


def build_tiny_models(root: Path) -> TinyModels:
    """Build every model of :class:`TinyModels` under `root` (one directory each)."""
    target = mt.build_target(root / "target")
    text_lm = mt.build_text_lm(root / "text_lm")
    sanity = init_drafter(target, target, root / "sanity", projector="identity").out_dir
    sanity_1d = init_drafter(target, target, root / "sanity_1d", projector="identity",
                             positions="1d").out_dir
    blind = init_drafter(target, text_lm, root / "blind", projector="mlp2x_gelu").out_dir
    return TinyModels(target, text_lm, sanity, sanity_1d,
                      zero_projector(target, root / "sanity_zeroed"), blind,
                      mt.build_stock_drafter(target, root / "stock"))


def zero_projector(src: Path, dst: Path) -> Path:
    """Copy a `linear`-projector drafter with its projector weights zeroed."""
    init_drafter(src, src, dst, projector="linear")
    state = load_file(dst / "model.safetensors")
    for k in state:
        if k.startswith("mm_projector."):
            state[k].zero_()
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def copy_model(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None] | None = None
               ) -> Path:
    """Copy a model directory; `edit` mutates its config.json dict in place."""
    shutil.copytree(src, dst)
    if edit is not None:
        cfg = json.loads((dst / "config.json").read_text())
        edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst
