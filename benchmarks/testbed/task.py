"""The testbed task: synthetic images whose answers need the image, with fixed held-out splits.

A seeded generator of small image-question samples for the CPU testbed of issue 4 (a Qwen2.5-VL
target trained on it, a blind text LM, MASSV drafters). Everything is pure Python + Pillow and
deterministic: the same seed gives byte-identical JSON and PNG files.

Scenes (:class:`Scene`, drawn by :func:`render`): a 140x140 light-grey canvas (5x5 merged image
tokens for Qwen2.5-VL) with 1-4 shapes (circle, square, triangle, star) in 5 well-separated colours
(red, green, blue, yellow, purple) and 2 sizes (small, big), each in one of 5 positions (top left,
top right, centre, bottom left, bottom right) with +-2 px jitter; shapes never overlap. 40% of the
scenes also carry a written word (3-4 capital letters) or a 1-2 digit number in a free position
(these scenes have at most 3 shapes), in Pillow's default font at 20 px.

Prompt kinds (:data:`KINDS`): ``describe``, ``count``, ``colour`` (asked only about a shape type
that is unique in the scene), ``where`` (about a unique colour + shape), ``read`` (only for scenes
with text), and text-only chat prompts (about 15%): ``spell``, ``count_from``, ``next``. Answers
are full sentences of 15-60 words, 2-3 templates per kind picked by the seeded RNG (the templates
also vary "big"/"large" and "centre"/"middle"); every template of a sample mentions the same
attributes in the same order, so :func:`score` can give per-attribute credit for any of them.

Splits (:func:`build_splits`): each split draws from its own seed stream and keeps only the
samples whose key (the canonical scene key, ignoring jitter, for image samples; the question's
parameters for text-only ones) hashes into that split's share of the key space (80/10/10), so
val/test scenes never appear in train whatever the split sizes. Writes LLaVA-style
``{train,val,test}.json`` (readable by ``training.data.read_llava_json``), the PNGs under
``images/<split>/``, ``metadata.jsonl`` (kind, scene, answer variants: everything scoring needs;
:func:`load_split` reads it back) and ``info.json``.

CLI: ``python benchmarks/testbed/task.py --out DIR --train N --val N --test N --seed S``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "COLOURS",
    "IMAGE_KINDS",
    "IMAGE_WORDS",
    "IMAGE_SIZE",
    "KINDS",
    "KIND_ATTRS",
    "KIND_PRIMARY",
    "KIND_WEIGHTS",
    "MAX_WORDS",
    "MIN_WORDS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "TEXT_KINDS",
    "Sample",
    "Scene",
    "Shape",
    "build_splits",
    "corpus",
    "correct",
    "exact_match",
    "extract",
    "generate_split",
    "image_path",
    "llava_entry",
    "load_split",
    "make_sample",
    "messages",
    "object_masks",
    "render",
    "sample_scene",
    "score",
    "split_of",
]

#: Bumped whenever the generated data changes for a given seed.
VERSION = 1

# ----------------------------------------------------------------------------------------------
# Scene vocabulary and geometry
# ----------------------------------------------------------------------------------------------

IMAGE_SIZE = 140
BACKGROUND = (224, 224, 224)
TEXT_FILL = (30, 30, 30)
SHAPES = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 200, 20),
    "purple": (145, 55, 195),
}
#: Nominal radius in pixels (a circle's radius; the other shapes are scaled to look as large).
SIZES: dict[str, int] = {"small": 12, "big": 22}
#: Position names in reading order; a scene's shapes are listed in this order.
POSITIONS = ("top left", "top right", "centre", "bottom left", "bottom right")
SLOT_XY = ((30, 30), (110, 30), (70, 70), (30, 110), (110, 110))
# Shape extents relative to the nominal radius (chosen so that no two objects touch, whatever the
# positions and jitter; tests/unit/test_testbed_task.py checks every worst case).
SQUARE_HALF = 0.75
TRIANGLE_HALF_WIDTH = 0.92
TRIANGLE_HEIGHT = 1.65
STAR_OUTER = 1.1
JITTER = 2
MAX_SHAPES = 4
MAX_SHAPES_WITH_TEXT = 3
SHAPE_COUNT_WEIGHTS = (0.2, 0.3, 0.3, 0.2)  # 1, 2, 3, 4 shapes
TEXT_PROB = 0.4
NUMBER_TEXT_PROB = 0.5
FONT_SIZE = 20
#: Words written into images (none is a word the answers use otherwise; at most 50 px wide).
IMAGE_WORDS = (
    "CAT", "DOG", "SUN", "BOX", "CUP", "HAT", "KEY", "BUS", "MAP", "PEN", "SEA", "ZOO",
    "FISH", "BIRD", "TREE", "MILK", "KITE", "SHIP", "RAIN", "BELL",
)
IMAGE_NUMBERS = (1, 99)
#: Words for the text-only "spell" prompts.
SPELL_WORDS = (
    "apple", "house", "water", "green", "table", "chair", "river", "light", "music", "happy",
    "plant", "bread", "cloud", "train", "horse", "mouse", "paper", "stone", "smile", "dream",
    "garden", "window", "yellow", "purple", "circle", "square", "orange", "number", "summer",
    "winter", "planet", "flower", "bottle", "basket", "pencil", "rabbit", "castle", "forest",
    "guitar", "island", "kitten", "ladder", "market", "pocket", "rocket", "silver", "ticket",
    "tomato", "violin", "wizard", "cat", "dog", "sun", "box", "tree", "moon", "star", "fish",
    "bird", "book",
)

IMAGE_KINDS = ("describe", "count", "colour", "where", "read")
TEXT_KINDS = ("spell", "count_from", "next")
KINDS = IMAGE_KINDS + TEXT_KINDS
#: Share of each kind in a split (text-only kinds together 15%; long image answers weigh most).
KIND_WEIGHTS: dict[str, float] = {
    "describe": 0.34, "count": 0.12, "colour": 0.14, "where": 0.14, "read": 0.11,
    "spell": 0.05, "count_from": 0.05, "next": 0.05,
}
#: Attributes :func:`score` checks per kind (``describe``/``count``: in order, the others as sets).
KIND_ATTRS: dict[str, tuple[str, ...]] = {
    "describe": ("count", "shape", "colour", "size", "position", "text"),
    "count": ("count", "shape", "colour", "size"),
    "colour": ("colour", "shape", "size", "position"),
    "where": ("position", "colour", "shape", "size"),
    "read": ("text", "position"),
    "spell": ("answer",),
    "count_from": ("answer",),
    "next": ("answer",),
}
#: The attribute a kind asks about.
KIND_PRIMARY = {"describe": "all", "count": "count", "colour": "colour", "where": "position",
                "read": "text", "spell": "answer", "count_from": "answer", "next": "answer"}
_ORDERED_KINDS = ("describe", "count")

#: Every answer template gives between MIN_WORDS and MAX_WORDS whitespace-separated words.
MIN_WORDS, MAX_WORDS = 15, 60
SPLITS = ("train", "val", "test")
SPLIT_SHARES = {"train": 0.8, "val": 0.1, "test": 0.1}
IMAGE_MARKER = "<image>"

_NUM_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
              "ten", "eleven", "twelve")
_ORDINALS = ("first", "second", "third", "fourth")


@dataclass(frozen=True)
class Shape:
    """One shape: its type, colour, size name, position index (into POSITIONS) and pixel centre."""

    type: str
    colour: str
    size: str
    slot: int
    x: int
    y: int

    @property
    def position(self) -> str:
        return POSITIONS[self.slot]


@dataclass(frozen=True)
class Scene:
    """Shapes (sorted by position) and an optional text (a word or a number) at ``text_slot``."""

    shapes: tuple[Shape, ...]
    text: str | None = None
    text_slot: int | None = None
    text_x: int = 0
    text_y: int = 0

    @property
    def key(self) -> str:
        """Canonical key: equal for two scenes that differ only in jitter."""
        parts = [f"{s.slot}:{s.type}:{s.colour}:{s.size}" for s in self.shapes]
        if self.text is not None:
            parts.append(f"text:{self.text}@{self.text_slot}")
        return "|".join(parts)

    @property
    def text_is_number(self) -> bool:
        return self.text is not None and self.text.isdigit()

    def to_dict(self) -> dict[str, Any]:
        return {
            "shapes": [{"type": s.type, "colour": s.colour, "size": s.size,
                        "position": s.position, "slot": s.slot, "x": s.x, "y": s.y}
                       for s in self.shapes],
            "text": self.text,
            "text_position": None if self.text_slot is None else POSITIONS[self.text_slot],
            "text_slot": self.text_slot, "text_x": self.text_x, "text_y": self.text_y,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        shapes = tuple(Shape(s["type"], s["colour"], s["size"], int(s["slot"]), int(s["x"]),
                             int(s["y"])) for s in d["shapes"])
        return cls(shapes, d.get("text"), d.get("text_slot"), int(d.get("text_x", 0)),
                   int(d.get("text_y", 0)))


@dataclass
class Sample:
    """One prompt with its reference answer.

    ``scene`` is None for text-only prompts. ``answer_variants`` holds every template's answer
    (``answer`` is one of them). ``key`` decides the split (scene key, or the text question's
    parameters). ``target`` is the index in ``scene.shapes`` of the shape a ``colour``/``where``
    question is about; ``params`` the parameters of a text-only question.
    """

    id: str
    kind: str
    scene: Scene | None
    prompt: str
    answer: str
    answer_variants: list[str]
    key: str
    target: int | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def has_image(self) -> bool:
        return self.scene is not None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "key": self.key, "prompt": self.prompt,
                "answer": self.answer, "answer_variants": list(self.answer_variants),
                "target": self.target, "params": dict(self.params),
                "scene": None if self.scene is None else self.scene.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sample:
        scene = None if d.get("scene") is None else Scene.from_dict(d["scene"])
        return cls(d["id"], d["kind"], scene, d["prompt"], d["answer"],
                   list(d["answer_variants"]), d["key"], d.get("target"),
                   dict(d.get("params") or {}))


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _font() -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=FONT_SIZE)  # FreeType build of Pillow >= 10.1
    except (TypeError, ImportError, OSError):  # pragma: no cover - Pillow without FreeType
        return ImageFont.load_default()


def _star_points(x: float, y: float, r: float) -> list[tuple[float, float]]:
    outer = STAR_OUTER * r
    inner = 0.45 * outer
    pts = []
    for i in range(10):
        rad = outer if i % 2 == 0 else inner
        angle = -math.pi / 2 + i * math.pi / 5
        pts.append((round(x + rad * math.cos(angle), 2), round(y + rad * math.sin(angle), 2)))
    return pts


def _draw_shape(draw: Any, s: Shape, fill: Any) -> None:
    r = SIZES[s.size]
    x, y = s.x, s.y
    if s.type == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif s.type == "square":
        h = round(SQUARE_HALF * r)
        draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
    elif s.type == "triangle":
        height, half = round(TRIANGLE_HEIGHT * r), round(TRIANGLE_HALF_WIDTH * r)
        top = y - height // 2
        bottom = top + height
        draw.polygon([(x, top), (x + half, bottom), (x - half, bottom)], fill=fill)
    elif s.type == "star":
        draw.polygon(_star_points(x, y, r), fill=fill)
    else:
        raise ValueError(f"unknown shape type {s.type!r}")


def _draw_text(draw: Any, scene: Scene, fill: Any) -> None:
    font = _font()
    left, top, right, bottom = draw.textbbox((0, 0), scene.text, font=font)
    w, h = right - left, bottom - top
    draw.text((scene.text_x - w // 2 - left, scene.text_y - h // 2 - top), scene.text,
              font=font, fill=fill)


def render(scene: Scene) -> Image.Image:
    """The scene as a 140x140 RGB image (deterministic)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        _draw_shape(draw, s, COLOURS[s.colour])
    if scene.text is not None:
        _draw_text(draw, scene, TEXT_FILL)
    return img


