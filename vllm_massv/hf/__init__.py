"""Training side: transformers implementations that read and write the checkpoints the plugin
serves (same `config.json`, same weight names)."""

from vllm_massv.hf.modeling_massv_qwen2 import MassvQwen2ForCausalLM

__all__ = ["MassvQwen2ForCausalLM"]
