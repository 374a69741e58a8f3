"""What every transformers MASSV drafter adds to its HF causal LM (the training-side twin of
`vllm_massv.models.base.MassvDrafterMixin`).

:class:`MassvHFDrafterMixin` goes before the transformers causal-LM class in the bases
(``class MassvQwen2ForCausalLM(MassvHFDrafterMixin, Qwen2ForCausalLM)``). It holds the projector,
writes the projected target image embeddings at the image positions, sets the logits of padded
vocabulary rows to -inf and computes the loss on the masked logits.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from vllm_massv.config import MassvConfig
from vllm_massv.projector import build_projector


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
