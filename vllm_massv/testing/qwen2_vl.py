"""Tiny random Qwen2 models: the Qwen2.5-VL target, a Qwen2 text LM, and a testbed of them.

* :func:`build_target` -- a tiny random ``Qwen2_5_VLForConditionalGeneration`` (the target VLM),
  saved with tokenizer, image/video processor and processor files so that
  ``AutoProcessor.from_pretrained`` and vLLM can load it.
* :func:`build_text_lm` -- a tiny random ``Qwen2ForCausalLM`` (the stand-in for an off-the-shelf
  small text LM that MASSV turns into a multimodal drafter).
* :func:`build_stock_drafter` / :func:`build_tiny_testbed` -- the target's own LM as a stock vLLM
  draft model, and a cached target + sanity drafter + stock drafter set.

transformers is imported inside the builders, so that importing ``vllm_massv.testing`` (the
server harness, used by the benchmarks) does not load it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vllm_massv.drafters.massv.init import init_drafter
from vllm_massv.speculators import SPECULATORS_KEYS
from vllm_massv.testing.tokenizer import (
    CHAT_TEMPLATE,
    EOS_TOKEN_ID,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    TOKENIZER_VOCAB_SIZE,
    VIDEO_TOKEN_ID,
    VISION_END_TOKEN_ID,
    VISION_START_TOKEN_ID,
    build_tokenizer,
    write_chat_template,
)
from vllm_massv.testing.weights import init_model

# Qwen2-VL image processor constants (OpenAI CLIP normalisation).
_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


def write_generation_config(out_dir: Path) -> None:
    """Write the minimal ``generation_config.json`` of the Qwen2 builders (bos / eos / pad ids
    only: no sampling defaults vLLM would pick up)."""
    config = {
        "bos_token_id": PAD_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": PAD_TOKEN_ID,
    }
    (out_dir / "generation_config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )


def _save_model(model: Any, out_dir: Path) -> None:
    model.save_pretrained(out_dir, safe_serialization=True)
    # Our own, minimal generation config (no sampling defaults vLLM would pick up).
    write_generation_config(out_dir)


def build_target(
    out_dir: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 2112,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    vision_hidden_size: int = 128,
    vision_depth: int = 2,
    max_pixels: int = 224 * 224,
    tokenizer_corpus: list[str] | None = None,
    tokenizer_vocab_size: int = TOKENIZER_VOCAB_SIZE,
    weight_scale: float = 4.0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Build a tiny random ``Qwen2_5_VLForConditionalGeneration`` (the target VLM) in ``out_dir``.

    The defaults give the random test target described below; the CPU testbed
    (``benchmarks/testbed/build.py``) overrides the sizes, trains the tokenizer on its own task
    text (``tokenizer_corpus``, ``tokenizer_vocab_size``, see :func:`build_tokenizer`) and keeps
    transformers' initialisation (``weight_scale=1``) before training the model.

    Text model: ``hidden_size`` (256), ``num_layers`` (4), 4 attention heads of
    ``hidden_size // 4`` (64), 2 KV heads, intermediate ``2 * hidden_size``, M-RoPE with
    ``mrope_section`` [8, 12, 12] (scaled to ``head_dim // 2`` if ``hidden_size`` differs),
    untied ``lm_head``, ``vocab_size`` 2112 (larger than the 2048-token tokenizer, like real
    Qwen2.5-VL). Vision tower: depth 2, hidden 128, 2 heads, intermediate 256, patch 14,
    spatial merge 2, temporal patch 2, window 112, full attention in block 1, output
    ``hidden_size``.

    Weights: transformers' init under ``torch.manual_seed(seed)``, then every >=2-D
    non-embedding weight multiplied by 4; saved as safetensors in ``dtype``. Also writes the
    tokenizer (:func:`build_tokenizer`), ``preprocessor_config.json`` (``Qwen2VLImageProcessor``,
    min_pixels 56*56, max_pixels 224*224), ``video_preprocessor_config.json``,
    ``processor_config.json``, the chat template files and ``generation_config.json``, so that
    ``AutoProcessor.from_pretrained(out_dir)`` returns a ``Qwen2_5_VLProcessor``. Same arguments
    give byte-identical files. Returns ``out_dir`` as a ``Path``.
    """
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(
        out_dir, corpus=tokenizer_corpus, vocab_size=tokenizer_vocab_size
    )

    head_dim = hidden_size // num_heads
    half = head_dim // 2
    # Qwen2.5-VL splits the rotary half-dim into (temporal, height, width) sections; 8/12/12 for
    # head_dim 64 (real 7B: 16/24/24 for head_dim 128).
    t_section = half // 4
    h_section = (half - t_section) // 2
    mrope_section = [t_section, h_section, half - t_section - h_section]

    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size or 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        "max_window_layers": num_layers,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": mrope_section,
        },
        "bos_token_id": PAD_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": PAD_TOKEN_ID,
        "tie_word_embeddings": False,
    }
    vision_config = {
        "depth": vision_depth,
        "hidden_size": vision_hidden_size,
        "num_heads": 2,
        "intermediate_size": 2 * vision_hidden_size,
        "hidden_act": "silu",
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "tokens_per_second": 2,
        "window_size": 112,
        "out_hidden_size": hidden_size,
        "fullatt_block_indexes": [vision_depth - 1],
    }
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_TOKEN_ID,
        vision_end_token_id=VISION_END_TOKEN_ID,
        bos_token_id=PAD_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
        tie_word_embeddings=False,
    )
    model = init_model(Qwen2_5_VLForConditionalGeneration, config, seed, dtype, weight_scale)
    _save_model(model, out_dir)

    pixel_kwargs = {
        "min_pixels": 56 * 56,
        "max_pixels": max_pixels,
        "patch_size": 14,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "image_mean": _IMAGE_MEAN,
        "image_std": _IMAGE_STD,
    }
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixel_kwargs),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**pixel_kwargs),
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    _write_processor_files(out_dir, pixel_kwargs)
    return out_dir


