"""A tiny random Qwen3-VL target (``Qwen3VLForConditionalGeneration``) for tests (issue 24).

Qwen3-VL conventions mirrored (sources: transformers ``models/qwen3_vl/``, vLLM
``model_executor/models/qwen3_vl.py``):

* The text LM is Qwen3 (per-head ``q_norm`` / ``k_norm``, explicit ``head_dim``) with
  *interleaved* M-RoPE: ``rope_parameters`` carries ``mrope_section`` and
  ``mrope_interleaved: true`` (real 4B/8B: [24, 20, 20] over a 64-wide rotary half); here
  [6, 5, 5] over the tiny head_dim 32's half of 16.
* DeepStack: the vision tower taps the blocks ``deepstack_visual_indexes`` ([0, 1] of 3),
  merges each tap (its own ``deepstack_merger_list`` entry) and vLLM caches every image as one
  ``[n_tokens, out_hidden_size * (1 + levels)]`` tensor: the main (post-merger) embedding in
  the first ``out_hidden_size`` columns, then one block per level
  (``Qwen3_VisionTransformer.forward``). ``embed_input_ids`` splits it: the main block goes
  into the input embeddings, level ``l`` is added to the hidden states after decoder layer
  ``l`` at the image positions (``_compute_deepstack_embeds``, ``Qwen3LLMModel.forward``).
* Images: patch 16, spatial merge 2, temporal patch 2 (one merged token per 32x32 pixels),
  ``Qwen2VLImageProcessorFast`` with mean/std 0.5 like the hub checkpoints; videos:
  ``Qwen3VLVideoProcessor``.

The tokenizer and chat template are the shared Qwen2-VL-layout ones
(:mod:`vllm_massv.testing.tokenizer`: ``<|image_pad|>`` 12, ``<|video_pad|>`` 13, ...), so
:func:`vllm_massv.testing.image_prompt` / ``text_prompt`` work on the target directory.
transformers is imported inside the builder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vllm_massv.testing.tokenizer import (
    CHAT_TEMPLATE,
    EOS_TOKEN_ID,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    VIDEO_TOKEN_ID,
    VISION_END_TOKEN_ID,
    VISION_START_TOKEN_ID,
    TOKENIZER_VOCAB_SIZE,
    build_tokenizer,
    write_chat_template,
)
from vllm_massv.testing.weights import init_model

#: The tiny target's text hidden size == the vision tower's ``out_hidden_size`` (as in Qwen3-VL).
HIDDEN_SIZE = 128
#: Vision blocks whose outputs are DeepStack levels (of a 3-block tower).
DEEPSTACK_VISUAL_INDEXES = [0, 1]
#: Interleaved M-RoPE split of the 16-wide rotary half (real Qwen3-VL: [24, 20, 20] of 64).
MROPE_SECTION = [6, 5, 5]
PATCH_SIZE = 16
_MEAN_STD = [0.5, 0.5, 0.5]


def build_qwen3_vl_target(
    out_dir: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 2112,
    hidden_size: int = HIDDEN_SIZE,
    num_layers: int = 3,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    intermediate_size: int | None = None,
    mrope_section: list[int] | None = None,
    vision_hidden_size: int = 128,
    vision_depth: int = 3,
    deepstack_visual_indexes: list[int] | None = None,
    patch_size: int = PATCH_SIZE,
    max_pixels: int = 256 * 256,
    weight_scale: float = 4.0,
    dtype: torch.dtype = torch.float32,
    tokenizer_corpus: list[str] | None = None,
    tokenizer_vocab_size: int = TOKENIZER_VOCAB_SIZE,
) -> Path:
    """Build a tiny random ``Qwen3VLForConditionalGeneration`` in ``out_dir``.

    Text (``qwen3_vl_text``): ``hidden_size`` 128, ``num_layers`` 3, 4 heads of ``head_dim``
    32, ``num_kv_heads`` 2, intermediate ``2 * hidden_size`` unless given, interleaved M-RoPE
    ``mrope_section`` (default :data:`MROPE_SECTION` for head_dim 32, else [24, 20, 20]'s
    proportions; rope_theta 5e6), untied ``lm_head``, vocab 2112 (the tokenizer has 2048).
    Vision (``qwen3_vl_vision``): ``vision_depth`` 3 blocks, hidden 128, 2 heads, intermediate
    ``2 * vision_hidden_size``, ``patch_size`` 16 (one merged token per ``2 * patch_size``
    pixels square), spatial merge 2, temporal patch 2, 256 learned position embeddings (16x16
    grid, interpolated), ``out_hidden_size`` = ``hidden_size``, DeepStack taps
    ``deepstack_visual_indexes`` (default [0, 1]): vLLM caches ``[n, 128 * 3]`` per image.
    The CPU testbed (``benchmarks/testbed/models.py``) overrides the sizes and trains the
    tokenizer on its task text (``tokenizer_corpus``, ``tokenizer_vocab_size``: as for
    :func:`vllm_massv.testing.build_target`).

    Weights: transformers' init under ``torch.manual_seed(seed)``, >=2-D non-embedding weights
    x ``weight_scale``; safetensors in ``dtype``. Also writes the shared tokenizer, a
    ``Qwen3VLProcessor`` (``Qwen2VLImageProcessorFast``, ``Qwen3VLVideoProcessor``; min
    pixels 64*64, max ``max_pixels``), the chat template and ``generation_config.json``. Same
    arguments give the same weights. Returns ``out_dir`` as a ``Path``.
    """
    from transformers import (Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor,
                              Qwen3VLVideoProcessor)
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir, corpus=tokenizer_corpus,
                                vocab_size=tokenizer_vocab_size)
    half = head_dim // 2
    section = (list(mrope_section) if mrope_section is not None
               else MROPE_SECTION if half == 16 else _scaled_section(half))
    text_config = {
        "vocab_size": vocab_size, "hidden_size": hidden_size,
        "intermediate_size": intermediate_size or 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0,
                            "mrope_section": section, "mrope_interleaved": True},
        "attention_bias": False, "bos_token_id": PAD_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": PAD_TOKEN_ID, "tie_word_embeddings": False,
    }
    vision_config = {
        "depth": vision_depth, "hidden_size": vision_hidden_size, "num_heads": 2,
        "intermediate_size": 2 * vision_hidden_size, "hidden_act": "gelu_pytorch_tanh",
        "in_channels": 3, "patch_size": patch_size, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "out_hidden_size": hidden_size,
        "num_position_embeddings": 256,
        "deepstack_visual_indexes": list(deepstack_visual_indexes
                                         if deepstack_visual_indexes is not None
                                         else DEEPSTACK_VISUAL_INDEXES),
    }
    config = Qwen3VLConfig(
        text_config=text_config, vision_config=vision_config, image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID, vision_start_token_id=VISION_START_TOKEN_ID,
        vision_end_token_id=VISION_END_TOKEN_ID, tie_word_embeddings=False)
    model = init_model(Qwen3VLForConditionalGeneration, config, seed, dtype, weight_scale)
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": PAD_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID,
         "pad_token_id": PAD_TOKEN_ID}, indent=2, sort_keys=True) + "\n")

    pixel = {"patch_size": patch_size, "merge_size": 2, "temporal_patch_size": 2,
             "image_mean": _MEAN_STD, "image_std": _MEAN_STD}
    size = {"shortest_edge": 64 * 64, "longest_edge": max_pixels}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, **pixel),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(size=size, **pixel),
        chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out_dir)
    _write_processor_files(out_dir, pixel, size)
    return out_dir


def _scaled_section(half: int) -> list[int]:
    """[24, 20, 20]'s proportions over a rotary half of ``half`` frequencies."""
    t = round(half * 24 / 64)
    h = (half - t) // 2
    return [t, h, half - t - h]


