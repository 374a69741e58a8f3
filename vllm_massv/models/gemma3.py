"""MASSV drafter on a Gemma3 text LM, for vLLM (MASSV, arXiv 2505.10526 §3; Gemma3 targets).

`MassvGemma3ForCausalLM` = vLLM's `Gemma3ForCausalLM` + the projector (:class:`MassvDrafterMixin`).
It drafts for `Gemma3ForConditionalGeneration` targets, whose cached image embeddings are the
output of the target's own multimodal projector: `mm_tokens_per_image` rows (256 for the hub
models, no pan-and-scan) of the target's *text* hidden width per image (vLLM
`models/gemma3_mm.py::_process_image_input`).

Gemma3 conventions, and where they are honoured:

* Token embeddings are scaled by √hidden inside `Gemma3Model.embed_input_ids`; image embeddings
  are not (vLLM `models/gemma3.py`, transformers `Gemma3TextScaledWordEmbedding`). The mixin's
  `embed_input_ids` embeds tokens through the LM (scaled) and then overwrites the image rows with
  the projector's output (unscaled), as the target does.
* The 1B text LM's vocab (262144) is 64 rows short of the VLM's (262208), and the image token
  (`<image_soft_token>`, 262144) is the first missing row: `massv init` pads the embedding and
  the padded rows' logits are -inf. The padded image row is only ever overwritten.
* Sliding-window layers: a MASSV Gemma3 drafter is saved with `sliding_window: null` (all layers
  attend over the full context; per-layer-type RoPE kept) because vLLM 0.32's V1 proposer needs
  every draft layer in one KV-cache group (`v1/spec_decode/llm_base_proposer.py::
  validate_same_kv_cache_group`); `vllm_massv.patches` turns the hybrid KV-cache manager off for
  such pairs so the target's sliding layers share that group.
* Positions are 1-D (Gemma3 has no M-RoPE).
"""

from __future__ import annotations

from vllm.model_executor.models.gemma3 import Gemma3ForCausalLM
from vllm.model_executor.models.interfaces import SupportsMultiModalEmbeddings

from vllm_massv.models.base import MassvDrafterMixin


class MassvGemma3ForCausalLM(MassvDrafterMixin, Gemma3ForCausalLM, SupportsMultiModalEmbeddings):
    """Gemma3 text LM + MASSV projector. Checkpoint layout: Gemma3's own weight names
    (`model.*`, tied `lm_head`) plus `mm_projector.*`; `config.json` is a `gemma3_text` config
    with a `massv` block (:class:`MassvConfig`)."""


__all__ = ["MassvGemma3ForCausalLM"]
