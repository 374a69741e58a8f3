"""MASSV drafter on a Qwen2 text LM, for transformers (training, reference computations).

The twin of `vllm_massv.models.qwen2.MassvQwen2ForCausalLM`: same `config.json` (a `Qwen2Config`
with a `massv` block), same weight names (`model.*`, `lm_head.*`, `mm_projector.*`), same
computation: token embeddings, with the projected target image embeddings written at the image
placeholder positions, through the Qwen2 LM; logits of padded vocabulary rows are -inf.
Positions are the 1-D token index (`massv.positions == "1d"`), or, for `massv.positions ==
"mrope"`, the target's M-RoPE positions ([3, batch, seq] `position_ids`, see
:func:`mrope_positions`), rotated section by section as Qwen2.5-VL does
(`transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py::apply_multimodal_rotary_pos_emb`, vLLM
`model_executor/layers/rotary_embedding/mrope.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from vllm_massv.hf.base import MassvHFDrafterMixin


def mrope_positions(input_ids: Sequence[int], image_token_id: int,
                    grids: Sequence[tuple[int, int, int]]) -> torch.Tensor:
    """Qwen2-VL M-RoPE positions of one token sequence, as the target computes them.

    Text tokens get (p, p, p) with p counting on from the previous maximum + 1; the n-th run of
    `t*h*w` image placeholders gets (s + t_i, s + h_i, s + w_i) for its `grids[n] = (t, h, w)`
    (in merged-token units; images have t = 1), s being the next free position. Source: vLLM
    `models/qwen2_5_vl.py::get_mrope_input_positions`, transformers `get_rope_index`.

    Args:
        input_ids: the sequence (prompt + response), image placeholders expanded.
        image_token_id: the `<|image_pad|>` id.
        grids: one (t, h, w) per image, in order.
    Returns:
        [3, len(input_ids)] int64.
    Raises:
        ValueError: the placeholder runs do not match `grids`.
    """
    ids = list(input_ids)
    out = torch.empty(3, len(ids), dtype=torch.long)
    i = nxt = 0
    grid_iter = iter(grids)
    while i < len(ids):
        if ids[i] != image_token_id:
            out[:, i] = nxt
            i, nxt = i + 1, nxt + 1
            continue
        try:
            t, h, w = next(grid_iter)
        except StopIteration:
            raise ValueError("more image placeholder runs than image grids") from None
        n = t * h * w
        if ids[i:i + n] != [image_token_id] * n:
            raise ValueError(f"image placeholder run at {i} is shorter than its grid {(t, h, w)}")
        idx = torch.arange(n)
        out[0, i:i + n] = nxt + idx // (h * w)
        out[1, i:i + n] = nxt + (idx // w) % h
        out[2, i:i + n] = nxt + idx % w
        nxt = int(out[:, i:i + n].max()) + 1
        i += n
    if next(grid_iter, None) is not None:
        raise ValueError("more image grids than image placeholder runs")
    return out


class MRopeRotaryEmbedding(nn.Module):
    """Wraps a 1-D rotary embedding: for [3, batch, seq] `position_ids` it computes cos/sin per
    axis (temporal, height, width) and takes each frequency section from its axis
    (`mrope_section`, over the half dimension, repeated for both halves); [batch, seq] ids are
    treated as text (all three axes equal), giving exactly the 1-D result."""

    def __init__(self, base: nn.Module, mrope_section: Sequence[int]) -> None:
        super().__init__()
        self.base = base
        self.sections = list(mrope_section) * 2

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids.dim() == 2:
            return self.base(x, position_ids)
        per_axis = [self.base(x, position_ids[a]) for a in range(3)]
        cos = torch.cat([c[a % 3] for a, c in enumerate(
            torch.stack([p[0] for p in per_axis]).split(self.sections, dim=-1))], dim=-1)
        sin = torch.cat([c[a % 3] for a, c in enumerate(
            torch.stack([p[1] for p in per_axis]).split(self.sections, dim=-1))], dim=-1)
        return cos, sin


class MassvQwen2ForCausalLM(MassvHFDrafterMixin, Qwen2ForCausalLM):
    """transformers MASSV drafter. Load with `MassvQwen2ForCausalLM.from_pretrained(drafter_dir)`.

    `forward(input_ids, image_embeds=..., image_mask=..., labels=..., **lm_kwargs)`: see
    :class:`MassvHFDrafterMixin`. With `massv.positions == "mrope"`, pass `position_ids` of shape
    [3, batch, seq] (:func:`mrope_positions` per row) together with an `attention_mask`.

    Raises:
        MassvConfigError: the config has no valid `massv` block.
    """

    config_class = Qwen2Config

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__(config)
        self._init_massv(config)
        if self.massv_config.positions == "mrope":
            section = (config.rope_parameters or {}).get("mrope_section")
            if not section:
                raise ValueError("massv.positions='mrope' but rope_parameters has no mrope_section")
            self.model.rotary_emb = MRopeRotaryEmbedding(self.model.rotary_emb, section)
        self.post_init()

    def _prepare_lm_kwargs(self, inputs_embeds, kwargs):
        position_ids = kwargs.get("position_ids")
        if position_ids is not None and position_ids.dim() == 3 and kwargs.get(
                "attention_mask") is None:
            # transformers reads 2-D position_ids for packed-sequence masks when no mask is given
            kwargs["attention_mask"] = torch.ones(inputs_embeds.shape[:2], dtype=torch.long,
                                                  device=inputs_embeds.device)
        return kwargs
