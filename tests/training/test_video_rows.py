"""Video rows are refused by `massv generate` and `massv train`, naming the row (no engine).

The training pipeline reads images and text only. Before this refusal a LLaVA-Video row
(`"video": "clip.mp4"`, `<video>` marker) was read as a text-only prompt holding the literal text
`<video>`, and an OpenAI `{"type": "video"}` item was dropped: the drafter would have been trained
on prompts without their video. Serving video prompts is covered by tests/massv/test_video.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from vllm_massv import testing as mt
from vllm_massv.cli import main as massv_main
from vllm_massv.drafters.massv.config import MassvConfigError
from vllm_massv.training import data as D
from vllm_massv.training import generate as G
from vllm_massv.training.examples import load_examples


def _conv(question: str, answer: str = "An answer.") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


#: (row, what the error names): LLaVA-Video's form, a `<video>` marker alone, an OpenAI-style
#: video item, a video file where the image goes.
VIDEO_ROWS = [
    ({"id": "llava_video", "video": "clips/a.mp4", "conversations": _conv("<video>\nWhat "
                                                                          "happens?")},
     "'video' field"),
    ({"id": "marker_only", "conversations": _conv("<video>\nWhat happens?")}, "<video> marker"),
    ({"id": "openai_item", "messages": [
        {"role": "user", "content": [{"type": "video", "video": "clips/b.mp4"},
                                     {"type": "text", "text": "What happens?"}]},
        {"role": "assistant", "content": "Things."}]}, "<video> marker"),
    ({"id": "mp4_as_image", "image": "clips/c.MP4", "conversations": _conv("<image>\nHi.")},
     "video file"),
]


@pytest.mark.parametrize("row,what", VIDEO_ROWS, ids=[r["id"] for r, _ in VIDEO_ROWS])
def test_read_llava_json_refuses_video_rows(tmp_path: Path, row: dict, what: str):
    image_row = {"id": "img", "image": "a.png", "conversations": _conv("<image>\nDescribe.")}
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (image_row, row)) + "\n")
    records = D.read_llava_json(path)
    assert next(records).id == "img"          # rows before it are read as before
    with pytest.raises(D.VideoRowError) as err:
        next(records)
    msg = str(err.value)
    assert repr(row["id"]) in msg and str(path) in msg and what in msg, msg
    assert "image and text rows only" in msg
    assert err.value.row_id == row["id"]


def test_image_and_text_rows_unchanged(tmp_path: Path):
    rows = [{"id": "img", "image": "a.png", "conversations": _conv("<image>\nDescribe.")},
            {"id": "txt", "conversations": _conv("Count to ten.")},
            {"id": "oai", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "x"}},
                {"type": "text", "text": "What is it?"}]}], "image": "b.png"}]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows))
    records = list(D.read_llava_json(path))
    assert [r.id for r in records] == ["img", "txt", "oai"]
    assert records[2].messages[0]["content"][0] == {"type": "image"}


def test_generate_cli_refuses_a_video_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture):
    """`massv generate` stops before any engine starts: exit 2, the row named on stderr."""
    monkeypatch.setattr(G, "generate", lambda *a, **k: pytest.fail("generate() was called"))
    path = tmp_path / "llava_video.json"
    path.write_text(json.dumps([VIDEO_ROWS[0][0]]))
    rc = massv_main(["generate", "--target", "T", "--out", str(tmp_path / "out"),
                     "--llava-json", str(path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "massv generate: error:" in err and "'llava_video'" in err and "video" in err, err


def test_read_dataset_refuses_video_rows(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": ["a", "b"], "image": ["a.png", "b.png"],
                      "prompt": ["<image>\nDescribe.", "<image> and <video>: same scene?"]})
    pq.write_table(table, tmp_path / "rows.parquet")
    with pytest.raises(D.VideoRowError, match=r"row 'b' holds a video \(a <video> marker"):
        list(D.read_dataset(tmp_path / "rows.parquet", id_column="id"))
    clips = pa.table({"image": ["clips/a.webm"], "prompt": ["What happens?"]})
    pq.write_table(clips, tmp_path / "clips.parquet")
    with pytest.raises(D.VideoRowError, match=r"row '0' .*the video file 'clips/a.webm'"):
        list(D.read_dataset(tmp_path / "clips.parquet"))


def test_read_dataset_refuses_a_video_feature_column(tmp_path: Path):
    """A `datasets.Video` image column is refused before any row is read."""
    import datasets

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"not decoded")   # save_to_disk only reads its size
    ds = datasets.Dataset.from_dict(
        {"image": [str(clip)], "prompt": ["What happens?"]},
        features=datasets.Features({"image": datasets.Video(), "prompt": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(D.VideoRowError, match="column 'image' is a datasets Video feature"):
        list(D.read_dataset(tmp_path / "saved"))


class _Tokenizer:
    """The two vocabulary entries `load_examples` reads (the tiny tokenizer's ids)."""

    eos_token_id = mt.EOS_TOKEN_ID

    def get_vocab(self) -> dict[str, int]:
        return {"<|im_end|>": mt.EOS_TOKEN_ID, "<|video_pad|>": mt.VIDEO_TOKEN_ID,
                "<|image_pad|>": mt.IMAGE_TOKEN_ID}


def test_train_refuses_video_rows(tmp_path: Path):
    """`massv train` reads `massv generate` parts (`examples.load_examples`): a row whose prompt
    holds `<|video_pad|>` tokens (parts written by something else) is refused by name; image
    rows load as before."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def part(rows: list[dict]) -> Path:
        root = tmp_path / f"data{len(list(tmp_path.iterdir()))}"
        (root / G.PARTS_DIR).mkdir(parents=True)
        cols = {k: [r[k] for r in rows] for k in ("id", "prompt_token_ids", "token_ids",
                                                    "images")}
        pq.write_table(pa.table(cols), root / G.PARTS_DIR / G.part_name(0, 0))
        return root

    image = {"id": "img", "prompt_token_ids": [1, 9, 12, 12, 10, 50], "token_ids": [60, 2],
             "images": ["a.png"]}
    video = {"id": "vid", "prompt_token_ids": [1, 9, 13, 13, 13, 10, 50], "token_ids": [61, 2],
             "images": []}
    cfg = SimpleNamespace(phase="sdvit", max_seq_len=64, loss="ce")
    cfg.data = part([image])
    assert [e.id for e in load_examples(cfg, _Tokenizer())] == ["img"]
    cfg.data = part([image, video])
    with pytest.raises(MassvConfigError, match=r"row 'vid' holds a video"):
        load_examples(cfg, _Tokenizer())
