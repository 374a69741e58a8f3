"""vLLM drafter architectures registered by the plugin (name -> "module:Class")."""

MASSV_ARCHITECTURES: dict[str, str] = {
    "MassvQwen2ForCausalLM": "vllm_massv.models.qwen2:MassvQwen2ForCausalLM",
    "MassvGemma3ForCausalLM": "vllm_massv.models.gemma3:MassvGemma3ForCausalLM",
}

#: EAGLE-path drafters (served with `method: eagle`), registered beside the MASSV ones.
MSD_ARCHITECTURES: dict[str, str] = {
    "EagleMsdQwen2ForCausalLM": "vllm_massv.msd.model:EagleMsdQwen2ForCausalLM",
}
