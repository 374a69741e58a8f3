"""The shared tiny tokenizer: a deterministic generated corpus, a byte-level BPE trained on it
with Qwen2-VL's special tokens (ids 0..13), and Qwen2-VL's chat template.

:func:`generic_corpus` and :func:`train_tokenizer_object` are also used by the Gemma3 builders
(:mod:`vllm_massv.testing.gemma3`), which lay out their own special tokens.

``tokenizers`` and transformers are imported inside the functions, so that importing
``vllm_massv.testing`` (the server harness, used by the benchmarks) does not load them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

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


def generic_corpus(num_sentences: int = 4000) -> list[str]:
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


def train_tokenizer_object(corpus: list[str] | None = None, vocab_size: int = TOKENIZER_VOCAB_SIZE,
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
    tok.train_from_iterator(generic_corpus() if corpus is None else corpus, trainer=trainer)
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise RuntimeError(f"tokenizer vocab is {got}, expected {vocab_size}: the corpus has "
                           "too few distinct pairs; lower vocab_size or enlarge the corpus")
    for i, special in enumerate(special_tokens):
        if tok.token_to_id(special) != i:
            got = tok.token_to_id(special)
            raise RuntimeError(f"special token {special} got id {got}, not {i}")
    return tok


def write_chat_template(out_dir: Path) -> None:
    """Write :data:`CHAT_TEMPLATE` as ``chat_template.jinja`` / ``.json`` and into the
    ``tokenizer_config.json`` already saved in ``out_dir``."""
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
        tokenizer_object=train_tokenizer_object(corpus, vocab_size),
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
    write_chat_template(out_dir)
    return tokenizer


def load_tokenizer(tokenizer_or_dir: PreTrainedTokenizerBase | str | Path) -> Any:
    """``tokenizer_or_dir`` itself, or the tokenizer saved in that directory."""
    if isinstance(tokenizer_or_dir, (str, Path)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer_or_dir))
    return tokenizer_or_dir