def object_masks(scene: Scene) -> list[Image.Image]:
    """One binary ("L", 0/255) mask per shape, then one for the text if any (for overlap checks)."""
    from PIL import Image, ImageDraw

    masks = []
    for s in scene.shapes:
        m = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        _draw_shape(ImageDraw.Draw(m), s, 255)
        masks.append(m)
    if scene.text is not None:
        m = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        _draw_text(ImageDraw.Draw(m), scene, 255)
        masks.append(m.point(lambda v: 255 if v else 0))
    return masks


# ----------------------------------------------------------------------------------------------
# Sampling scenes
# ----------------------------------------------------------------------------------------------


def _jittered(rng: random.Random, slot: int) -> tuple[int, int]:
    x, y = SLOT_XY[slot]
    return x + rng.randint(-JITTER, JITTER), y + rng.randint(-JITTER, JITTER)


def sample_scene(rng: random.Random, *, text: bool | None = None,
                 n_shapes: int | None = None) -> Scene:
    """A random scene. ``text``: force a written word/number on (True) or off (False);
    ``n_shapes``: force the number of shapes."""
    has_text = rng.random() < TEXT_PROB if text is None else bool(text)
    max_n = MAX_SHAPES_WITH_TEXT if has_text else MAX_SHAPES
    if n_shapes is None:
        n_shapes = rng.choices(range(1, max_n + 1), weights=SHAPE_COUNT_WEIGHTS[:max_n])[0]
    if not 1 <= n_shapes <= max_n:
        raise ValueError(f"n_shapes must be 1..{max_n}, got {n_shapes}")
    slots = rng.sample(range(len(POSITIONS)), n_shapes + has_text)
    shapes = []
    for slot in sorted(slots[:n_shapes]):
        kind, colour, size = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES))
        x, y = _jittered(rng, slot)
        shapes.append(Shape(kind, colour, size, slot, x, y))
    if not has_text:
        return Scene(tuple(shapes))
    if rng.random() < NUMBER_TEXT_PROB:
        content = str(rng.randint(*IMAGE_NUMBERS))
    else:
        content = rng.choice(IMAGE_WORDS)
    tx, ty = _jittered(rng, slots[-1])
    return Scene(tuple(shapes), content, slots[-1], tx, ty)


