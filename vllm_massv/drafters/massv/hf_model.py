"""MASSV drafters for transformers (training, reference computations): the twins of
`vllm_model.py`, with the same `config.json`, weight names and computation (token embeddings with
the projected target image embeddings at the image positions; padded vocabulary rows at -inf).
Qwen2 drafters take 1-D or the target's M-RoPE positions; Gemma3 drafters scale token embeddings
by √hidden (not the image rows) and attend causally everywhere. Design: docs/design/massv.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import (DynamicCache, Gemma3ForCausalLM, Gemma3TextConfig, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

from vllm_massv.drafters.massv.config import MassvConfig
from vllm_massv.drafters.massv.projector import build_projector

__all__ = ["MassvGemma3ForCausalLM", "MassvHFDrafterMixin", "MassvQwen2ForCausalLM",
           "MassvQwen3ForCausalLM", "InterleavedMRopeRotaryEmbedding", "MRopeRotaryEmbedding",
           "HF_DRAFTER_CLASSES", "drafter_class"]


class MassvHFDrafterMixin:
    """Projector, embedding merge and padded-vocab masking of a transformers MASSV drafter.

    The host class is a transformers causal LM whose `get_input_embeddings()` is the LM's own
    token embedding, including any scaling (Gemma3's `Gemma3TextScaledWordEmbedding`, √hidden).
    Subclasses call :meth:`_init_massv` in `__init__` before `post_init()`, and may override
    :meth:`_prepare_lm_kwargs`.
    """

    massv_config: MassvConfig

    def _init_massv(self, config: Any) -> None:
        """Read the `massv` block and build the projector.

        Raises:
            MassvConfigError: the config has no valid `massv` block.
        """
        self.massv_config = MassvConfig.from_hf_config(config)
        self.mm_projector = build_projector(self.massv_config, config.hidden_size)

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None,
              image_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Drafter input embeddings: token embeddings (scaled as the LM scales them), with the
        projected image embeddings (unscaled) at the image positions.

        Args:
            input_ids: [batch, seq] token ids.
            image_embeds: [n_image_tokens, vision_feature_dim], the target's cached image
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

    def _prepare_lm_kwargs(self, inputs_embeds: torch.Tensor, kwargs: dict[str, Any]
                           ) -> dict[str, Any]:
        """Adjust the keyword arguments of the LM's forward (masks, positions); default: none."""
        return kwargs

    def forward(self, input_ids: torch.Tensor | None = None,
                image_embeds: torch.Tensor | None = None, image_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        """The LM's forward on :meth:`embed`'s output; logits [batch, seq, vocab_size] with
        padded rows (>= `massv.orig_vocab_size`) at -inf; `loss` over them when `labels` is
        given (-100 = ignored)."""
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, image_embeds, image_mask)
        kwargs = self._prepare_lm_kwargs(inputs_embeds, kwargs)
        out = super().forward(inputs_embeds=inputs_embeds, labels=None, **kwargs)
        orig = self.massv_config.orig_vocab_size
        if orig < out.logits.shape[-1]:
            out.logits[..., orig:] = float("-inf")
        if labels is not None:
            out.loss = self.loss_function(out.logits, labels, self.config.vocab_size)
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


def mrope_rotary(base: nn.Module, config) -> nn.Module:
    """`base` (a 1-D rotary embedding) wrapped for the target's M-RoPE positions, as the
    config's `rope_parameters` give them: `mrope_section`, and `mrope_interleaved` (Qwen3-VL)
    or not (Qwen2-VL / Qwen2.5-VL).

    Raises:
        ValueError: `rope_parameters` has no `mrope_section`.
    """
    rope = config.rope_parameters or {}
    section = rope.get("mrope_section")
    if not section:
        raise ValueError("massv.positions='mrope' but rope_parameters has no mrope_section")
    wrapper = (InterleavedMRopeRotaryEmbedding if rope.get("mrope_interleaved")
               else MRopeRotaryEmbedding)
    return wrapper(base, section)


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
            self.model.rotary_emb = mrope_rotary(self.model.rotary_emb, config)
        self.post_init()

    def _prepare_lm_kwargs(self, inputs_embeds, kwargs):
        position_ids = kwargs.get("position_ids")
        if position_ids is not None and position_ids.dim() == 3 and kwargs.get(
                "attention_mask") is None:
            # transformers reads 2-D position_ids for packed-sequence masks when no mask is given
            kwargs["attention_mask"] = torch.ones(inputs_embeds.shape[:2], dtype=torch.long,
                                                  device=inputs_embeds.device)
        return kwargs


class MassvGemma3ForCausalLM(MassvHFDrafterMixin, Gemma3ForCausalLM):
    """transformers MASSV drafter for Gemma3 targets. Load with
    `MassvGemma3ForCausalLM.from_pretrained(drafter_dir)`; `forward` as in
    :class:`MassvHFDrafterMixin` (1-D positions). For `generate`, pass
    `past_key_values=DynamicCache()` (transformers' default cache wants a sliding window).

    Raises:
        MassvConfigError: the config has no valid `massv` block.
    """

    config_class = Gemma3TextConfig

    def __init__(self, config: Gemma3TextConfig) -> None:
        super().__init__(config)
        self._init_massv(config)
        self.post_init()

    def _prepare_lm_kwargs(self, inputs_embeds, kwargs):
        if self.config.sliding_window is not None:
            return kwargs
        if kwargs.get("past_key_values") is None and kwargs.get("use_cache", True) is not False:
            kwargs["past_key_values"] = DynamicCache()  # full-attention layers only
        if isinstance(kwargs.get("attention_mask"), dict):
            return kwargs
        mask = create_causal_mask(
            config=self.config, inputs_embeds=inputs_embeds,
            attention_mask=kwargs.get("attention_mask"),
            past_key_values=kwargs.get("past_key_values"),
            position_ids=kwargs.get("position_ids"))
        kwargs["attention_mask"] = {"full_attention": mask, "sliding_attention": mask}
        return kwargs


class InterleavedMRopeRotaryEmbedding(nn.Module):
    """Qwen3-VL's interleaved M-RoPE around a 1-D rotary embedding: for [3, batch, seq]
    `position_ids`, frequency j of the rotary half takes its cos/sin from axis 1 (height) when
    j % 3 == 1 and j < 3 * mrope_section[1], from axis 2 (width) when j % 3 == 2 and
    j < 3 * mrope_section[2], else from axis 0 (temporal); the same layout for both halves.
    [batch, seq] ids are text (all axes equal): exactly the 1-D result. Source: transformers
    `models/qwen3_vl/modeling_qwen3_vl.py::Qwen3VLTextRotaryEmbedding.recomposition_frequencies`,
    vLLM `layers/rotary_embedding/mrope.py` (`mrope_interleaved`)."""

    def __init__(self, base: nn.Module, mrope_section: Sequence[int]) -> None:
        super().__init__()
        self.base = base
        half = sum(mrope_section)
        axis = [0] * half
        for a in (1, 2):
            for j in range(a, mrope_section[a] * 3, 3):
                axis[j] = a
        # a plain list, not a buffer: from_pretrained leaves non-persistent buffers uninitialised
        self.axis = axis * 2

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids.dim() == 2:
            return self.base(x, position_ids)
        per_axis = [self.base(x, position_ids[a]) for a in range(3)]
        cos = torch.stack([p[0] for p in per_axis])   # [3, batch, seq, head_dim]
        sin = torch.stack([p[1] for p in per_axis])
        idx = torch.tensor(self.axis, device=cos.device).view(1, 1, 1, -1).expand(
            1, *cos.shape[1:])
        return cos.gather(0, idx)[0], sin.gather(0, idx)[0]


class MassvQwen3ForCausalLM(MassvHFDrafterMixin, Qwen3ForCausalLM):
    """transformers MASSV drafter for Qwen3-VL targets (a Qwen3 text LM). Load with
    `MassvQwen3ForCausalLM.from_pretrained(drafter_dir)`; `forward` as in
    :class:`MassvQwen2ForCausalLM`, with the target's *interleaved* M-RoPE for `positions:
    mrope` (:class:`InterleavedMRopeRotaryEmbedding`). `image_embeds` are the target's image
    embeddings: [n, vision_feature_dim] (main, post-merger block) or vLLM's cached layout [n,
    vision_feature_dim * (1 + L)] with the L DeepStack levels after it. The projector reads the
    first `vision_feature_dim` columns (the main block, or the whole row for `feature_tap:
    post_merger_deepstack`). With `massv.deepstack` (identity projector) level l is added to the
    hidden states after decoder layer l at the image positions, as the target does (transformers
    `Qwen3VLTextModel._deepstack_process`, vLLM `Qwen3LLMModel.forward`); main-only
    embeddings add nothing. Without it the levels are ignored.

    Raises:
        MassvConfigError: the config has no valid `massv` block.
    """

    config_class = Qwen3Config

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__(config)
        self._init_massv(config)
        if self.massv_config.positions == "mrope":
            self.model.rotary_emb = mrope_rotary(self.model.rotary_emb, config)
        self.post_init()

    def embed(self, input_ids, image_embeds=None, image_mask=None):
        if image_embeds is not None:
            image_embeds = image_embeds[..., :self.massv_config.vision_feature_dim]
        return super().embed(input_ids, image_embeds, image_mask)

    def forward(self, input_ids=None, image_embeds=None, image_mask=None, inputs_embeds=None,
                labels=None, **kwargs):
        width = self.massv_config.vision_feature_dim
        if (not self.massv_config.deepstack or image_embeds is None or inputs_embeds is not None
                or image_embeds.shape[-1] == width):
            return super().forward(input_ids, image_embeds, image_mask, inputs_embeds, labels,
                                   **kwargs)
        levels = image_embeds[..., width:].unflatten(-1, (-1, width)).transpose(0, 1)
        mask = input_ids == self.massv_config.image_token_id if image_mask is None else image_mask
        with _deepstack_hooks(self.model.layers, mask, levels):
            return super().forward(input_ids, image_embeds, image_mask, inputs_embeds, labels,
                                   **kwargs)

    _prepare_lm_kwargs = MassvQwen2ForCausalLM._prepare_lm_kwargs


@contextlib.contextmanager
def _deepstack_hooks(layers: nn.ModuleList, mask: torch.Tensor, levels: torch.Tensor):
    """For the duration of one forward, add DeepStack level l to the output of decoder layer l
    at the image positions (transformers `Qwen3VLTextModel._deepstack_process`).

    Args:
        layers: the decoder layers (each returns its [batch, seq, hidden] hidden states).
        mask: [batch, seq] bool, the image positions (sum = n).
        levels: [L, n, hidden], level l's rows in `mask`'s row-major order.
    Raises:
        ValueError: more levels than layers.
    """
    if levels.shape[0] > len(layers):
        raise ValueError(f"{levels.shape[0]} DeepStack levels for {len(layers)} decoder layers")

    def add_level(level: torch.Tensor):
        def hook(module, args, hidden):
            hidden = hidden.clone()
            hidden[mask] = hidden[mask] + level.to(hidden.dtype)
            return hidden
        return hook

    handles = [layers[i].register_forward_hook(add_level(levels[i]))
               for i in range(levels.shape[0])]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


#: transformers class of each MASSV drafter architecture (the `architectures[0]` in config.json).
HF_DRAFTER_CLASSES = {
    "MassvQwen2ForCausalLM": MassvQwen2ForCausalLM,
    "MassvGemma3ForCausalLM": MassvGemma3ForCausalLM,
    "MassvQwen3ForCausalLM": MassvQwen3ForCausalLM,
}


def drafter_class(config_or_dir) -> type:
    """The transformers class for a MASSV drafter, from its config or checkpoint directory.

    Raises:
        ValueError: the config names no MASSV architecture.
    """
    from transformers import AutoConfig, PretrainedConfig

    cfg = config_or_dir if isinstance(config_or_dir, PretrainedConfig) else \
        AutoConfig.from_pretrained(config_or_dir)
    for arch in cfg.architectures or []:
        if arch in HF_DRAFTER_CLASSES:
            return HF_DRAFTER_CLASSES[arch]
    raise ValueError(f"{config_or_dir}: architectures {cfg.architectures} name no MASSV drafter "
                     f"({', '.join(HF_DRAFTER_CLASSES)})")
