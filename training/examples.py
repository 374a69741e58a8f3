"""Training examples: the `massv generate` Parquet parts read as token sequences.

Every method trains on the same :class:`Example` (prompt + response token ids, image paths, and
with `--loss kl` the target's top-k log-probabilities). A leaf of the training package: the loop,
the methods and `massv init --method eagle3` import it; it imports none of them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vllm_massv.drafters.massv.config import MassvConfigError
from vllm_massv.training.data import DEFAULT_MAX_PIXELS
from vllm_massv.training.generate import PARTS_DIR

if TYPE_CHECKING:
    from vllm_massv.training.loop import TrainConfig


@dataclass
class Example:
    """One training sequence."""
    id: str
    input_ids: list[int]          # prompt + response
    prompt_len: int
    images: list[str]
    top_ids: list[list[int]] | None = None       # response positions x k (for --loss kl)
    top_logprobs: list[list[float]] | None = None


def load_examples(cfg: TrainConfig, tokenizer) -> list[Example]:
    """Training examples from `massv generate` Parquet shards, sorted by id.

    align: prompt + the data set's `reference` answer (+ end-of-turn); sdvit (and the other
    methods): prompt + the target's `token_ids`. Rows without the needed column are skipped;
    sequences are cut at `cfg.max_seq_len`.

    Raises:
        MassvConfigError: no Parquet parts, `--loss kl` on data without top-k logprobs, or a row
            whose prompt holds video placeholders (`<|video_pad|>`, :func:`refuse_video_rows`).
    """
    import pyarrow.parquet as pq

    files = data_files(cfg.data)
    table = [row for f in files for row in pq.read_table(f).to_pylist()]
    refuse_video_rows(table, tokenizer, cfg.data)
    end_of_turn = end_of_turn_id(tokenizer)
    examples = []
    for row in sorted(table, key=lambda r: r["id"]):
        prompt = list(row["prompt_token_ids"])
        if cfg.phase == "align":
            if not row.get("reference"):
                continue
            response = tokenizer(row["reference"], add_special_tokens=False)["input_ids"]
            response = response + [end_of_turn]
        else:
            response = list(row["token_ids"])
        ids = (prompt + response)[: cfg.max_seq_len]
        if len(ids) <= len(prompt):
            continue
        examples.append(Example(row["id"], ids, len(prompt), list(row["images"] or []),
                                row.get("top_logprob_ids"), row.get("top_logprobs")))
    if cfg.loss == "kl" and any(e.top_ids is None for e in examples):
        raise MassvConfigError("--loss kl needs top-k logprobs: run `massv generate --logprobs K`")
    return examples


#: Video placeholder tokens of the supported targets' tokenizers (Qwen2-VL / Qwen2.5-VL).
VIDEO_PLACEHOLDERS = ("<|video_pad|>",)


def refuse_video_rows(rows: list[dict], tokenizer, data_dir: str | Path) -> None:
    """Refuse training rows whose prompt holds video placeholders. `massv generate` refuses video
    rows (`data.VideoRowError`), but Parquet parts written elsewhere could hold them, and the
    trainers write image embeddings only at image placeholders (`features.py`): a video row would
    train the drafter on placeholder token embeddings where serving hands it the video.

    Args:
        rows: Parquet rows with `id` and `prompt_token_ids`.
        tokenizer: the drafter's / target's tokenizer (its vocabulary names the placeholders).
        data_dir: the data directory, for the message.
    Raises:
        MassvConfigError: naming the first such row.
    """
    vocab = tokenizer.get_vocab()
    video_ids = {vocab[t] for t in VIDEO_PLACEHOLDERS if t in vocab}
    if not video_ids:
        return
    for row in rows:
        if video_ids.intersection(row["prompt_token_ids"] or ()):
            raise MassvConfigError(
                f"{data_dir}: row {row['id']!r} holds a video (video placeholder tokens in its "
                "prompt_token_ids); massv train takes image and text rows only. Drop the video "
                "rows from the data.")


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an assistant turn: Qwen's `<|im_end|>`, Gemma's `<end_of_turn>`,
    else the tokenizer's eos.

    Raises:
        MassvConfigError: the tokenizer has none of them.
    """
    vocab = tokenizer.get_vocab()
    for token in ("<|im_end|>", "<end_of_turn>"):
        if token in vocab:
            return vocab[token]
    if tokenizer.eos_token_id is None:
        raise MassvConfigError("the tokenizer has no end-of-turn or eos token")
    return tokenizer.eos_token_id


def data_files(data_dir: str | Path) -> list[Path]:
    """The Parquet parts of a `massv generate` output directory (all shards).

    Raises:
        MassvConfigError: the directory holds no parts.
    """
    root = Path(data_dir)
    files = sorted((root / PARTS_DIR).glob("part-*.parquet")) or sorted(root.glob("part-*.parquet"))
    if not files:
        raise MassvConfigError(f"{data_dir}: no Parquet parts (run `massv generate` first)")
    return files


def image_max_pixels(data_dir: str | Path) -> int | None:
    """The image-size limit `massv generate` applied, so training sees the same pixels."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(data_files(data_dir)[0]).metadata or {}
    settings = json.loads(meta.get(b"massv", b"{}")).get("settings", {})
    return settings.get("image_max_pixels", DEFAULT_MAX_PIXELS)


def split_examples(examples: list[Example], eval_fraction: float, seed: int
                   ) -> tuple[list[Example], list[Example]]:
    """(train, held-out): a deterministic split by hashed id (stable when the data set grows)."""

    def held_out(e: Example) -> bool:
        h = int(hashlib.sha256(f"{seed}:{e.id}".encode()).hexdigest()[:8], 16)
        return h / 0xFFFFFFFF < eval_fraction

    evals = [e for e in examples if held_out(e)]
    return [e for e in examples if not held_out(e)], evals