def _write_processor_files(out_dir: Path, pixel_kwargs: dict[str, Any]) -> None:
    """Write the flat, Qwen2-VL hub-style processor files (stable across transformers versions)."""
    size = {"shortest_edge": pixel_kwargs["min_pixels"], "longest_edge": pixel_kwargs["max_pixels"]}
    common = {
        **pixel_kwargs,
        "size": size,
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "resample": 3,
    }
    files = {
        "preprocessor_config.json": {
            **common,
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2_5_VLProcessor",
        },
        "video_preprocessor_config.json": {
            **common,
            "video_processor_type": "Qwen2VLVideoProcessor",
            "processor_class": "Qwen2_5_VLProcessor",
        },
        "processor_config.json": {"processor_class": "Qwen2_5_VLProcessor"},
    }
    for name, content in files.items():
        text = json.dumps(content, indent=2, sort_keys=True) + "\n"
        (out_dir / name).write_text(text, encoding="utf-8")
    write_chat_template(out_dir)


def build_text_lm(
    out_dir: str | Path,
    *,
    seed: int = 1,
    vocab_size: int = 2048,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    tie_word_embeddings: bool = True,
    tokenizer_corpus: list[str] | None = None,
    tokenizer_vocab_size: int = TOKENIZER_VOCAB_SIZE,
    weight_scale: float = 4.0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Build a tiny random ``Qwen2ForCausalLM`` (stand-in for a small off-the-shelf text LM).

    ``tokenizer_corpus``/``tokenizer_vocab_size``/``weight_scale``: as for :func:`build_target`.

    Defaults: hidden 128, 2 layers, 4 heads (head_dim 32, unlike the target's 64), 2 KV heads,
    intermediate 256, tied embeddings, vocab 2048, rope_theta 1e6, max positions 4096. Weights:
    transformers' init under ``torch.manual_seed(seed)``, then every >=2-D non-embedding weight
    multiplied by 4 (a tied ``lm_head`` *is* the embedding and is left alone). Writes the same
    tokenizer files as :func:`build_tokenizer` and a ``generation_config.json``. Same arguments
    give byte-identical files. Returns ``out_dir`` as a ``Path``.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out_dir, corpus=tokenizer_corpus, vocab_size=tokenizer_vocab_size)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        max_window_layers=num_layers,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=PAD_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
    )
    model = init_model(Qwen2ForCausalLM, config, seed, dtype, weight_scale)
    _save_model(model, out_dir)
    return out_dir


def build_stock_drafter(target_dir: str | Path, out_dir: str | Path) -> Path:
    """The target's language model as a plain `Qwen2ForCausalLM` draft (1-D RoPE, no `massv`
    block): what stock vLLM `draft_model` serves, with the sanity drafter's weights."""
    out_dir = Path(out_dir)
    init_drafter(target_dir, target_dir, out_dir, projector="identity", positions="1d")
    cfg = json.loads((out_dir / "config.json").read_text())
    for key in ("massv", *SPECULATORS_KEYS):
        cfg.pop(key, None)
    cfg["architectures"] = ["Qwen2ForCausalLM"]
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return out_dir


def build_tiny_testbed(cache_dir: str | Path) -> dict[str, Path]:
    """A random tiny target with its MASSV sanity drafter and the stock drafter of the same
    weights, built once into `cache_dir` (reused when present). Keys: target, sanity, stock."""
    cache_dir = Path(cache_dir)
    paths = {"target": cache_dir / "target", "sanity": cache_dir / "massv-sanity",
             "stock": cache_dir / "stock-draft"}
    if all((p / "config.json").is_file() for p in paths.values()):
        return paths
    build_target(paths["target"])
    init_drafter(paths["target"], paths["target"], paths["sanity"], projector="identity")
    build_stock_drafter(paths["target"], paths["stock"])
    return paths
