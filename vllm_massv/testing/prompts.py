"""Chat-formatted prompts for the tiny models and a fixed set of RGB test images.

* :func:`image_prompt` / :func:`text_prompt` -- chat-formatted prompt strings.
* :func:`sample_images` -- deterministic RGB test images of different sizes.
* :func:`video_prompt` -- chat-formatted prompt strings holding videos.
* :func:`video_item` / :func:`sample_videos` -- videos in the form vLLM takes for Qwen2.5-VL:
  ``(frames [T, H, W, 3] uint8, metadata dict)``.

transformers, numpy, PIL and skimage are imported inside the functions, so that importing
``vllm_massv.testing`` (the server harness, used by the benchmarks) does not load them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from vllm_massv.testing.tokenizer import load_tokenizer

if TYPE_CHECKING:
    import numpy as np
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


def video_prompt(
    tokenizer_or_dir: PreTrainedTokenizerBase | str | Path,
    text: str,
    num_videos: int = 1,
    video_first: bool = True,
    num_images: int = 0,
) -> str:
    """Chat-formatted user prompt (with generation prompt) holding ``num_videos`` videos.

    Each video renders as ``<|vision_start|><|video_pad|><|vision_end|>`` (one pad; vLLM's
    Qwen2.5-VL processor expands it to ``T/2 * H/28 * W/28`` pads,
    `vllm/model_executor/models/qwen2_vl.py::Qwen2VLMultiModalProcessor._get_prompt_updates`).
    ``num_images`` images (``<|image_pad|>`` form) follow the videos. With ``video_first`` the
    media come before ``text``; otherwise the text's first half (split at the middle word), then
    the media, then the rest.
    """
    tokenizer = load_tokenizer(tokenizer_or_dir)
    media: list[dict[str, str]] = ([{"type": "video"} for _ in range(num_videos)]
                                   + [{"type": "image"} for _ in range(num_images)])
    if video_first:
        content = media + [{"type": "text", "text": text}]
    else:
        words = text.split(" ")
        middle = max(1, len(words) // 2)
        first, rest = " ".join(words[:middle]) + " ", " ".join(words[middle:])
        content = [{"type": "text", "text": first}] + media + [{"type": "text", "text": rest}]
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def video_item(frames: np.ndarray, fps: float) -> tuple[np.ndarray, dict]:
    """One video as vLLM takes it for Qwen2.5-VL: ``multi_modal_data={"video": item}`` (or a list
    of items).

    vLLM's Qwen2.5-VL parser requires metadata with every video (``video_needs_metadata=True``,
    `vllm/model_executor/models/qwen2_5_vl.py::Qwen2_5_VLProcessingInfo.get_data_parser`;
    `vllm/multimodal/parse.py::_parse_video_data` raises "Video metadata is required" without).
    The keys are those of `vllm/assets/video.py::video_get_metadata`; ``frames`` are taken as the
    already-sampled frames (``frames_indices`` 0..T-1, ``do_sample_frames`` False), so
    transformers' ``VideoMetadata.sampled_fps`` is ``fps`` and the processor's
    ``second_per_grid_ts`` is ``temporal_patch_size / fps`` seconds (2 / fps), which scales the
    temporal M-RoPE index of each frame pair.

    Args:
        frames: [T, H, W, 3] uint8 RGB frames.
        fps: frames per second of ``frames`` (> 0).
    Returns:
        ``(frames, metadata)``.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or str(frames.dtype) != "uint8":
        raise ValueError(f"frames must be [T, H, W, 3] uint8, got {frames.shape} {frames.dtype}")
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    t = int(frames.shape[0])
    metadata = {
        "total_num_frames": t,
        "fps": float(fps),
        "duration": t / float(fps),
        "video_backend": "opencv",
        "frames_indices": list(range(t)),
        "do_sample_frames": False,
    }
    return frames, metadata


def sample_videos() -> dict[str, tuple[np.ndarray, dict]]:
    """Deterministic test videos in :func:`video_item` form (frames [T, H, W, 3] uint8).

    ``pan``: 4 frames 112x112 (H x W), a window panning right 16 px per frame over
    ``skimage.data.astronaut()`` (512x512), fps 2; ``zoom``: 6 frames 84x140, ``skimage.data.
    chelsea()`` (300x451) cropped ever tighter around its centre and resized (bicubic), fps 1;
    ``blocks``: 5 frames 112x84 (an odd count: the processor repeats the last frame to fill its
    temporal patch of 2), a coloured square moving diagonally over noise from
    ``np.random.default_rng(1)``, fps 4. With the tiny target's processor (patch 14, merge 2)
    these are 2*4*4 = 32, 3*3*5 = 45 and 3*4*3 = 36 video tokens.
    """
    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    videos: dict[str, tuple[np.ndarray, dict]] = {}
    astronaut = np.ascontiguousarray(skdata.astronaut())
    pan = np.stack([astronaut[100:212, 150 + 16 * i: 262 + 16 * i] for i in range(4)])
    videos["pan"] = video_item(np.ascontiguousarray(pan), fps=2.0)

    chelsea = Image.fromarray(np.ascontiguousarray(skdata.chelsea()), "RGB")  # 451 x 300
    cx, cy = chelsea.width // 2, chelsea.height // 2
    zoom = []
    for i in range(6):
        half_w, half_h = 225 - 25 * i, 135 - 15 * i
        crop = chelsea.crop((cx - half_w, cy - half_h, cx + half_w, cy + half_h))
        zoom.append(np.asarray(crop.resize((140, 84), Image.Resampling.BICUBIC)))
    videos["zoom"] = video_item(np.stack(zoom), fps=1.0)

    rng = np.random.default_rng(1)
    background = rng.integers(0, 256, size=(112, 84, 3), dtype=np.uint8)
    blocks = []
    for i in range(5):
        frame = background.copy()
        frame[10 + 16 * i: 42 + 16 * i, 5 + 10 * i: 37 + 10 * i] = (40 * i, 255 - 40 * i, 128)
        blocks.append(frame)
    videos["blocks"] = video_item(np.stack(blocks), fps=4.0)
    return videos
