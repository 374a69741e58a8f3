"""Seeded random initialisation shared by the tiny model builders (:mod:`.qwen2_vl`,
:mod:`.gemma3`): transformers' own init under a fixed seed, then larger weights so that the
random models produce varied text."""

from __future__ import annotations

from typing import Any

import torch


def scale_weights(model: torch.nn.Module, factor: float = 4.0) -> None:
    """Multiply every >=2-D weight except the embeddings (token / patch) by ``factor``.

    Random init with ``initializer_range`` 0.02 gives near-uniform logits and flat, repetitive
    greedy output; larger weights make the tiny random models produce varied text.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name:
                param.mul_(factor)


def init_model(
    model_cls: Any, config: Any, seed: int, dtype: torch.dtype, weight_scale: float = 4.0
) -> Any:
    """``model_cls(config)`` initialised by transformers under ``torch.manual_seed(seed)`` in
    fp32, weights scaled by :func:`scale_weights` (unless ``weight_scale`` is 1), then cast to
    ``dtype`` in eval mode (``config.dtype`` set to match, so it is saved)."""
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    if weight_scale != 1.0:
        scale_weights(model, weight_scale)
    model = model.to(dtype).eval()
    model.config.dtype = dtype
    return model
