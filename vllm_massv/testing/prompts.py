"""Chat-formatted prompts for the tiny models and a fixed set of RGB test images.

* :func:`image_prompt` / :func:`text_prompt` -- chat-formatted prompt strings.
* :func:`sample_images` -- deterministic RGB test images of different sizes.

transformers, numpy, PIL and skimage are imported inside the functions, so that importing
``vllm_massv.testing`` (the server harness, used by the benchmarks) does not load them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from vllm_massv.testing.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from PIL import Image
    from transformers import PreTrainedTokenizerBase


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
    tokenizer = load_tokenizer(tokenizer_or_dir)
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
    tokenizer = load_tokenizer(tokenizer_or_dir)
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
