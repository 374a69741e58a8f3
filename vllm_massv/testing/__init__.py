"""Deterministic tiny local models, prompts and a `vllm serve` harness for tests, the demo and
benchmarks (like ``transformers.testing_utils``).

Nothing here touches the network or a model hub: every artefact is generated locally from fixed
seeds, so two builds with the same arguments produce byte-identical files. This package only
re-exports its modules' public names (``from vllm_massv import testing as mt; mt.build_target``):

* :mod:`.tokenizer` -- the shared byte-level BPE, its special tokens and chat template;
* :mod:`.qwen2_vl` -- the tiny Qwen2.5-VL target, the Qwen2 text LM, the stock drafter and the
  tiny testbed (:mod:`.weights`: their seeded random initialisation);
* :mod:`.gemma3` -- the Gemma3 family's tiny target, text LM and tokenizer;
* :mod:`.qwen3_vl` -- a tiny Qwen3-VL target (DeepStack, interleaved M-RoPE) and a Qwen3 text LM;
* :mod:`.drafters` -- tiny untrained MSD and EAGLE-3 drafters;
* :mod:`.prompts` -- chat-formatted prompts, fixed test images and videos;
* :mod:`.server` -- vLLM's OpenAI-compatible server as a subprocess (:class:`ApiServer`).
"""

from vllm_massv.testing.drafters import build_eagle3_drafter, build_msd_drafter
from vllm_massv.testing.prompts import (
    image_prompt,
    sample_images,
    sample_videos,
    text_prompt,
    video_item,
    video_prompt,
)
from vllm_massv.testing.qwen2_vl import (
    build_stock_drafter,
    build_target,
    build_text_lm,
    build_tiny_testbed,
    write_generation_config,
)
from vllm_massv.testing.server import (
    ApiServer,
    ServerStartError,
    free_port,
    process_group_members,
    scoped_env,
    vllm_script,
    wait_group_gone,
)
from vllm_massv.testing.tokenizer import (
    CHAT_TEMPLATE,
    EOS_TOKEN_ID,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    SPECIAL_TOKENS,
    TOKENIZER_VOCAB_SIZE,
    VIDEO_TOKEN_ID,
    VISION_END_TOKEN_ID,
    VISION_START_TOKEN_ID,
    build_tokenizer,
)

__all__ = [
    "ApiServer",
    "CHAT_TEMPLATE",
    "EOS_TOKEN_ID",
    "IMAGE_TOKEN_ID",
    "PAD_TOKEN_ID",
    "SPECIAL_TOKENS",
    "ServerStartError",
    "TOKENIZER_VOCAB_SIZE",
    "VIDEO_TOKEN_ID",
    "VISION_END_TOKEN_ID",
    "VISION_START_TOKEN_ID",
    "build_eagle3_drafter",
    "build_msd_drafter",
    "build_stock_drafter",
    "build_target",
    "build_text_lm",
    "build_tiny_testbed",
    "build_tokenizer",
    "free_port",
    "image_prompt",
    "process_group_members",
    "sample_images",
    "sample_videos",
    "scoped_env",
    "text_prompt",
    "video_item",
    "video_prompt",
    "vllm_script",
    "wait_group_gone",
    "write_generation_config",
]
