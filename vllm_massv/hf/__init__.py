"""Compatibility: the transformers MASSV drafters now live in `vllm_massv.drafters.massv.hf_model`."""

from vllm_massv.drafters.massv.hf_model import (HF_DRAFTER_CLASSES, MassvGemma3ForCausalLM,
                                                MassvQwen2ForCausalLM, drafter_class)

__all__ = ["HF_DRAFTER_CLASSES", "MassvGemma3ForCausalLM", "MassvQwen2ForCausalLM",
           "drafter_class"]
