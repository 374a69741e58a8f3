"""Projectors: target image embeddings -> drafter input embeddings (MASSV, arXiv 2505.10526 §3.1).

Plain `torch.nn` modules shared by the vLLM drafter (`vllm_model.py`) and the transformers
drafter used for training (`hf_model.py`), so both load the same safetensors names
(`mm_projector.linear_1.weight`, ...). The projector is small and replicated on every
tensor-parallel rank.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm_massv.drafters.massv.config import PROJECTOR_PREFIX, MassvConfig, MassvConfigError

__all__ = ["PROJECTOR_PREFIX", "LinearProjector", "MlpGeluProjector", "build_projector"]


class MlpGeluProjector(nn.Module):
    """`mlp2x_gelu` (LLaVA-1.5): Linear(in, hidden) -> GELU -> Linear(hidden, out)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden_dim, bias=True)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden_dim, out_dim, bias=True)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """[n, in_dim] -> [n, out_dim], same dtype as the weights."""
        return self.linear_2(self.act(self.linear_1(image_embeds)))


class LinearProjector(nn.Module):
    """`linear`: a single Linear(in, out)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=True)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.linear(image_embeds)


def build_projector(cfg: MassvConfig, drafter_hidden_size: int) -> nn.Module | None:
    """The projector a config describes; `None` for a text-only (`projector: none`) drafter.

    Raises:
        MassvConfigError: `identity` with vision_feature_dim != drafter hidden size.
    """
    if cfg.projector == "none":
        return None
    if cfg.projector == "identity":
        if cfg.vision_feature_dim != drafter_hidden_size:
            raise MassvConfigError(
                f"projector 'identity' needs vision_feature_dim ({cfg.vision_feature_dim}) == "
                f"drafter hidden size ({drafter_hidden_size}); use 'linear' or 'mlp2x_gelu'.")
        return nn.Identity()
    if cfg.projector == "linear":
        return LinearProjector(cfg.vision_feature_dim, drafter_hidden_size)
    hidden = cfg.projector_hidden_size or drafter_hidden_size
    return MlpGeluProjector(cfg.vision_feature_dim, hidden, drafter_hidden_size)
