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
from transformers.modeling_outputs import CausalLMOutputWithPast

from vllm_massv.config import MassvConfig
from vllm_massv.projector import build_projector


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


class MassvQwen2ForCausalLM(Qwen2ForCausalLM):
    """transformers MASSV drafter. Load with `MassvQwen2ForCausalLM.from_pretrained(drafter_dir)`.

    With `massv.positions == "mrope"`, pass `position_ids` of shape [3, batch, seq]
    (:func:`mrope_positions` per row) together with an `attention_mask`.

    Raises:
        MassvConfigError: the config has no valid `massv` block.
    """

    config_class = Qwen2Config

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__(config)
        self.massv_config = MassvConfig.from_hf_config(config)
        if self.massv_config.positions == "mrope":
            section = (config.rope_parameters or {}).get("mrope_section")
            if not section:
                raise ValueError("massv.positions='mrope' but rope_parameters has no mrope_section")
            self.model.rotary_emb = MRopeRotaryEmbedding(self.model.rotary_emb, section)
        self.mm_projector = build_projector(self.massv_config, config.hidden_size)
        self.post_init()

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None,
              image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Drafter input embeddings.

        Args:
            input_ids: [batch, seq] token ids.
            image_embeds: [n_image_tokens, vision_feature_dim], the target's post-merger image
                embeddings for every image placeholder in `input_ids`, in row-major order.
            image_mask: [batch, seq] bool, the positions that take an image embedding (default:
                every image placeholder token; pass it when generated text may contain one).
        Returns:
            [batch, seq, hidden_size].
        Raises:
            ValueError: the number of image embeddings differs from the placeholder count.
        """
        embeds = self.get_input_embeddings()(input_ids)
        if image_embeds is None or self.mm_projector is None:
            return embeds
        mask = input_ids == self.massv_config.image_token_id if image_mask is None else image_mask
        if int(mask.sum()) != image_embeds.shape[0]:
            raise ValueError(f"{image_embeds.shape[0]} image embeddings for "
                             f"{int(mask.sum())} image placeholders")
        projected = self.mm_projector(image_embeds.to(embeds.dtype))
        return embeds.masked_scatter(mask.unsqueeze(-1), projected)

    def forward(self, input_ids: torch.Tensor | None = None,
                image_embeds: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
                inputs_embeds=None, labels=None, **kwargs) -> CausalLMOutputWithPast:
        """Like `Qwen2ForCausalLM.forward`, plus `image_embeds` / `image_mask` (see :meth:`embed`)."""
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, image_embeds, image_mask)
        position_ids = kwargs.get("position_ids")
        if position_ids is not None and position_ids.dim() == 3 and kwargs.get(
                "attention_mask") is None:
            # transformers reads 2-D position_ids for packed-sequence masks when no mask is given
            kwargs["attention_mask"] = torch.ones(inputs_embeds.shape[:2], dtype=torch.long,
                                                  device=inputs_embeds.device)
        out = super().forward(inputs_embeds=inputs_embeds, labels=None, **kwargs)
        orig = self.massv_config.orig_vocab_size
        if orig < out.logits.shape[-1]:
            out.logits[..., orig:] = float("-inf")
        if labels is not None:
            out.loss = self.loss_function(out.logits, labels, self.config.vocab_size)
        return out
