"""MASSV drafter on a Qwen2 text LM, for transformers (training, reference computations).

The twin of `vllm_massv.models.qwen2.MassvQwen2ForCausalLM`: same `config.json` (a `Qwen2Config`
with a `massv` block), same weight names (`model.*`, `lm_head.*`, `mm_projector.*`), same
computation: token embeddings, with the projected target image embeddings written at the image
placeholder positions, through the Qwen2 LM; logits of padded vocabulary rows are -inf.
Positions are the 1-D token index (`massv.positions == "1d"`).
"""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from vllm_massv.config import MassvConfig
from vllm_massv.projector import build_projector


class MassvQwen2ForCausalLM(Qwen2ForCausalLM):
    """transformers MASSV drafter. Load with `MassvQwen2ForCausalLM.from_pretrained(drafter_dir)`.

    Raises:
        MassvConfigError: the config has no valid `massv` block.
        NotImplementedError: `massv.positions == "mrope"` (only the vLLM side implements it).
    """

    config_class = Qwen2Config

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__(config)
        self.massv_config = MassvConfig.from_hf_config(config)
        if self.massv_config.positions != "1d":
            raise NotImplementedError("the transformers MASSV drafter supports positions='1d'")
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
        out = super().forward(inputs_embeds=inputs_embeds, labels=None, **kwargs)
        orig = self.massv_config.orig_vocab_size
        if orig < out.logits.shape[-1]:
            out.logits[..., orig:] = float("-inf")
        if labels is not None:
            out.loss = self.loss_function(out.logits, labels, self.config.vocab_size)
        return out
