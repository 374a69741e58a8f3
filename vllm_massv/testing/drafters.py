"""Tiny untrained MSD and EAGLE-3 drafters for a tiny target (:func:`.qwen2_vl.build_target`):
``massv init --method msd|eagle3`` with weights scaled so that the random layer's attention and
MLP matter (a drafter whose layer is ~identity would hide position and KV-slot errors)."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file

from vllm_massv.drafters.eagle3.init import init_eagle3_drafter
from vllm_massv.drafters.msd.init import init_msd_drafter


def build_msd_drafter(target_dir: str | Path, out_dir: str | Path, *, decouple: bool = True,
                      seed: int = 0, weight_scale: float = 5.0) -> Path:
    """An untrained MSD drafter for `target_dir` in `out_dir`: `init_msd_drafter`, then every
    2-D weight multiplied by `weight_scale` (std 0.02 * scale). Returns `out_dir` as a Path."""
    out = init_msd_drafter(target_dir, out_dir, decouple=decouple, seed=seed).out_dir
    state = load_file(out / "model.safetensors")
    state = {k: (v * weight_scale if v.dim() == 2 else v).contiguous() for k, v in state.items()}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


def build_eagle3_drafter(target_dir: str | Path, out_dir: str | Path, *, seed: int = 0,
                         weight_scale: float = 5.0, **kwargs) -> Path:
    """An untrained EAGLE-3 head for `target_dir` in `out_dir`: `init_eagle3_drafter(**kwargs)`,
    then every trainable 2-D weight multiplied by `weight_scale` (so the random layer's attention
    matters: position and KV-slot errors change drafts). Returns `out_dir` as a Path."""
    out = init_eagle3_drafter(target_dir, out_dir, seed=seed, **kwargs).out_dir
    state = load_file(out / "model.safetensors")
    state = {k: (v * weight_scale if v.dim() == 2 and k != "lm_head.weight" else v).contiguous()
             for k, v in state.items()}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out
