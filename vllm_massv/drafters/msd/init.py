"""`massv init --method msd`: build an untrained MSD drafter directory from a Qwen2-VL /
Qwen2.5-VL target.

The layout is the MSD checkpoint contract (see `config.py`): `config.json` (a
1-layer Qwen2 text config with the target's text dims, 1-D RoPE, `architectures:
["EagleMsdQwen2ForCausalLM"]`, the `msd` block), `model.safetensors` (`model.fc.{weight,bias}`,
`model.layers.0.*`; no embedding, LM head or final norm: the target's embedding and LM head are
reused, frozen) and the target's tokenizer files. `config.json` also carries a speculators block
(`speculators_model_type: "msd"`, `vllm_massv.speculators`) so `vllm serve DIR` serves the
target. `massv train` trains it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from vllm_massv.checkpoint import copy_tokenizer_files, local_dir, qwen2_config_from_text_config
from vllm_massv.drafters.msd.config import (MSD_ARCHITECTURE, MSD_TARGET_TYPES, MsdConfig,
                                            MsdConfigError, expected_weight_names)
from vllm_massv.rope import rope_parameters_1d
from vllm_massv.speculators import serve_hint, speculators_fields


@dataclass
class MsdInitReport:
    """What `init_msd_drafter` built (printed by the CLI)."""
    out_dir: Path
    msd: MsdConfig
    params: int


def init_msd_drafter(target: str | Path, out: str | Path, *, decouple: bool = True,
                     fc_bias: bool = True, seed: int = 0,
                     num_speculative_tokens: int = 4) -> MsdInitReport:
    """Build an untrained MSD drafter directory at `out` for a Qwen2-VL / Qwen2.5-VL target.

    Weights: Linear weights ~ N(0, initializer_range) (transformers' Qwen2 init), biases 0,
    RMSNorm weights 1, under `torch.manual_seed(seed)`; saved in the target's dtype.

    Args:
        target: the target VLM: a local directory or a hub name.
        out: output directory (created; existing files are overwritten).
        decouple: `msd.decouple_visual_tokens` (False = the EAGLE-1-style ablation).
        fc_bias: whether the fc has a bias (True as released).
        seed: initialization seed.
        num_speculative_tokens: k written to the `speculators_config` block
            (`speculators_model_type: "msd"`), which makes `vllm serve <out>` serve the target
            with this drafter, method `eagle` (`vllm_massv.speculators`).
    Returns:
        A :class:`MsdInitReport`.
    Raises:
        MsdConfigError: a text-only or unsupported target.
        MassvConfigError: num_speculative_tokens < 1.
    """
    from transformers import AutoConfig

    target, out = local_dir(target), Path(out)
    target_cfg = AutoConfig.from_pretrained(target)
    if target_cfg.model_type not in MSD_TARGET_TYPES:
        kind = "text-only" if getattr(target_cfg, "vision_config", None) is None else "unsupported"
        raise MsdConfigError(
            f"target {target} is a {kind} {target_cfg.model_type!r} model; MSD drafters are built "
            f"for {', '.join(MSD_TARGET_TYPES)} targets.")
    text = target_cfg.get_text_config()
    cfg = qwen2_config_from_text_config(text)
    cfg["rope_parameters"] = rope_parameters_1d(cfg)
    cfg["dtype"] = cfg.get("dtype") or str(target_cfg.dtype).removeprefix("torch.")
    hidden = int(cfg["hidden_size"])
    msd = MsdConfig(target=str(target), target_architecture=(target_cfg.architectures or [""])[0],
                    target_hidden_size=hidden, image_token_id=int(target_cfg.image_token_id),
                    video_token_id=getattr(target_cfg, "video_token_id", None),
                    decouple_visual_tokens=decouple, fc_bias=fc_bias)
    cfg.update(architectures=[MSD_ARCHITECTURE], model_type="qwen2", num_hidden_layers=1,
               tie_word_embeddings=False, msd=msd.to_json_dict(),
               **speculators_fields(msd, num_speculative_tokens))
    cfg.pop("max_window_layers", None)

    state = _init_weights(cfg, fc_bias, seed)
    assert sorted(state) == sorted(expected_weight_names(1, fc_bias))
    dtype = getattr(torch, cfg["dtype"]) if isinstance(cfg["dtype"], str) else torch.float32
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    copy_tokenizer_files(target, out)
    return MsdInitReport(out, msd, sum(v.numel() for v in state.values()))


def _init_weights(cfg: dict, fc_bias: bool, seed: int) -> dict[str, torch.Tensor]:
    """Seeded fp32 weights of the contract's tensors (fc + one Qwen2 decoder layer)."""
    h, inter = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    heads, kv = int(cfg["num_attention_heads"]), int(cfg["num_key_value_heads"])
    head_dim = int(cfg.get("head_dim") or h // heads)
    std = float(cfg.get("initializer_range", 0.02))
    gen = torch.Generator().manual_seed(seed)
    shapes = {"model.fc.weight": (h, 2 * h),
              "model.layers.0.self_attn.q_proj.weight": (heads * head_dim, h),
              "model.layers.0.self_attn.k_proj.weight": (kv * head_dim, h),
              "model.layers.0.self_attn.v_proj.weight": (kv * head_dim, h),
              "model.layers.0.self_attn.o_proj.weight": (h, heads * head_dim),
              "model.layers.0.mlp.gate_proj.weight": (inter, h),
              "model.layers.0.mlp.up_proj.weight": (inter, h),
              "model.layers.0.mlp.down_proj.weight": (h, inter)}
    state = {k: torch.randn(s, generator=gen) * std for k, s in shapes.items()}
    if fc_bias:
        state["model.fc.bias"] = torch.zeros(h)
    for n in "qkv":
        state[f"model.layers.0.self_attn.{n}_proj.bias"] = torch.zeros(
            shapes[f"model.layers.0.self_attn.{n}_proj.weight"][0])
    for n in ("input_layernorm", "post_attention_layernorm"):
        state[f"model.layers.0.{n}.weight"] = torch.ones(h)
    return state


def init_from_args(args: argparse.Namespace) -> str:
    """`massv init --method msd`: build the drafter from the CLI's arguments.

    Returns:
        The report the CLI prints.
    Raises:
        MsdConfigError: as :func:`init_msd_drafter`.
    """
    report = init_msd_drafter(args.target, args.out, decouple=not args.no_decouple,
                              seed=args.seed, num_speculative_tokens=args.num_speculative_tokens)
    m = report.msd
    return (f"MSD drafter written to {report.out_dir}\n"
            f"  1 decoder layer + fc, {report.params:,} params, hidden {m.target_hidden_size}, "
            f"decoupled visual tokens {'on' if m.decouple_visual_tokens else 'off'}\n"
            + serve_hint(report.out_dir, m.target, "eagle", args.num_speculative_tokens))
