"""Prompt sources for `massv generate` (and the alignment phase of `massv train`).

Every reader yields :class:`PromptRecord` objects: a stable unique ``id``, the user turn as
OpenAI-style chat ``messages`` (``{"type": "image"}`` items where the images go, ``{"type":
"text"}`` items), the image file paths (absolute) in the order of the image items, and the data
set's own answer (``reference``) when it has one.

* :func:`read_llava_json` -- LLaVA conversation JSON / JSONL (``<image>`` marks the image spot).
* :func:`read_dataset` -- an HF ``datasets`` data set saved with ``save_to_disk``, or local files
  ``datasets.load_dataset`` reads (a parquet/json/csv file or folder, an ``imagefolder``).
* :func:`read_image_folder` -- a folder of images plus prompt templates.

Entries a reader cannot turn into a record (no question, ``<image>`` markers that do not match the
images) are counted by reason in the optional ``skipped`` counter and not yielded. Video rows are
refused, not skipped: the readers raise :class:`VideoRowError` naming the source and the row (a
``video``/``videos`` field, a ``<video>`` marker, an OpenAI ``video``/``video_url`` content item,
a video file or a ``datasets.Video`` column): the pipeline trains on images and text only, and a
video row read as text would silently train the drafter on a prompt without its video.

Images are not opened by the readers; :func:`load_image` does that at generation time (and training
time, with the same ``max_pixels``) and returns None with a reason for files that cannot be used.

Readers take ``shard``/``num_shards`` so that a data-parallel worker only materialises its own
records (:func:`shard_of`, the same assignment `generate` uses), and ``limit`` (the first N input
entries, counted before sharding, so all shards agree on the input).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "IMAGE_MARKER",
    "PromptRecord",
    "VIDEO_EXTENSIONS",
    "VIDEO_MARKER",
    "VideoRowError",
    "build_content",
    "choose_template",
    "hash64",
    "load_image",
    "load_image_checked",
    "read_dataset",
    "read_image_folder",
    "read_llava_json",
    "shard_of",
]

#: Images with more pixels than this are downsized (aspect ratio kept) by :func:`load_image`.
DEFAULT_MAX_PIXELS = 4096 * 4096
#: Where an image goes in LLaVA-style prompt text.
IMAGE_MARKER = "<image>"
#: File name endings :func:`read_image_folder` treats as images (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
#: Where a video goes in LLaVA-Video-style prompt text (refused: :class:`VideoRowError`).
VIDEO_MARKER = "<video>"
#: File name endings taken for videos where an image is expected (refused, case-insensitive).
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv",
                    ".wmv", ".3gp")

# Reasons an entry or image is skipped (keys of the `skipped` counters and of the summary).
MISSING = "missing"            # image file does not exist
UNREADABLE = "unreadable"      # not an image PIL can identify
TRUNCATED = "truncated"        # image data ends early
CORRUPT = "corrupt"            # other decoding error
TOO_LARGE = "too_large"        # PIL decompression-bomb limit (Image.MAX_IMAGE_PIXELS) exceeded
NO_PROMPT = "no_prompt"        # no human turn / empty prompt
MARKER_MISMATCH = "image_marker_mismatch"  # <image> markers present but not one per image


class VideoRowError(ValueError):
    """An input row holds a video: `massv generate` / `massv train` take image and text rows only
    (vLLM serves Qwen2.5-VL video prompts with MASSV, but no training path reads videos).
    `massv generate` reports it as an error (exit 2) before any engine starts."""

    def __init__(self, source: str | os.PathLike, row_id: str, what: str) -> None:
        super().__init__(
            f"{source}: row {row_id!r} holds a video ({what}); massv generate and massv train "
            "take image and text rows only. Drop the video rows, or give a video's frames as "
            "images (one <image> marker each).")
        self.source, self.row_id, self.what = str(source), row_id, what


def _video_in(prompt: Any, images: Sequence[Any] = (), fields: Any = None) -> str | None:
    """What makes a row a video row (None for an image/text row): a non-empty ``video`` /
    ``videos`` field of ``fields`` (a dict), a :data:`VIDEO_MARKER` in the prompt text, or an
    image path with a :data:`VIDEO_EXTENSIONS` ending."""
    if isinstance(fields, dict):
        for key in ("video", "videos"):
            if fields.get(key) not in (None, "", []):
                return f"a {key!r} field"
    if isinstance(prompt, str) and VIDEO_MARKER in prompt:
        return f"a {VIDEO_MARKER} marker in its prompt"
    for image in images:
        if isinstance(image, str) and image.lower().endswith(VIDEO_EXTENSIONS):
            return f"the video file {image!r} where an image goes"
    return None


@dataclass
class PromptRecord:
    """One prompt for the target: the user turn(s) and their images."""

    id: str
    messages: list[dict[str, Any]]
    images: list[str] = field(default_factory=list)
    reference: str | None = None


# ----------------------------------------------------------------------------------------------
# Sharding and template choice
# ----------------------------------------------------------------------------------------------


def hash64(text: str) -> int:
    """A stable 64-bit hash of `text` (the first 8 bytes of its sha256, big-endian)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def shard_of(record_id: str, num_shards: int) -> int:
    """The data-parallel shard (0..num_shards-1) of a record: a stable hash of its id (sha256; the
    same on every machine and Python run)."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    return hash64(record_id) % num_shards if num_shards > 1 else 0


def choose_template(key: str, num_templates: int, seed: int = 0) -> int:
    """Index of the prompt template for ``key`` (e.g. an image's relative path): a seeded hash, so
    the choice is deterministic and does not depend on which other images exist."""
    return hash64(f"{seed}\x00{key}") % num_templates


# ----------------------------------------------------------------------------------------------
# Messages
# ----------------------------------------------------------------------------------------------


def build_content(text: str, num_images: int) -> list[dict[str, Any]] | None:
    """Chat content items for ``text`` with ``num_images`` images.

    With ``<image>`` markers in ``text`` (one per image), each image goes at its marker (newlines
    next to a marker are dropped, as LLaVA does); without markers all images go before the text.
    Returns None when there are markers but not exactly one per image.
    """
    n_markers = text.count(IMAGE_MARKER)
    if n_markers == 0:
        items: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
        if text.strip():
            items.append({"type": "text", "text": text.strip()})
        return items
    if n_markers != num_images:
        return None
    items = []
    pieces = text.split(IMAGE_MARKER)
    for i, piece in enumerate(pieces):
        if i > 0:
            piece = piece.lstrip("\n")
        if i < len(pieces) - 1:
            piece = piece.rstrip("\n")
        if i == 0:
            piece = piece.lstrip()
        if i == len(pieces) - 1:
            piece = piece.rstrip()
        if piece:
            items.append({"type": "text", "text": piece})
        if i < len(pieces) - 1:
            items.append({"type": "image"})
    return items


def _user_messages(text: str, images: list[str]) -> list[dict[str, Any]] | None:
    content = build_content(text, len(images))
    if content is None:
        return None
    return [{"role": "user", "content": content}]


def _first_turns(conversation: Sequence[Any]) -> tuple[str | None, str | None]:
    """(first human/user text, first gpt/assistant text after it) of a LLaVA- or OpenAI-style
    conversation."""
    prompt = reference = None
    for turn in conversation:
        if not isinstance(turn, dict):
            continue
        role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if isinstance(value, list):  # OpenAI-style content items -> text with <image> markers
            # (video items -> <video> markers, which the readers refuse)
            value = "".join(
                VIDEO_MARKER if isinstance(it, dict) and (
                    it.get("type") in ("video", "video_url") or "video" in it
                    or "video_url" in it)
                else IMAGE_MARKER if isinstance(it, dict) and (
                    it.get("type") in ("image", "image_url") or "image" in it)
                else it.get("text", "") if isinstance(it, dict) else str(it) for it in value)
        if not isinstance(value, str):
            continue
        if prompt is None and role in ("human", "user"):
            prompt = value
        elif prompt is not None and role in ("gpt", "assistant"):
            reference = value
            break
    return prompt, reference


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


def _to_rgb(img: Image.Image) -> Image.Image:
    from PIL import Image

    mode = img.mode
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0  # 16-bit range -> 8-bit
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "RGB":
        return img
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def load_image_checked(path: str | os.PathLike,
                       max_pixels: int | None = DEFAULT_MAX_PIXELS,
                       ) -> tuple[Image.Image | None, str | None]:
    """``(RGB image, None)`` or ``(None, reason)``; see :func:`load_image`."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        return None, MISSING
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                w, h = im.size
                if max_pixels and w * h > max_pixels and im.format == "JPEG":
                    # let libjpeg decode at a reduced scale (>= the target size) first
                    s = (max_pixels / (w * h)) ** 0.5
                    im.draft("RGB", (max(1, int(w * s)), max(1, int(h * s))))
                im.load()
                img = _to_rgb(im)
                if img is im:
                    img = im.copy()
    except Image.DecompressionBombError:
        return None, TOO_LARGE
    except UnidentifiedImageError:
        return None, UNREADABLE
    except OSError as e:
        return None, TRUNCATED if "truncated" in str(e).lower() else CORRUPT
    except Exception:  # noqa: BLE001 -- PIL raises SyntaxError, ValueError, zlib.error, ...
        return None, CORRUPT
    w, h = img.size
    if max_pixels and w * h > max_pixels:
        s = (max_pixels / (w * h)) ** 0.5
        new = (max(1, int(w * s)), max(1, int(h * s)))
        while new[0] * new[1] > max_pixels:  # float rounding
            new = (max(1, new[0] - 1), max(1, new[1] - 1))
        img = img.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return img, None


def load_image(path: str | os.PathLike,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image | None:
    """Open an image as RGB, or None when it cannot be used.

    Grayscale, palette, 16-bit, CMYK... are converted to RGB; images with an alpha channel are
    composited on white. Images with more than ``max_pixels`` pixels are downsized (bicubic, aspect
    ratio kept) to at most ``max_pixels``. None for a missing, unidentifiable, truncated or
    corrupt file, and for one over PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``);
    :func:`load_image_checked` also says which.
    """
    return load_image_checked(path, max_pixels)[0]


# ----------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------


def _count(skipped: Counter | None, reason: str) -> None:
    if skipped is not None:
        skipped[reason] += 1


def _resolve(path: str, root: Path | None) -> str:
    p = Path(os.path.expanduser(path))
    if not p.is_absolute() and root is not None:
        p = root / p
    return str(p.absolute())


def _unique_id(base: str, seen: dict[str, int]) -> str:
    """``base``, or ``base#2``, ``base#3``... for repeats (stable given the input order)."""
    n = seen.get(base, 0) + 1
    seen[base] = n
    if n == 1:
        return base
    candidate = f"{base}#{n}"
    while candidate in seen:
        n += 1
        candidate = f"{base}#{n}"
    seen[base] = n
    seen[candidate] = 1
    return candidate


def _iter_json_entries(path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):  # {"data": [...]} or {id: entry}
        data = data.get("data", data.get("annotations", list(data.values())))
    yield from data


def read_llava_json(path: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
                    limit: int | None = None, shard: int = 0, num_shards: int = 1,
                    skipped: Counter | None = None) -> Iterator[PromptRecord]:
    """LLaVA conversation data: a JSON list (or JSONL) of ``{"id", "image": path | [paths],
    "conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"},
    ...]}``.

    The first human turn is the prompt, the first gpt turn after it the reference. Relative image
    paths are resolved against ``image_root`` (default: the JSON file's folder). Entries without an
    ``image`` are text-only prompts. Ids are the entries' ``id`` (the list index when missing);
    repeated ids get ``#2``, ``#3``... in file order.

    Raises:
        VideoRowError: an entry of this shard holds a video (LLaVA-Video's ``"video"`` field and
            ``<video>`` marker, an OpenAI video item, a video file as its image).
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    seen: dict[str, int] = {}
    for index, entry in enumerate(_iter_json_entries(path)):
        if limit is not None and index >= limit:
            break
        rid = _unique_id(str(entry.get("id", index)), seen)
        if shard_of(rid, num_shards) != shard:
            continue
        image = entry.get("image", entry.get("images"))
        images = [] if image is None else [image] if isinstance(image, str) else list(image)
        prompt, reference = _first_turns(entry.get("conversations") or entry.get("messages") or [])
        video = _video_in(prompt, images, entry)
        if video is not None:
            raise VideoRowError(path, rid, video)
        if not prompt or not prompt.replace(IMAGE_MARKER, "").strip() and not images:
            _count(skipped, NO_PROMPT)
            continue
        images = [_resolve(p, root) for p in images]
        messages = _user_messages(prompt, images)
        if messages is None:
            _count(skipped, MARKER_MISMATCH)
            continue
        yield PromptRecord(rid, messages, images, reference)


def _scan_images(root: Path, extensions: Sequence[str]) -> list[str]:
    exts = tuple(e.lower() for e in extensions)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(exts):
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(found)


def read_image_folder(root: str | os.PathLike, prompts: Sequence[str], *,
                      all_prompts: bool = False, seed: int = 0,
                      extensions: Sequence[str] = IMAGE_EXTENSIONS, limit: int | None = None,
                      shard: int = 0, num_shards: int = 1,
                      skipped: Counter | None = None) -> Iterator[PromptRecord]:
    """Every image under ``root`` (recursive, sorted by relative path) with a prompt template.

    Each image gets the template :func:`choose_template` picks from its relative path and
    ``seed``, or every template with ``all_prompts``. Ids are ``"{relative path}#{template
    index}"``. A template may hold an ``<image>`` marker; otherwise the image goes first.
    ``limit`` counts images. No reference.
    """
    if not prompts:
        raise ValueError("read_image_folder needs at least one prompt template")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    for index, rel in enumerate(_scan_images(root, extensions)):
        if limit is not None and index >= limit:
            break
        chosen = range(len(prompts)) if all_prompts else [choose_template(rel, len(prompts), seed)]
        for k in chosen:
            rid = f"{rel}#{k}"
            if shard_of(rid, num_shards) != shard:
                continue
            messages = _user_messages(prompts[k], [str((root / rel).absolute())])
            if messages is None:
                _count(skipped, MARKER_MISMATCH)
                continue
            yield PromptRecord(rid, messages, [str((root / rel).absolute())], None)


_MAGIC = ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
          (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))


def _image_suffix(data: bytes, path: str | None) -> str:
    if path and Path(path).suffix.lower() in IMAGE_EXTENSIONS:
        return Path(path).suffix.lower()
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    for magic, suffix in _MAGIC:
        if data.startswith(magic):
            return suffix
    return ".img"


def _safe_name(record_id: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", record_id).strip("._") or "image"
    if name != record_id:  # keep distinct ids distinct
        name = f"{name}-{hashlib.sha256(record_id.encode()).hexdigest()[:8]}"
    return name


def _write_once(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` unless it exists (atomically: temp file + rename, so concurrent
    shards and interrupted runs never leave a partial image)."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _pil_to_bytes(img: Any) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


_SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
_FORMAT_BY_SUFFIX = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv",
                     ".tsv": "csv", ".arrow": "arrow", ".txt": "text"}


def _open_dataset(path: Path, split: str | None, data_format: str | None,
                  cache_dir: str | None) -> Any:
    import datasets

    if path.is_dir() and data_format is None and any(
            (path / f).exists() for f in _SAVED_DATASET_FILES):
        ds = datasets.load_from_disk(str(path))
    else:
        kwargs: dict[str, Any] = {"cache_dir": cache_dir}
        if path.is_file():
            fmt = data_format or _FORMAT_BY_SUFFIX.get(path.suffix.lower())
            if fmt is None:
                raise ValueError(f"cannot tell the format of {path}; pass data_format "
                                 "(e.g. parquet, json, csv)")
            if fmt == "csv" and path.suffix.lower() == ".tsv":
                kwargs["delimiter"] = "\t"
            ds = datasets.load_dataset(fmt, data_files=str(path), **kwargs)
        elif path.is_dir():
            if data_format is not None:
                ds = datasets.load_dataset(data_format, data_dir=str(path), **kwargs)
            else:
                ds = datasets.load_dataset(str(path), **kwargs)
        else:
            raise FileNotFoundError(f"data set {path} does not exist")
    if isinstance(ds, (datasets.DatasetDict, dict)):
        name = split or ("train" if "train" in ds else next(iter(ds)))
        if name not in ds:
            raise ValueError(f"split {name!r} not in the data set (splits: {list(ds)})")
        ds = ds[name]
    elif split is not None and split != "train":
        # load_from_disk of a single Dataset has no splits; accept "train" as a no-op
        raise ValueError(f"{path} holds a single split; --split {split!r} does not apply")
    return ds


def read_dataset(path: str | os.PathLike, *, image_column: str = "image",
                 prompt_column: str | None = "prompt", reference_column: str | None = None,
                 id_column: str | None = None, prompts: Sequence[str] | None = None,
                 seed: int = 0, all_prompts: bool = False, split: str | None = None,
                 data_format: str | None = None, image_root: str | os.PathLike | None = None,
                 image_dir: str | os.PathLike | None = None, cache_dir: str | None = None,
                 limit: int | None = None, shard: int = 0, num_shards: int = 1,
                 skipped: Counter | None = None) -> Iterator[PromptRecord]:
    """An HF ``datasets`` data set: ``save_to_disk`` output (``load_from_disk``), or a local file or
    folder ``datasets.load_dataset`` reads (``data_format`` names the builder: ``parquet``,
    ``json``, ``csv``, ``imagefolder``...; inferred from a file's suffix or a folder's files).

    ``image_column``: an ``Image`` feature (one image, a list of them, or None), or string paths
    (relative to ``image_root``, default the data set folder). Images stored as bytes in the data
    set are written once, unchanged, to ``image_dir/<id>.<ext>`` (``image_dir`` is required for
    those, typically ``<out>/images``), so that records can refer to them by path.

    ``prompt_column``: a string (``<image>`` markers as in LLaVA) or a LLaVA/OpenAI-style
    conversation (first user turn = prompt, first answer after it = reference). Without a prompt
    column (e.g. an ``imagefolder``), ``prompts`` templates are used as in
    :func:`read_image_folder`. ``reference_column``: the data set's answer (optional).

    Ids: the ``id_column`` value (repeats get ``#2``...), else the row index as a string.

    Raises:
        VideoRowError: the image column is a ``datasets.Video`` feature (raised before any row is
            read, row ``"*"``), or a row of this shard holds a video (a ``<video>`` marker or
            video item in its prompt, a video file in its image column).
    """
    import datasets

    path = Path(path)
    ds = _open_dataset(path, split, data_format, cache_dir)
    columns = list(ds.column_names)
    if image_column not in columns:
        raise ValueError(f"image column {image_column!r} not in the data set (columns: {columns})")
    use_templates = prompt_column is None or prompt_column not in columns
    if use_templates and not prompts:
        raise ValueError(f"prompt column {prompt_column!r} not in the data set (columns: "
                         f"{columns}); pass prompt templates instead")
    for col in (reference_column, id_column):
        if col is not None and col not in columns:
            raise ValueError(f"column {col!r} not in the data set (columns: {columns})")

    # Do not decode images: take paths where the files exist, the raw bytes otherwise.
    feature = ds.features[image_column]
    inner_feature = (feature[0] if isinstance(feature, list) and feature
                     else getattr(feature, "feature", None))
    if "Video" in (type(feature).__name__, type(inner_feature).__name__):
        raise VideoRowError(path, "*", f"column {image_column!r} is a datasets Video feature")
    if isinstance(feature, datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    else:
        inner = feature[0] if isinstance(feature, list) else getattr(feature, "feature", None)
        if isinstance(inner, datasets.Image):
            ds = ds.cast_column(image_column, datasets.List(datasets.Image(decode=False)))
    root = Path(image_root) if image_root is not None else (path if path.is_dir() else path.parent)
    image_dir = Path(image_dir) if image_dir is not None else None

    wanted = [c for c in (image_column, None if use_templates else prompt_column,
                          reference_column, id_column) if c is not None]
    ds = ds.select_columns(list(dict.fromkeys(wanted)))
    seen: dict[str, int] = {}
    for index, row in enumerate(ds):
        if limit is not None and index >= limit:
            break
        rid = (_unique_id(str(row[id_column]), seen) if id_column is not None else str(index))
        if use_templates:
            chosen = (list(range(len(prompts))) if all_prompts  # type: ignore[arg-type]
                      else [choose_template(rid, len(prompts), seed)])  # type: ignore[arg-type]
            ids = {k: f"{rid}#{k}" if all_prompts else rid for k in chosen}
            ids = {k: i for k, i in ids.items() if shard_of(i, num_shards) == shard}
        elif shard_of(rid, num_shards) != shard:
            ids = {}
        else:
            ids = {0: rid}
        if not ids:
            continue  # another shard's record: do not touch its images
        value = row[image_column]
        values = [] if value is None else list(value) if isinstance(value, list) else [value]
        video = _video_in(None, [v for v in values if isinstance(v, str)]
                          + [v.get("path") for v in values if isinstance(v, dict)])
        if video is None and not use_templates:
            raw = row[prompt_column]
            video = _video_in(_first_turns(raw)[0] if isinstance(raw, list) else raw)
        if video is not None:
            raise VideoRowError(path, rid, video)
        images = []
        for j, v in enumerate(values):
            images.append(_image_path(v, rid if len(values) == 1 else f"{rid}-{j}", root,
                                      image_dir))
        reference = None
        if use_templates:
            for k, tid in ids.items():
                messages = _user_messages(prompts[k], images)  # type: ignore[index]
                if messages is None:
                    _count(skipped, MARKER_MISMATCH)
                    continue
                ref = row[reference_column] if reference_column else None
                yield PromptRecord(tid, messages, images, None if ref is None else str(ref))
            continue
        prompt = row[prompt_column]
        if isinstance(prompt, list):
            prompt, reference = _first_turns(prompt)
        if reference_column is not None:
            ref = row[reference_column]
            reference = None if ref is None else str(ref)
        if not isinstance(prompt, str) or not prompt.replace(IMAGE_MARKER, "").strip() and (
                not images):
            _count(skipped, NO_PROMPT)
            continue
        messages = _user_messages(prompt, images)
        if messages is None:
            _count(skipped, MARKER_MISMATCH)
            continue
        yield PromptRecord(rid, messages, images, reference)


def _image_path(value: Any, name: str, root: Path, image_dir: Path | None) -> str:
    """A file path for one image cell: a path string, ``{"path", "bytes"}`` (undecoded Image
    feature) or a PIL image."""
    if isinstance(value, str):
        return _resolve(value, root)
    data = src = None
    if isinstance(value, dict):
        data, src = value.get("bytes"), value.get("path")
        if data is None and src:
            return _resolve(src, root)
    else:  # a PIL image (e.g. from a custom feature)
        src = getattr(value, "filename", None) or None
        if src and Path(src).is_file():
            return str(Path(src).absolute())
        data = _pil_to_bytes(value)
    if data is None:
        return _resolve(src or "", root)
    if image_dir is None:
        raise ValueError("the data set stores images as bytes; pass image_dir (e.g. <out>/images) "
                         "to write them to files")
    target = image_dir / (_safe_name(name) + _image_suffix(data, src))
    _write_once(target, data)
    return str(target.absolute())

