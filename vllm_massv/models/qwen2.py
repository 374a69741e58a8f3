"""MASSV drafter on a Qwen2 text LM, for vLLM (MASSV, arXiv 2505.10526 §3).

`MassvQwen2ForCausalLM` = vLLM's `Qwen2ForCausalLM` + a projector that maps the target VLM's
cached image embeddings (post-merger vision output, width = target hidden size) into the
drafter's embedding space at the image-placeholder positions (:class:`MassvDrafterMixin`). The
drafter never runs a vision encoder: vLLM's speculative-decoding proposer hands it the
embeddings the target already computed (see `vllm_massv.proposer`).
"""

from __future__ import annotations

from vllm.model_executor.models.interfaces import SupportsMultiModalEmbeddings
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from vllm_massv.models.base import MassvDrafterMixin
from vllm_massv.projector import PROJECTOR_PREFIX


class MassvQwen2ForCausalLM(MassvDrafterMixin, Qwen2ForCausalLM, SupportsMultiModalEmbeddings):
    """Qwen2 text LM + MASSV projector. Checkpoint layout: Qwen2's own weight names plus
    `mm_projector.*`; `config.json` carries a `massv` block (:class:`MassvConfig`)."""


__all__ = ["MassvQwen2ForCausalLM", "PROJECTOR_PREFIX"]
