"""Deterministic builders of tiny local models for tests, the demo and benchmarks.

Nothing here touches the network or a model hub: every artefact is generated locally from fixed
seeds, so two builds with the same arguments produce byte-identical files.

* :func:`build_tokenizer` -- a 2048-entry byte-level BPE with Qwen2-VL's special tokens (ids 0..13)
  and a Qwen2-VL-style chat template.
* :func:`build_target` -- a tiny random ``Qwen2_5_VLForConditionalGeneration`` (the target VLM),
  saved with tokenizer, image/video processor and processor files so that
  ``AutoProcessor.from_pretrained`` and vLLM can load it.
* :func:`build_text_lm` -- a tiny random ``Qwen2ForCausalLM`` (the stand-in for an off-the-shelf
  small text LM that MASSV turns into a multimodal drafter).
* :func:`image_prompt` / :func:`text_prompt` -- chat-formatted prompt strings.
* :func:`sample_images` -- a fixed set of RGB test images of different sizes.
* :class:`ApiServer` -- vLLM's OpenAI-compatible server as a subprocess (start, wait for
  ``/health``, stop with its whole process group), for tests and ``benchmarks/serve_load.py``.

The Gemma3 family's tiny target and text LM are in :mod:`vllm_massv.testing.gemma3`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch


@contextlib.contextmanager
def scoped_env(env: dict[str, str]) -> Iterator[None]:
    """Set ``env`` in this process for the block (a vLLM engine started inside inherits it in its
    worker processes), then restore the previous values of those keys only."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

if TYPE_CHECKING:
    from PIL import Image
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = [
    "ApiServer",
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "ServerStartError",
    "vllm_script",
    "TOKENIZER_VOCAB_SIZE",
    "build_target",
    "build_text_lm",
    "build_tokenizer",
    "free_port",
    "image_prompt",
    "sample_images",
    "text_prompt",
]

#: Special tokens, in id order (``<|endoftext|>`` is id 0, ``<|video_pad|>`` is id 13).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_TOK_ID = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
PAD_TOKEN_ID = _TOK_ID["<|endoftext|>"]  # 0, also used as bos (as in Qwen2.5-VL)
EOS_TOKEN_ID = _TOK_ID["<|im_end|>"]  # 2
VISION_START_TOKEN_ID = _TOK_ID["<|vision_start|>"]  # 9
VISION_END_TOKEN_ID = _TOK_ID["<|vision_end|>"]  # 10
IMAGE_TOKEN_ID = _TOK_ID["<|image_pad|>"]  # 12
VIDEO_TOKEN_ID = _TOK_ID["<|video_pad|>"]  # 13

#: Total tokenizer vocabulary (special tokens + 256 bytes + BPE merges).
TOKENIZER_VOCAB_SIZE = 2048

#: Qwen2-VL's chat template (system prompt defaults to "You are a helpful assistant." when the
#: conversation has none; content is a string or a list of image/video/text items).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenisation regex: digits are split one by one.
_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2-VL image processor constants (OpenAI CLIP normalisation).
_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------

_SHAPES = (
    "circle square triangle rectangle oval star hexagon pentagon diamond cube sphere cone "
    "cylinder pyramid heart crescent arrow cross ring line dot curve spiral grid"
).split()
_COLOURS = (
    "red green blue yellow orange purple pink brown black white grey gray gold silver cyan "
    "magenta violet indigo teal maroon navy olive beige crimson turquoise"
).split()
_ANIMALS = (
    "cat dog bird fish horse cow sheep goat pig rabbit mouse lion tiger bear wolf fox deer "
    "zebra giraffe elephant monkey panda koala kangaroo owl eagle duck goose frog snake turtle "
    "whale dolphin shark octopus crab bee butterfly spider ant penguin camel donkey squirrel"
).split()
_NOUNS = (
    "picture image photo scene table chair window door house tree flower garden road car bus "
    "train boat plane street city river lake mountain beach sky cloud sun moon field forest "
    "wall floor room kitchen book cup plate bottle box ball kite hat shirt shoe bag clock lamp "
    "sign person man woman child girl boy group crowd corner center middle edge top bottom side "
    "background foreground left right number letter word answer question object pattern"
).split()
_ADJECTIVES = (
    "small large big tiny huge little round flat bright dark light pale shiny soft hard old new "
    "young happy quiet loud fast slow tall short long wide narrow thin thick empty full clear "
    "striped spotted wooden metal plastic glass heavy smooth rough warm cold wet dry"
).split()
_VERBS = (
    "is sits stands runs jumps flies swims walks sleeps eats looks holds shows has contains "
    "appears lies rests moves plays waits watches carries follows touches covers faces points"
).split()
_PREPOSITIONS = (
    "on in under above below near beside behind between inside outside next to across over "
    "around along against among"
).split()
_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty "
    "ninety hundred thousand first second third fourth fifth last several many few some"
).split()
_QUESTIONS = (
    "What is in the image?",
    "Describe the picture.",
    "How many objects are there?",
    "What colour is the shape?",
    "Which animal is on the left?",
    "Where is the {noun}?",
    "Is there a {colour} {shape}?",
    "Count the {animal}s.",
    "What is the {animal} doing?",
    "Describe this image in detail.",
)
_SYLLABLES = (
    "ka ro mi ne tu la sa po ve di zo ri ma ke lu bo na te fi go pa ru se ti vo me li da ni "
    "sto bre pla kri mon tar vel dor zen qua thi ghe shu"
).split()


