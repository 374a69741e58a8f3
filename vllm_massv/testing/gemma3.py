"""Deterministic tiny Gemma3 models for tests: a ``Gemma3ForConditionalGeneration`` target and a
``Gemma3ForCausalLM`` (``gemma3_text``) draft LM, with a locally trained tokenizer laid out like
Gemma3's.

Gemma3 conventions mirrored (sources: transformers ``models/gemma3/``, vLLM
``model_executor/models/gemma3_mm.py``):

* The tokenizer's last entry is ``<image_soft_token>`` (Gemma3: id 262144). The text LM's vocab
  stops just before it (Gemma3-1B: 262144 rows) and the VLM's is 64 rows larger (262208), so
  the image id is out of the drafter's vocabulary and lands in its first padded row.
* ``<start_of_image>`` is the prompt placeholder; the processor expands it to
  ``"\\n\\n<start_of_image>" + "<image_soft_token>" * mm_tokens_per_image + "<end_of_image>\\n\\n"``.
  ``"\\n"``, ``"\\n\\n"``, ``"\\n\\n\\n"`` and ``"\\n\\n\\n\\n"`` are single tokens (vLLM re-merges
  newlines after the expansion and looks them up by their literal text).
* Sliding-window and full-attention layers alternate by ``layer_types``; RoPE theta per layer
  type; token embeddings scaled by √hidden inside the model.

Sizes are chosen for vLLM's CPU attention (head_dim 32) and for speed: the target's text LM is
64 wide with 4 layers (3 sliding, 1 full; window 512, longer than any test sequence), the
vision tower is a 1-layer SigLIP on 64×64 images with 8×8 patches, pooled to 16 image tokens.

``tokenizers``, transformers and safetensors are imported inside the builders, like the rest of
:mod:`vllm_massv.testing`, so that importing the package does not load them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vllm_massv.testing.tokenizer import generic_corpus, train_tokenizer_object
from vllm_massv.testing.weights import init_model

GEMMA3_SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
    "<start_of_image>", "<end_of_image>",
)
_ID = {tok: i for i, tok in enumerate(GEMMA3_SPECIAL_TOKENS)}
PAD_ID, EOS_ID, BOS_ID = _ID["<pad>"], _ID["<eos>"], _ID["<bos>"]
END_OF_TURN_ID = _ID["<end_of_turn>"]
BOI_ID, EOI_ID = _ID["<start_of_image>"], _ID["<end_of_image>"]
NEWLINE_TOKENS = ("\n", "\n\n", "\n\n\n", "\n\n\n\n")
#: Tokenizer entries before ``<image_soft_token>``; also the draft LM's vocab (Gemma3-1B: 262144).
TEXT_VOCAB_SIZE = 1024
#: ``<image_soft_token>`` (Gemma3: 262144 = the 1B vocab size).
IMAGE_TOKEN_ID = TEXT_VOCAB_SIZE
#: The target VLM's vocab: 64 rows more than the text LM's, as 262208 vs 262144.
TARGET_VOCAB_SIZE = TEXT_VOCAB_SIZE + 64
MM_TOKENS_PER_IMAGE = 16
IMAGE_SIZE = 64

#: Gemma3's chat template, reduced to what the tests use (turns, images, text).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_gemma3_tokenizer(out_dir: str | Path) -> Any:
    """Train and save the tiny Gemma3-layout tokenizer (see the module docstring); return it.

    Ids: :data:`GEMMA3_SPECIAL_TOKENS` at 0..7, BPE entries up to 1019, the four newline tokens
    at 1020..1023, ``<image_soft_token>`` at 1024 (1025 entries). bos ``<bos>`` (added by the
    chat template), eos ``<eos>``, pad ``<pad>``.
    """
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer_object(generic_corpus(), TEXT_VOCAB_SIZE - len(NEWLINE_TOKENS),
                                 GEMMA3_SPECIAL_TOKENS)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in NEWLINE_TOKENS])
    tok.add_special_tokens([AddedToken("<image_soft_token>", normalized=False, special=True)])
    if tok.token_to_id("<image_soft_token>") != IMAGE_TOKEN_ID or tok.token_to_id(
            "\n") != TEXT_VOCAB_SIZE - len(NEWLINE_TOKENS):
        raise RuntimeError("tiny Gemma3 tokenizer ids are not laid out as documented")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", extra_special_tokens={
            "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>"},
        model_max_length=4096, padding_side="left", clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def _text_config(*, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                 layer_types: list[str]) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size, "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
        "num_key_value_heads": max(1, num_heads // 2), "head_dim": 32,
        "query_pre_attn_scalar": 32, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "sliding_window": 512,
        "layer_types": layer_types,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        "pad_token_id": PAD_ID, "eos_token_id": EOS_ID, "bos_token_id": BOS_ID,
        "tie_word_embeddings": True, "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
    }


def _write_generation_config(out_dir: Path) -> None:
    config = {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, END_OF_TURN_ID],
              "pad_token_id": PAD_ID}
    (out_dir / "generation_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _fix_siglip_keys(out_dir: Path) -> None:
    """Saved SigLIP weights must be under ``vision_tower.vision_model.*``, the hub layout vLLM
    loads (``models/siglip.py``). transformers 5 saves the hub layout (``language_model.model.*``,
    ``vision_tower.*``) but drops ``vision_model.`` for a from-scratch model; put it back."""
    from safetensors.torch import load_file, save_file

    path = out_dir / "model.safetensors"
    state = load_file(path)
    fixed = {}
    for name, tensor in state.items():
        for prefix in ("model.vision_tower.", "vision_tower."):
            if name.startswith(prefix) and not name.startswith(prefix + "vision_model."):
                name = prefix + "vision_model." + name[len(prefix):]
                break
        fixed[name] = tensor.contiguous()
    save_file(fixed, path, metadata={"format": "pt"})


def build_gemma3_target(out_dir: str | Path, *, seed: int = 0, hidden_size: int = 64,
                        num_layers: int = 4, weight_scale: float = 4.0,
                        dtype: torch.dtype = torch.float32) -> Path:
    """Build a tiny random ``Gemma3ForConditionalGeneration`` target in ``out_dir``.

    Text: ``hidden_size`` (64), ``num_layers`` (4: sliding, sliding, full, sliding), 2 heads
    of 32, 1 KV head, vocab :data:`TARGET_VOCAB_SIZE`, tied embeddings. Vision: SigLIP, 1 layer,
    hidden 32, image 64, patch 8; ``mm_tokens_per_image`` 16 (8×8 patches pooled 2×2).
    Weights: transformers' init under ``torch.manual_seed(seed)``, ≥2-D non-embedding weights
    ×``weight_scale``; the (tied) embedding rows from the image token on are zero, so the
    random target, like a trained one, does not generate them. Also writes the tokenizer, ``Gemma3Processor`` files (image size 64,
    ``image_seq_length`` 16, no pan-and-scan) and ``generation_config.json``.
    Returns ``out_dir`` as a ``Path``.
    """
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor,
                              Gemma3Processor)

    out_dir = Path(out_dir)
    tokenizer = build_gemma3_tokenizer(out_dir)
    types = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    text = _text_config(vocab_size=TARGET_VOCAB_SIZE, hidden_size=hidden_size,
                        num_layers=num_layers, num_heads=2,
                        layer_types=[types[i % 4] for i in range(num_layers)])
    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 2, "num_channels": 3,
              "image_size": IMAGE_SIZE, "patch_size": 8, "hidden_act": "gelu_pytorch_tanh",
              "layer_norm_eps": 1e-6, "vision_use_head": False}
    config = Gemma3Config(text_config=text, vision_config=vision,
                          mm_tokens_per_image=MM_TOKENS_PER_IMAGE, boi_token_index=BOI_ID,
                          eoi_token_index=EOI_ID, image_token_index=IMAGE_TOKEN_ID,
                          pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID,
                          tie_word_embeddings=True)
    model = init_model(Gemma3ForConditionalGeneration, config, seed, dtype, weight_scale)
    with torch.no_grad():  # rows without a text token (image token, vocab padding) stay unused
        model.get_input_embeddings().weight[IMAGE_TOKEN_ID:] = 0
    model.save_pretrained(out_dir, safe_serialization=True)
    _fix_siglip_keys(out_dir)
    _write_generation_config(out_dir)
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
        image_seq_length=MM_TOKENS_PER_IMAGE)
    processor.save_pretrained(out_dir)
    return out_dir


def build_gemma3_text_lm(out_dir: str | Path, *, seed: int = 1, hidden_size: int = 128,
                         num_layers: int = 2, weight_scale: float = 4.0,
                         dtype: torch.dtype = torch.float32) -> Path:
    """Build a tiny random ``Gemma3ForCausalLM`` (``gemma3_text``; the stand-in for
    Gemma3-1B-it): vocab :data:`TEXT_VOCAB_SIZE` (no image token), ``hidden_size`` 128, 4 heads
    of 32, 2 KV heads, ``num_layers`` 2 (sliding, full), tied embeddings; the same tokenizer.
    Returns ``out_dir`` as a ``Path``."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    out_dir = Path(out_dir)
    build_gemma3_tokenizer(out_dir)
    types = ["sliding_attention", "full_attention"]
    config = Gemma3TextConfig(**_text_config(
        vocab_size=TEXT_VOCAB_SIZE, hidden_size=hidden_size, num_layers=num_layers, num_heads=4,
        layer_types=[types[i % 2] for i in range(num_layers)]))
    model = init_model(Gemma3ForCausalLM, config, seed, dtype, weight_scale)
    model.save_pretrained(out_dir, safe_serialization=True)
    _write_generation_config(out_dir)
    return out_dir


def gemma3_image_prompt(text: str, num_images: int = 1) -> str:
    """A Gemma3 chat prompt (generation prompt included) with ``num_images`` images first."""
    images = "<start_of_image>" * num_images
    return f"<bos><start_of_turn>user\n{images}{text}<end_of_turn>\n<start_of_turn>model\n"


def gemma3_text_prompt(text: str) -> str:
    """A Gemma3 chat prompt (generation prompt included) holding only ``text``."""
    return gemma3_image_prompt(text, 0)
