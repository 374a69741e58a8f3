"""Training side: transformers implementations that read and write the checkpoints the plugin
serves (same `config.json`, same weight names)."""

from vllm_massv.hf.modeling_massv_gemma3 import MassvGemma3ForCausalLM
from vllm_massv.hf.modeling_massv_qwen2 import MassvQwen2ForCausalLM

#: transformers class of each MASSV drafter architecture (the `architectures[0]` in config.json).
HF_DRAFTER_CLASSES = {
    "MassvQwen2ForCausalLM": MassvQwen2ForCausalLM,
    "MassvGemma3ForCausalLM": MassvGemma3ForCausalLM,
}


def drafter_class(config_or_dir) -> type:
    """The transformers class for a MASSV drafter, from its config or checkpoint directory.

    Raises:
        ValueError: the config names no MASSV architecture.
    """
    from transformers import AutoConfig, PretrainedConfig

    cfg = config_or_dir if isinstance(config_or_dir, PretrainedConfig) else \
        AutoConfig.from_pretrained(config_or_dir)
    for arch in cfg.architectures or []:
        if arch in HF_DRAFTER_CLASSES:
            return HF_DRAFTER_CLASSES[arch]
    raise ValueError(f"{config_or_dir}: architectures {cfg.architectures} name no MASSV drafter "
                     f"({', '.join(HF_DRAFTER_CLASSES)})")


__all__ = ["HF_DRAFTER_CLASSES", "MassvGemma3ForCausalLM", "MassvQwen2ForCausalLM",
           "drafter_class"]