def _corpus(num_sentences: int = 4000) -> list[str]:
    """Deterministic English-ish sentences about shapes, colours, numbers and animals."""
    rng = random.Random(0)

    def pick(words: list[str]) -> str:
        return rng.choice(words)

    def name() -> str:
        # Pseudo-words give the BPE enough distinct character sequences to fill its vocabulary.
        return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))).capitalize()

    def number() -> str:
        r = rng.random()
        if r < 0.4:
            return str(rng.randint(0, 100))
        if r < 0.7:
            return f"{rng.randint(0, 9999):,}"
        if r < 0.85:
            return f"{rng.uniform(0, 100):.{rng.randint(1, 3)}f}"
        return f"{rng.randint(1, 99)}%"

    def noun_phrase() -> str:
        kind = rng.random()
        if kind < 0.3:
            head = f"{pick(_COLOURS)} {pick(_SHAPES)}"
        elif kind < 0.6:
            head = f"{pick(_ADJECTIVES)} {pick(_ANIMALS)}"
        elif kind < 0.8:
            head = f"{pick(_ADJECTIVES)} {pick(_COLOURS)} {pick(_NOUNS)}"
        else:
            head = pick(_NOUNS)
        return f"{rng.choice(('the', 'a', 'one', 'this', 'that'))} {head}"

    templates = (
        lambda: (
            f"{noun_phrase().capitalize()} {pick(_VERBS)} {pick(_PREPOSITIONS)} {noun_phrase()}."
        ),
        lambda: (
            f"There are {pick(_NUMBER_WORDS)} {pick(_COLOURS)} {pick(_SHAPES)}s "
            f"{pick(_PREPOSITIONS)} {noun_phrase()}."
        ),
        lambda: f"I can see {number()} {pick(_ANIMALS)}s and {number()} {pick(_SHAPES)}s.",
        lambda: (
            f"{name()} the {pick(_ANIMALS)} {pick(_VERBS)} {pick(_PREPOSITIONS)} {noun_phrase()}!"
        ),
        lambda: (
            f"The {pick(_SHAPES)} at ({number()}, {number()}) is {pick(_COLOURS)}; "
            f"its size is {number()} by {number()}."
        ),
        lambda: rng.choice(_QUESTIONS).format(
            noun=pick(_NOUNS), colour=pick(_COLOURS), shape=pick(_SHAPES), animal=pick(_ANIMALS)
        ),
        lambda: (
            f"{pick(_NUMBER_WORDS).capitalize()} {pick(_ADJECTIVES)} {pick(_ANIMALS)}s, "
            f"{pick(_NUMBER_WORDS)} {pick(_COLOURS)} {pick(_SHAPES)}s - and {name()} {name()}."
        ),
        lambda: (
            f'"{name()}," said the {pick(_ANIMALS)}, "is {pick(_ADJECTIVES)} and {pick(_COLOURS)}."'
        ),
        lambda: (
            f"Answer: {number()}. Total = {number()} + {number()} * {number()} "
            f"[{pick(_COLOURS)}] <{pick(_SHAPES)}> #{rng.randint(0, 999)} @{name().lower()}"
        ),
        lambda: (
            f"In {rng.randint(1900, 2030)}, {name()} counted {number()} {pick(_ANIMALS)}s "
            f"{pick(_PREPOSITIONS)} the {pick(_NOUNS)}: {', '.join(pick(_COLOURS) for _ in range(3))}."
        ),
    )
    lines = []
    for _ in range(num_sentences):
        sentence = rng.choice(templates)()
        if rng.random() < 0.15:
            sentence = sentence + " " + rng.choice(templates)()
        lines.append(sentence)
    return lines


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def _train_tokenizer_object(corpus: list[str] | None = None, vocab_size: int = TOKENIZER_VOCAB_SIZE,
                            special_tokens: tuple[str, ...] = SPECIAL_TOKENS):
    """Train the byte-level BPE (``tokenizers.Tokenizer``) on ``corpus`` (default: the generic
    generated corpus), with exactly ``vocab_size`` entries; ``special_tokens`` take ids 0.."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus() if corpus is None else corpus, trainer=trainer)
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise RuntimeError(f"tokenizer vocab is {got}, expected {vocab_size}: the corpus has "
                           "too few distinct pairs; lower vocab_size or enlarge the corpus")
    for i, special in enumerate(special_tokens):
        if tok.token_to_id(special) != i:
            got = tok.token_to_id(special)
            raise RuntimeError(f"special token {special} got id {got}, not {i}")
    return tok


def _write_chat_template(out_dir: Path) -> None:
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    (out_dir / "chat_template.json").write_text(
        json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2) + "\n", encoding="utf-8"
    )
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_tokenizer(
    out_dir: str | Path,
    *,
    corpus: list[str] | None = None,
    vocab_size: int = TOKENIZER_VOCAB_SIZE,
) -> PreTrainedTokenizerFast:
    """Train and save the shared tiny tokenizer into ``out_dir``; return it.

    A byte-level BPE (Qwen2's pre-tokenisation regex, digits split individually) trained with the
    ``tokenizers`` library on ``corpus`` (default: a generic corpus generated with
    ``random.Random(0)``; the testbed passes its task text). The vocabulary has exactly
    ``vocab_size`` entries (default 2048; ``RuntimeError`` if the corpus cannot fill it); ids
    0..13 are :data:`SPECIAL_TOKENS` in order. ``eos`` is
    ``<|im_end|>`` (2), ``pad`` is ``<|endoftext|>`` (0), no bos is added to inputs (as in Qwen).

    Writes ``tokenizer.json``, ``tokenizer_config.json`` (with ``chat_template``),
    ``chat_template.jinja`` and ``chat_template.json``. Training is bit-for-bit deterministic.
    """
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer_object(corpus, vocab_size),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=4096,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        errors="replace",
        split_special_tokens=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    _write_chat_template(out_dir)
    return tokenizer


def _load_tokenizer(tokenizer_or_dir: PreTrainedTokenizerBase | str | Path) -> Any:
    if isinstance(tokenizer_or_dir, (str, Path)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer_or_dir))
    return tokenizer_or_dir


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _scale_weights(model: torch.nn.Module, factor: float = 4.0) -> None:
    """Multiply every >=2-D weight except the embeddings (token / patch) by ``factor``.

    Random init with ``initializer_range`` 0.02 gives near-uniform logits and flat, repetitive
    greedy output; larger weights make the tiny random models produce varied text.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name:
                param.mul_(factor)


def _init_model(
    model_cls: Any, config: Any, seed: int, dtype: torch.dtype, weight_scale: float = 4.0
) -> Any:
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    if weight_scale != 1.0:
        _scale_weights(model, weight_scale)
    model = model.to(dtype).eval()
    model.config.dtype = dtype
    return model


def _write_generation_config(out_dir: Path) -> None:
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
    _write_generation_config(out_dir)


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
    model = _init_model(Qwen2_5_VLForConditionalGeneration, config, seed, dtype, weight_scale)
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
    _write_chat_template(out_dir)


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
    model = _init_model(Qwen2ForCausalLM, config, seed, dtype, weight_scale)
    _save_model(model, out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------
# Prompts and images
# --------------------------------------------------------------------------------------------


def image_prompt(
    tokenizer_or_dir: PreTrainedTokenizerBase | str | Path,
    text: str,
    num_images: int = 1,
    image_first: bool = True,
) -> str:
    """Chat-formatted user prompt (with generation prompt) holding ``num_images`` images.

    Each image renders as ``<|vision_start|><|image_pad|><|vision_end|>`` (one pad; the processor
    expands it). With ``image_first`` the images come before ``text``; otherwise the text's first
    half (split at the middle word), then the images, then the rest. ``tokenizer_or_dir`` is a
    tokenizer with the chat template or a directory written by one of the builders.
    """
    tokenizer = _load_tokenizer(tokenizer_or_dir)
    images: list[dict[str, str]] = [{"type": "image"} for _ in range(num_images)]
    if image_first:
        content = images + [{"type": "text", "text": text}]
    else:
        words = text.split(" ")
        if len(words) >= 2:
            middle = len(words) // 2
            first, rest = " ".join(words[:middle]) + " ", " ".join(words[middle:])
        else:
            middle = len(text) // 2
            first, rest = text[:middle], text[middle:]
        content = [{"type": "text", "text": first}] + images + [{"type": "text", "text": rest}]
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def text_prompt(tokenizer_or_dir: PreTrainedTokenizerBase | str | Path, text: str) -> str:
    """Chat-formatted user prompt (with generation prompt) holding only ``text``."""
    tokenizer = _load_tokenizer(tokenizer_or_dir)
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def sample_images() -> dict[str, Image.Image]:
    """Deterministic RGB test images of different sizes (PIL sizes are width x height).

    ``red``: solid red 320x240; ``gradient``: 200x200 colour gradient; ``noise``: 150x250
    uniform noise from ``np.random.default_rng(0)``; ``astronaut``: ``skimage.data.astronaut()``
    resized to 224x224 (bicubic); ``chelsea``: ``skimage.data.chelsea()`` as is (451x300).
    """
    import numpy as np
    from PIL import Image

    images: dict[str, Image.Image] = {}
    images["red"] = Image.new("RGB", (320, 240), (255, 0, 0))

    ys, xs = np.mgrid[0:200, 0:200].astype(np.float64)
    gradient = np.stack(
        [xs / 199.0 * 255.0, ys / 199.0 * 255.0, (1.0 - (xs + ys) / 398.0) * 255.0], axis=-1
    )
    images["gradient"] = Image.fromarray(np.round(gradient).astype(np.uint8), mode="RGB")

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(250, 150, 3), dtype=np.uint8)
    images["noise"] = Image.fromarray(noise, "RGB")

    from skimage import data as skdata

    astronaut = Image.fromarray(np.ascontiguousarray(skdata.astronaut()), "RGB")
    images["astronaut"] = astronaut.resize((224, 224), Image.Resampling.BICUBIC)
    images["chelsea"] = Image.fromarray(np.ascontiguousarray(skdata.chelsea()), "RGB")
    return images




def build_stock_drafter(target_dir: str | Path, out_dir: str | Path) -> Path:
    """The target's language model as a plain `Qwen2ForCausalLM` draft (1-D RoPE, no `massv`
    block): what stock vLLM `draft_model` serves, with the sanity drafter's weights."""
    from vllm_massv.init_drafter import init_drafter
    from vllm_massv.speculators import SPECULATORS_KEYS

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
    from vllm_massv.init_drafter import init_drafter

    cache_dir = Path(cache_dir)
    paths = {"target": cache_dir / "target", "sanity": cache_dir / "massv-sanity",
             "stock": cache_dir / "stock-draft"}
    if all((p / "config.json").is_file() for p in paths.values()):
        return paths
    build_target(paths["target"])
    init_drafter(paths["target"], paths["target"], paths["sanity"], projector="identity")
    build_stock_drafter(paths["target"], paths["stock"])
    return paths


def vllm_encoder_cache(worker: Any) -> dict[str, torch.Tensor]:
    """The image embeddings a vLLM worker has cached (what the drafter is handed), by mm hash.

    Meant for `LLM.collective_rpc` (needs `VLLM_ALLOW_INSECURE_SERIALIZATION=1` in the engine's
    environment): CPU copies of `GPUModelRunner.encoder_cache`.
    """
    return {k: v.detach().cpu().clone() for k, v in worker.model_runner.encoder_cache.items()}


# --------------------------------------------------------------------------------------------
# OpenAI-compatible server (tests and benchmarks/serve_load.py)
# --------------------------------------------------------------------------------------------


class ServerStartError(RuntimeError):
    """The API server exited, or did not answer ``/health``, before it was ready."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def process_group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group (Linux ``/proc``)."""
    import os

    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def wait_group_gone(pgid: int, timeout: float) -> list[int]:
    """Wait up to ``timeout`` s for a process group to empty; return the PIDs still alive."""
    import time

    deadline = time.monotonic() + timeout
    while (left := process_group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def vllm_script() -> str:
    """Path of the `vllm` console script installed with this Python's vLLM.

    Raises:
        ServerStartError: there is none (vLLM installed without its scripts).
    """
    import shutil
    import sys

    found = shutil.which("vllm", path=str(Path(sys.executable).parent))
    if found is None:
        raise ServerStartError(
            f"no `vllm` script next to {sys.executable}; install vLLM with pip into this "
            "environment (or use `python -m vllm.entrypoints.openai.api_server --model ...`).")
    return found


class ApiServer:
    """vLLM's OpenAI-compatible server as a subprocess: ``vllm serve MODEL [--speculative-config
    SPEC] ARGS...`` on 127.0.0.1 (the `vllm` script next to this Python; on the CPU wheel it
    works through `vllm_massv.distribution`).

    The server runs in its own session (process group) with its output in ``log``. As a context
    manager it starts the server, waits until ``/health`` answers 200 (raising
    :class:`ServerStartError` with the log tail if the process exits first or ``startup_timeout``
    passes) and on exit stops it with :meth:`stop`: SIGTERM to the server's PID, SIGKILL after
    ``stop_timeout`` s, then SIGKILL to whatever is left of its process group.

    ``speculative_config`` is a dict (passed as inline JSON), inline JSON or the path of a JSON
    file. ``env`` is added to this process's environment (a ``None`` value unsets a variable);
    ``VLLM_CPU_KVCACHE_SPACE`` defaults to 1 (GiB, CPU builds only). ``cwd``: the server's
    working directory (relative model paths resolve there). ``model`` may be a MASSV
    drafter directory with a ``speculators_config`` (one-argument serving).

    Raises:
        ServerStartError: no `vllm` script is installed next to this Python.
    """

    def __init__(self, model: str | Path, args: list[str] | tuple[str, ...] = (), *,
                 speculative_config: dict[str, Any] | str | Path | None = None,
                 port: int | None = None, log: str | Path | None = None,
                 env: dict[str, str | None] | None = None, startup_timeout: float = 240.0,
                 stop_timeout: float = 30.0, cwd: str | Path | None = None) -> None:
        import tempfile

        self.model = str(model)
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        if log is None:
            log = Path(tempfile.mkdtemp(prefix="vllm-server-")) / "server.log"
        self.log = Path(log)
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.cmd = [vllm_script(), "serve", self.model, "--host", self.host,
                    "--port", str(self.port), *map(str, args)]
        if speculative_config is not None:
            spec = (json.dumps(speculative_config) if isinstance(speculative_config, dict)
                    else str(speculative_config))
            self.cmd += ["--speculative-config", spec]
        self.env = env
        self.cwd = cwd
        self.proc: Any = None  # subprocess.Popen once started

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log_tail(self, n: int = 80) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(lines[-n:])

    def start(self) -> ApiServer:
        """Spawn the server process (does not wait for it)."""
        import os
        import subprocess

        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for key, value in (self.env or {}).items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log_fh:
            self.proc = subprocess.Popen(self.cmd, stdout=log_fh, stderr=subprocess.STDOUT,
                                         env=env, stdin=subprocess.DEVNULL, cwd=self.cwd,
                                         start_new_session=True)
        return self

    def healthy(self, timeout: float = 2.0) -> bool:
        """True when ``GET /health`` answers 200 right now."""
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.url + "/health", timeout=timeout) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_ready(self) -> float:
        """Wait until ``/health`` answers 200; return the seconds waited.

        Raises:
            ServerStartError: the process exited first, or ``startup_timeout`` passed (the
                server is then left running; :meth:`stop` it).
        """
        import time

        t0 = time.monotonic()
        while time.monotonic() - t0 < self.startup_timeout:
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"server exited with status {self.proc.returncode} before it was ready; "
                    f"command: {' '.join(self.cmd)}\n--- server log tail ---\n{self.log_tail()}")
            if self.healthy():
                return time.monotonic() - t0
            time.sleep(1)
        raise ServerStartError(
            f"server not ready after {self.startup_timeout:.0f} s; command: "
            f"{' '.join(self.cmd)}\n--- server log tail ---\n{self.log_tail()}")

    def stop(self) -> int | None:
        """SIGTERM the server's PID, SIGKILL it after ``stop_timeout`` s, then kill what is left
        of its process group. Returns the server's exit status."""
        import os
        import signal
        import subprocess

        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if wait_group_gone(proc.pid, 10):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            wait_group_gone(proc.pid, 10)
        return proc.returncode

    def __enter__(self) -> ApiServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
