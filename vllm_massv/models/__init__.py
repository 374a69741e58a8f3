"""vLLM drafter architectures registered by the plugin (name -> "module:Class")."""

MASSV_ARCHITECTURES: dict[str, str] = {
    "MassvQwen2ForCausalLM": "vllm_massv.models.qwen2:MassvQwen2ForCausalLM",
    "MassvGemma3ForCausalLM": "vllm_massv.models.gemma3:MassvGemma3ForCausalLM",
}