def _write_processor_files(out_dir: Path, pixel: dict[str, Any], size: dict[str, int]) -> None:
    """Flat hub-style processor files (as Qwen/Qwen3-VL-*-Instruct ship them)."""
    common = {**pixel, "size": size, "do_resize": True, "do_rescale": True,
              "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
              "resample": 3}
    files = {
        "preprocessor_config.json": {**common, "image_processor_type": "Qwen2VLImageProcessorFast",
                                     "processor_class": "Qwen3VLProcessor"},
        "video_preprocessor_config.json": {**common, "video_processor_type": "Qwen3VLVideoProcessor",
                                           "processor_class": "Qwen3VLProcessor", "fps": 2,
                                           "do_sample_frames": True, "min_frames": 4,
                                           "max_frames": 768},
        "processor_config.json": {"processor_class": "Qwen3VLProcessor"},
    }
    for name, content in files.items():
        (out_dir / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    write_chat_template(out_dir)


def build_qwen3_text_lm(out_dir: str | Path, *, seed: int = 1, vocab_size: int = 2048,
                        hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
                        head_dim: int = 32, intermediate_size: int | None = None,
                        weight_scale: float = 4.0, dtype: torch.dtype = torch.float32,
                        tokenizer_corpus: list[str] | None = None,
                        tokenizer_vocab_size: int = TOKENIZER_VOCAB_SIZE) -> Path:
    """Build a tiny random ``Qwen3ForCausalLM`` (the stand-in for Qwen3-1.7B as a MASSV draft
    LM): vocab 2048 (the target has 2112), ``hidden_size`` 128, 2 layers, 4 heads of 32, 2 KV
    heads, intermediate ``2 * hidden_size`` unless given, 1-D RoPE (theta 1e6), tied
    embeddings, ``q_norm`` / ``k_norm``; the shared tokenizer (``tokenizer_corpus`` /
    ``tokenizer_vocab_size`` as for :func:`build_qwen3_vl_target`). Returns ``out_dir`` as a
    ``Path``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out_dir, corpus=tokenizer_corpus, vocab_size=tokenizer_vocab_size)
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=2,
        head_dim=head_dim, hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True, bos_token_id=PAD_TOKEN_ID, eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID)
    model = init_model(Qwen3ForCausalLM, config, seed, dtype, weight_scale)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
