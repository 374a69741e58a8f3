"""vLLM drafter architectures registered by the plugin (name -> "module:Class")."""

MASSV_ARCHITECTURES: dict[str, str] = {
    "MassvQwen2ForCausalLM": "vllm_massv.models.qwen2:MassvQwen2ForCausalLM",
}