# ----------------------------------------------------------------------------------------------
# Answers
# ----------------------------------------------------------------------------------------------


def _list(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


class _Style:
    """Per-template wording: "big" or "large", "centre" or "middle"."""

    def __init__(self, t: int) -> None:
        self.big = "large" if t == 1 else "big"
        self.centre = "middle" if t == 1 else "centre"

    def size(self, s: Shape) -> str:
        return self.big if s.size == "big" else "small"

    def noun(self, slot: int) -> str:
        return self.centre if slot == 2 else POSITIONS[slot]

    def at(self, slot: int) -> str:
        return f"in the {self.centre}" if slot == 2 else f"at the {POSITIONS[slot]}"

    def np(self, s: Shape) -> str:
        return f"a {self.size(s)} {s.colour} {s.type}"


def _shapes_word(n: int) -> str:
    return f"{_NUM_WORDS[n]} shape" if n == 1 else f"{_NUM_WORDS[n]} shapes"


def _spelled(word: str) -> str:
    return "-".join(word)


def _describe(scene: Scene, t: int) -> str:
    st, shapes, n = _Style(t), scene.shapes, len(scene.shapes)
    is_are = "is" if n == 1 else "are"
    text, tslot = scene.text, scene.text_slot
    parts: list[str] = []
    if t == 0:
        extra = "" if text is None else (" and a number" if scene.text_is_number else " and a word")
        parts.append(f"I see {_shapes_word(n)}{extra}.")
        for i, s in enumerate(shapes):
            lead = "It is" if n == 1 else f"The {_ORDINALS[i]} is"
            parts.append(f"{lead} {st.np(s)} {st.at(s.slot)}.")
        if text is not None:
            what = f"number {text}" if scene.text_is_number else f'word "{text}"'
            parts.append(f"The {what} is written {st.at(tslot)}.")
        parts.append("The rest is plain light grey.")
    elif t == 1:
        extra = "" if text is None else ", and there is some writing"
        parts.append(f"There {is_are} {_shapes_word(n)} in the image{extra}.")
        for s in shapes:
            parts.append(f"{_cap(st.at(s.slot))} there is {st.np(s)}.")
        if text is not None:
            what = f"number {text}" if scene.text_is_number else f'word "{text}"'
            parts.append(f"{_cap(st.at(tslot))} the {what} is written.")
        parts.append("The background is light grey.")
    else:
        extra = "" if text is None else " and some text"
        parts.append(f"The image shows {_shapes_word(n)}{extra}.")
        for s in shapes:
            parts.append(f"A {s.type}, {st.size(s)} and {s.colour}, sits {st.at(s.slot)}.")
        if text is not None:
            if scene.text_is_number:
                parts.append(f"There is also a number {st.at(tslot)}: it is {text}.")
            else:
                parts.append(f'There is also text {st.at(tslot)}: it says "{text}".')
        parts.append("Nothing else is in the picture.")
    return " ".join(parts)


def _count(scene: Scene, t: int) -> str:
    st, n = _Style(t), len(scene.shapes)
    items = _list([st.np(s) for s in scene.shapes])
    is_are = "is" if n == 1 else "are"
    if t == 0:
        return (f"There {is_are} {_shapes_word(n)} in the image. I can see {items}. "
                f"So the answer is {_NUM_WORDS[n]}.")
    if t == 1:
        return (f"I count {_shapes_word(n)} in this picture: {items}. "
                f"That makes {_shapes_word(n)} altogether.")
    they = "It is" if n == 1 else "They are"
    return (f"The image contains {_shapes_word(n)}. {they} {items}. "
            f"Counting them gives a total of {_NUM_WORDS[n]}.")


def _colour(s: Shape, t: int) -> str:
    st = _Style(t)
    if t == 0:
        return (f"The {s.type} is {s.colour}. It is a {st.size(s)} {s.type}, and you can find it "
                f"{st.at(s.slot)} of the image.")
    if t == 1:
        return (f"It is {s.colour}. The only {s.type} in the picture is {st.size(s)} and "
                f"{s.colour}, and it sits {st.at(s.slot)}.")
    return (f"That {s.type} is {s.colour}. Looking at the {st.noun(s.slot)} of the image, you can "
            f"see the {st.size(s)} {s.colour} {s.type}.")


def _where(s: Shape, t: int) -> str:
    st = _Style(t)
    if t == 0:
        return (f"The {s.colour} {s.type} is {st.at(s.slot)} of the image. "
                f"It is a {st.size(s)} {s.type}.")
    if t == 1:
        return (f"You can find the {s.colour} {s.type} {st.at(s.slot)}. It is {st.size(s)}, and "
                f"it is the only {s.colour} {s.type} in the picture.")
    return (f"It is {st.at(s.slot)}. Look there and you will see {st.np(s)}, "
            f"the only one of its kind.")


def _read(scene: Scene, t: int) -> str:
    text, at = scene.text, _Style(t).at(scene.text_slot)
    if scene.text_is_number:
        if t == 0:
            return (f"The number written in the image is {text}. It is written in dark digits "
                    f"{at} of the image.")
        if t == 1:
            return (f"It is the number {text}. You can read it {at} of the picture, written in "
                    f"dark digits.")
        return f"{_cap(at)} of the image there is a number written in dark digits. It reads {text}."
    if t == 0:
        return f'The text says "{text}". It is written in dark capital letters {at} of the image.'
    if t == 1:
        return (f'The word in the image is "{text}", spelled {_spelled(text)}. '
                f"You can read it {at} of the picture.")
    return (f"{_cap(at)} of the image there is a word written in dark capital letters. "
            f'It reads "{text}".')


def _spell(word: str, t: int) -> str:
    n = _NUM_WORDS[len(word)]
    if t == 0:
        return (f"The word {word} has {n} letters. Spelled out, it is {_spelled(word)}. "
                f"It starts with {word[0]} and ends with {word[-1]}.")
    return (f"Sure, here it is letter by letter: {_spelled(word)}. The word {word} has {n} "
            f"letters, starting with {word[0]} and ending with {word[-1]}.")


def _count_from(a: int, b: int, t: int) -> str:
    seq = ", ".join(str(i) for i in range(a, b + 1))
    if t == 0:
        return f"Counting from {a} to {b}: {seq}. That is {b - a + 1} numbers in total."
    return f"Sure. Here are the numbers from {a} to {b}: {seq}. The last number is {b}."


def _next(n: int, t: int) -> str:
    if t == 0:
        return (f"The number after {n} is {n + 1}. Adding one to {n} gives {n + 1}, and the number "
                f"after that is {n + 2}.")
    return (f"{n + 1} comes right after {n}. Counting on from {n}, you get {n + 1}, then {n + 2}, "
            f"then {n + 3}.")


_PROMPTS: dict[str, tuple[str, ...]] = {
    "describe": ("Describe the image.", "What do you see?", "What is in this picture?"),
    "count": ("How many shapes are there?", "Count the shapes in the image.",
              "How many shapes can you see?"),
    "colour": ("What colour is the {type}?", "Which colour does the {type} have?"),
    "where": ("Where is the {colour} {type}?",
              "In which part of the image is the {colour} {type}?"),
    "read_word": ("What does the text say?", "What word is written in the image?"),
    "read_number": ("What does the text say?", "What number is written?"),
    "spell": ("Spell the word {word}.", "How do you spell {word}?"),
    "count_from": ("Count from {a} to {b}.", "Please count from {a} up to {b}."),
    "next": ("What number comes after {n}?", "Which number follows {n}?"),
}
_N_TEMPLATES = {"describe": 3, "count": 3, "colour": 3, "where": 3, "read": 3,
                "spell": 2, "count_from": 2, "next": 2}


# ----------------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------------


def _unique_by(shapes: Sequence[Shape], key: Callable[[Shape], Any]) -> list[int]:
    counts = Counter(key(s) for s in shapes)
    return [i for i, s in enumerate(shapes) if counts[key(s)] == 1]


def _variants(kind: str, scene: Scene | None, target: int | None,
              params: dict[str, Any]) -> list[str]:
    n = _N_TEMPLATES[kind]
    if kind == "describe":
        return [_describe(scene, t) for t in range(n)]
    if kind == "count":
        return [_count(scene, t) for t in range(n)]
    if kind == "colour":
        return [_colour(scene.shapes[target], t) for t in range(n)]
    if kind == "where":
        return [_where(scene.shapes[target], t) for t in range(n)]
    if kind == "read":
        return [_read(scene, t) for t in range(n)]
    if kind == "spell":
        return [_spell(params["word"], t) for t in range(n)]
    if kind == "count_from":
        return [_count_from(params["a"], params["b"], t) for t in range(n)]
    if kind == "next":
        return [_next(params["n"], t) for t in range(n)]
    raise ValueError(f"unknown kind {kind!r}")


def make_sample(rng: random.Random, kind: str | None = None, *, sample_id: str = "",
                accept: Callable[[str], bool] | None = None, max_tries: int = 100_000) -> Sample:
    """A random sample of ``kind`` (drawn with :data:`KIND_WEIGHTS` when None).

    ``accept(key)`` filters candidates (the split assignment); candidates are drawn until one
    is accepted. The scene is drawn so that the question makes sense: ``colour`` needs a shape
    type that is unique in the scene, ``where`` a unique colour + type, ``read`` a text.
    """
    if kind is None:
        kind = rng.choices(KINDS, weights=[KIND_WEIGHTS[k] for k in KINDS])[0]
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    for _ in range(max_tries):
        scene: Scene | None = None
        target: int | None = None
        params: dict[str, Any] = {}
        if kind in IMAGE_KINDS:
            scene = sample_scene(rng, text=True if kind == "read" else None)
            if kind == "colour":
                eligible = _unique_by(scene.shapes, lambda s: s.type)
            elif kind == "where":
                eligible = _unique_by(scene.shapes, lambda s: (s.type, s.colour))
            else:
                eligible = None
            if eligible is not None:
                if not eligible:
                    continue
                target = rng.choice(eligible)
            key = scene.key
        elif kind == "spell":
            params = {"word": rng.choice(SPELL_WORDS)}
            key = f"spell:{params['word']}"
        elif kind == "count_from":
            a = rng.randint(1, 30)
            params = {"a": a, "b": a + rng.randint(4, 10)}
            key = f"count_from:{params['a']}:{params['b']}"
        else:
            params = {"n": rng.randint(0, 199)}
            key = f"next:{params['n']}"
        if accept is not None and not accept(key):
            continue
        if kind == "read":
            prompts = _PROMPTS["read_number" if scene.text_is_number else "read_word"]
        else:
            prompts = _PROMPTS[kind]
        fmt: dict[str, Any] = dict(params)
        if target is not None:
            fmt.update(type=scene.shapes[target].type, colour=scene.shapes[target].colour)
        prompt = rng.choice(prompts).format(**fmt)
        variants = _variants(kind, scene, target, params)
        answer = variants[rng.randrange(len(variants))]
        sample = Sample(sample_id, kind, scene, prompt, answer, variants, key, target, params)
        _check_variants(sample)
        return sample
    raise RuntimeError(f"no acceptable {kind} sample after {max_tries} tries")


def _check_variants(sample: Sample) -> None:
    """Every template must pass the length band and extract to the same attributes."""
    ref = extract(sample.answer_variants[0], sample.kind)
    for v in sample.answer_variants:
        n = len(v.split())
        if not MIN_WORDS <= n <= MAX_WORDS:
            raise AssertionError(f"{sample.kind} answer of {n} words: {v!r}")
        if sample.kind in IMAGE_KINDS and extract(v, sample.kind) != ref:
            raise AssertionError(f"templates of a {sample.kind} answer disagree: "
                                 f"{sample.answer_variants!r}")


def messages(sample: Sample) -> list[dict[str, Any]]:
    """The user turn as chat messages (an image item first for image prompts)."""
    content: list[dict[str, Any]] = [{"type": "image"}] if sample.has_image else []
    content.append({"type": "text", "text": sample.prompt})
    return [{"role": "user", "content": content}]


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------

_QUOTED = re.compile(r'"([^"]*)"')
_COUNT_RE = re.compile(r"\b(" + "|".join(_NUM_WORDS) + r"|\d+) shapes?\b")
_SHAPE_RE = re.compile(r"\b(" + "|".join(SHAPES) + r")s?\b")
_COLOUR_RE = re.compile(r"\b(" + "|".join(COLOURS) + r")\b")
_SIZE_RE = re.compile(r"\b(big|large|small|little)\b")
_POSITION_RE = re.compile(
    r"\b(top left|top right|bottom left|bottom right|centre|center|middle)\b")
_TEXT_RE = re.compile(r'"([^"]*)"|\b(\d+)\b')
_SIZE_NORM = {"large": "big", "little": "small"}
_POS_NORM = {"center": "centre", "middle": "centre"}


def _normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


def extract(text: str, kind: str) -> dict[str, Any]:
    """The attributes an answer of ``kind`` states, as :func:`score` compares them.

    ``describe``/``count``: tuples in order of mention; ``colour``/``where``/``read``: frozensets.
    ``count`` is the number before the first "shape(s)" (None if absent); ``text`` the quoted
    strings (upper-cased) and digit runs. Text-only kinds: ``answer`` is the normalised text.
    """
    if kind in TEXT_KINDS:
        return {"answer": _normalise(text)}
    text = " ".join(text.split())
    unquoted = _QUOTED.sub(" ", text).lower()
    values: dict[str, list[Any]] = {
        "shape": _SHAPE_RE.findall(unquoted),
        "colour": _COLOUR_RE.findall(unquoted),
        "size": [_SIZE_NORM.get(w, w) for w in _SIZE_RE.findall(unquoted)],
        "position": [_POS_NORM.get(w, w) for w in _POSITION_RE.findall(unquoted)],
        "text": [q.strip().upper() if d == "" else d for q, d in _TEXT_RE.findall(text)],
    }
    m = _COUNT_RE.search(unquoted)
    count = None if m is None else (int(m.group(1)) if m.group(1).isdigit()
                                    else _NUM_WORDS.index(m.group(1)))
    out: dict[str, Any] = {}
    for attr in KIND_ATTRS[kind]:
        if attr == "count":
            out[attr] = count
        elif kind in _ORDERED_KINDS:
            out[attr] = tuple(values[attr])
        else:
            out[attr] = frozenset(values[attr])
    return out


def score(sample: Sample, text: str) -> dict[str, bool]:
    """Per-attribute credit: ``{attr: generated text states it as the reference does}``.

    Image kinds compare :func:`extract` of ``text`` with that of the reference answer (so any
    wording works as long as the same attributes are stated: describe/count in the same order,
    the single-shape kinds as sets, and stating a wrong extra value fails). Text-only kinds have
    one attribute, ``answer``: an exact match (whitespace/case-normalised) with a template.
    """
    if sample.kind in TEXT_KINDS:
        return {"answer": exact_match(sample, text)}
    ref = extract(sample.answer, sample.kind)
    got = extract(text, sample.kind)
    return {attr: got[attr] == ref[attr] for attr in KIND_ATTRS[sample.kind]}


def correct(sample: Sample, text: str) -> bool:
    """Every attribute of :func:`score` right."""
    return all(score(sample, text).values())


def exact_match(sample: Sample, text: str) -> bool:
    """``text`` equals one of the answer templates (whitespace- and case-normalised)."""
    got = _normalise(text)
    return any(got == _normalise(v) for v in sample.answer_variants)


# ----------------------------------------------------------------------------------------------
# Splits and files
# ----------------------------------------------------------------------------------------------


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def split_of(key: str, seed: int = 0) -> str:
    """The split a sample key belongs to: a seeded hash into 80% train / 10% val / 10% test."""
    u = _hash64(f"testbed-split\x00{seed}\x00{key}") / 2**64
    acc = 0.0
    for split in SPLITS:
        acc += SPLIT_SHARES[split]
        if u < acc:
            return split
    return SPLITS[-1]


def _split_rng(seed: int, stream: str) -> random.Random:
    return random.Random(_hash64(f"testbed-rng\x00{seed}\x00{stream}"))


def _kind_schedule(n: int, rng: random.Random) -> list[str]:
    """Exactly round(weight * n) samples per kind (largest remainder), in a seeded random order."""
    total = sum(KIND_WEIGHTS.values())
    quotas = {k: n * KIND_WEIGHTS[k] / total for k in KINDS}
    counts = {k: int(q) for k, q in quotas.items()}
    by_remainder = sorted(KINDS, key=lambda k: (-(quotas[k] - counts[k]), KINDS.index(k)))
    for k in by_remainder[: n - sum(counts.values())]:
        counts[k] += 1
    schedule = [k for k in KINDS for _ in range(counts[k])]
    rng.shuffle(schedule)
    return schedule


def generate_split(split: str, n: int, seed: int = 0) -> list[Sample]:
    """The ``n`` samples of ``split`` (ids ``<split>-00000``...), without writing anything."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    rng = _split_rng(seed, split)
    accept = lambda key: split_of(key, seed) == split  # noqa: E731
    return [make_sample(rng, kind, sample_id=f"{split}-{i:05d}", accept=accept)
            for i, kind in enumerate(_kind_schedule(n, rng))]


def _png_bytes(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.exists() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _json_bytes(obj: Any, indent: int | None = 1) -> bytes:
    return (json.dumps(obj, indent=indent, ensure_ascii=False) + "\n").encode("utf-8")


def image_path(sample: Sample) -> str | None:
    """Where :func:`build_splits` puts the sample's PNG, relative to its output folder."""
    if not sample.has_image:
        return None
    return f"images/{sample.id.split('-')[0]}/{sample.id}.png"


def llava_entry(sample: Sample) -> dict[str, Any]:
    """The sample as a LLaVA conversation entry (``<image>\\n`` before image prompts)."""
    entry: dict[str, Any] = {"id": sample.id}
    rel = image_path(sample)
    if rel is not None:
        entry["image"] = rel
    human = f"{IMAGE_MARKER}\n{sample.prompt}" if rel is not None else sample.prompt
    entry["conversations"] = [{"from": "human", "value": human},
                              {"from": "gpt", "value": sample.answer}]
    return entry


def build_splits(out_dir: str | Path, *, seed: int = 0, n_train: int, n_val: int,
                 n_test: int) -> dict[str, list[Sample]]:
    """Generate the three splits and write them under ``out_dir``; return the samples by split.

    Files: ``{train,val,test}.json`` (LLaVA conversations; image paths relative to ``out_dir``),
    ``images/<split>/<id>.png``, ``metadata.jsonl`` (one :meth:`Sample.to_dict` per line plus
    ``split`` and ``image``, train then val then test) and ``info.json``. Files whose bytes are
    unchanged are not rewritten; stale PNGs of a previous, larger build are removed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    splits = {split: generate_split(split, sizes[split], seed) for split in SPLITS}
    meta_lines = []
    for split, samples in splits.items():
        img_dir = out / "images" / split
        wanted = set()
        for sample in samples:
            rel = image_path(sample)
            if rel is not None:
                _write_if_changed(out / rel, _png_bytes(render(sample.scene)))
                wanted.add(Path(rel).name)
            meta_lines.append(json.dumps({"split": split, "image": rel, **sample.to_dict()},
                                         ensure_ascii=False))
        if img_dir.is_dir():
            for stale in img_dir.glob(f"{split}-*.png"):
                if stale.name not in wanted:
                    stale.unlink()
        _write_if_changed(out / f"{split}.json", _json_bytes([llava_entry(s) for s in samples]))
    _write_if_changed(out / "metadata.jsonl", ("\n".join(meta_lines) + "\n").encode("utf-8"))
    info = {"generator": "benchmarks/testbed/task.py", "version": VERSION, "seed": seed,
            "image_size": IMAGE_SIZE, "sizes": sizes,
            "kinds": {split: dict(sorted(Counter(s.kind for s in samples).items()))
                      for split, samples in splits.items()}}
    _write_if_changed(out / "info.json", _json_bytes(info, indent=2))
    return splits


def load_split(out_dir: str | Path, split: str) -> list[Sample]:
    """The samples of one split, read back from ``out_dir/metadata.jsonl``."""
    samples = []
    with (Path(out_dir) / "metadata.jsonl").open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                if d["split"] == split:
                    samples.append(Sample.from_dict(d))
    return samples


def corpus(n: int, seed: int = 0) -> list[str]:
    """Text for training the tokenizer: the prompts and every answer template of ``n`` samples
    (their own seed stream, all splits' keys allowed) plus the whole task vocabulary."""
    rng = _split_rng(seed, "corpus")
    lines: list[str] = []
    for sample in (make_sample(rng) for _ in range(n)):
        lines.append(sample.prompt)
        lines.extend(sample.answer_variants)
    vocab = [*SHAPES, *COLOURS, "big", "large", "small", *POSITIONS, "middle", *_NUM_WORDS,
             *_ORDINALS, *IMAGE_WORDS, *(f'"{w}"' for w in IMAGE_WORDS), *SPELL_WORDS]
    lines.append(" ".join(vocab))
    lines.append(" ".join(str(i) for i in range(0, 256)))
    return lines


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _stats_table(splits: dict[str, list[Sample]]) -> str:
    rows = [f"{'kind':<11}" + "".join(f"{s:>7}" for s in SPLITS)
            + "   words: min  mean   max (answers)   prompt words"]
    for kind in KINDS:
        counts = "".join(f"{sum(x.kind == kind for x in splits[s]):>7}" for s in SPLITS)
        all_samples = [x for s in SPLITS for x in splits[s] if x.kind == kind]
        words = [len(x.answer.split()) for x in all_samples]
        pw = [len(x.prompt.split()) for x in all_samples]
        if words:
            stat = f"{min(words):>11} {statistics.mean(words):5.1f} {max(words):5}"
            pstat = f"{min(pw)}-{max(pw)}"
        else:
            stat, pstat = f"{'-':>11}", "-"
        rows.append(f"{kind:<11}{counts}{stat}{'':17}{pstat}")
    totals = "".join(f"{len(splits[s]):>7}" for s in SPLITS)
    words = [len(x.answer.split()) for s in SPLITS for x in splits[s]]
    image_words = [len(x.answer.split()) for s in SPLITS for x in splits[s] if x.has_image]
    rows.append(f"{'total':<11}{totals}{min(words):>11} {statistics.mean(words):5.1f} "
                f"{max(words):5}")
    image_counts = "".join(f"{sum(x.has_image for x in splits[s]):>7}" for s in SPLITS)
    rows.append(f"{'image':<11}{image_counts}{min(image_words):>11} "
                f"{statistics.mean(image_words):5.1f} {max(image_words):5}")
    return "\n".join(rows)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(list(argv) if argv is not None else None)
    t0 = time.perf_counter()
    splits = build_splits(args.out, seed=args.seed, n_train=args.train, n_val=args.val,
                          n_test=args.test)
    seconds = time.perf_counter() - t0
    print(_stats_table(splits))
    scenes = {s: {x.key for x in splits[s] if x.has_image} for s in SPLITS}
    print("distinct scenes: " + ", ".join(f"{s} {len(scenes[s])}" for s in SPLITS))
    print(f"wrote {args.out} in {seconds:.1f} s (seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
