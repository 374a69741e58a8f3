"""MASSV drafter on a Gemma3 text LM, for transformers (training, reference computations).

The twin of `vllm_massv.models.gemma3.MassvGemma3ForCausalLM`: same `config.json` (a
`Gemma3TextConfig` with a `massv` block), same weight names (`model.*`, tied `lm_head`,
`mm_projector.*`), same computation. Token embeddings are scaled by √hidden
(`Gemma3TextScaledWordEmbedding`), projected image embeddings are not, as in the target
(transformers `models/gemma3/modeling_gemma3.py::Gemma3Model.forward`, `masked_scatter` of the
unscaled image features). Attention is causal everywhere: a MASSV Gemma3 drafter has
`sliding_window: null` (see `vllm_massv.models.gemma3`), so the sliding layers get the same causal
mask as the full ones and a cache of full layers (transformers builds neither a sliding mask nor a
sliding cache layer without a window).
"""

from __future__ import annotations

from transformers import DynamicCache, Gemma3ForCausalLM, Gemma3TextConfig
from transformers.masking_utils import create_causal_mask

from vllm_massv.hf.base import MassvHFDrafterMixin


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
