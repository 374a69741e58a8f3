"""`massv generate`: readers, image loading, shards and generation through one vLLM engine.

`massv generate`: readers, image loading, shard assignment, and generation through one shared
vLLM engine on the tiny target -- bad images skipped by reason, output loadable with `datasets`,
greedy rows equal to a plain `llm.generate`, interrupted + resumed run equal to an uninterrupted
one (resumed through the CLI), logprobs.

One engine for the whole module; the CLI run gets it through a stand-in for `vllm.LLM` (so the
engine-starting path of `generate()` runs without a second engine).
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.support.engine import engine
from vllm_massv import testing as mt
from vllm_massv.cli import main as massv_main
from vllm_massv.drafters.massv.config import MassvConfigError
from vllm_massv.training import data as D
from vllm_massv.training import generate as G

MAX_TOKENS = 12
MAX_PIXELS = 1_000_000      # lowered downsizing limit (the 3000x2000 image is downsized)
BOMB_LIMIT = 10_000_000     # Image.MAX_IMAGE_PIXELS in the engine tests: 5000x5000 > 2x -> error
ENGINE_OVERRIDES = dict(max_num_batched_tokens=1024, enable_prefix_caching=False)
GOOD = ["r00", "r01", "r02", "r03_gray", "r04_rgba", "r05_palette", "r06_cmyk", "r10_big",
        "r12_text", "r13_two", "r14_multiturn"]
BAD = {"r07_corrupt": "unreadable", "r08_truncated": "truncated", "r09_missing": "missing",
       "r11_huge": "too_large", "r15_long": "prompt_too_long"}


# ----------------------------------------------------------------------------------------------
# Test data
# ----------------------------------------------------------------------------------------------


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _make_images(root: Path) -> dict[str, Path]:
    """Small good images in every mode, plus broken and oversized ones."""
    root.mkdir(parents=True, exist_ok=True)
    imgs = mt.sample_images()
    rng = np.random.default_rng(1)
    files: dict[str, Path] = {}

    def save(name: str, img: Image.Image, **kw: Any) -> None:
        files[name] = root / name
        img.save(files[name], **kw)

    save("red.png", imgs["red"])
    save("gradient.png", imgs["gradient"])
    save("noise.png", imgs["noise"])
    save("gray.png", imgs["chelsea"].convert("L"))
    rgba = np.zeros((120, 160, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 80:, 3] = 255                     # left half fully transparent
    save("rgba.png", Image.fromarray(rgba, "RGBA"))
    save("palette.png", imgs["astronaut"].convert("P", palette=Image.Palette.ADAPTIVE))
    save("cmyk.jpg", imgs["gradient"].convert("CMYK"), quality=90)
    files["corrupt.jpg"] = root / "corrupt.jpg"
    files["corrupt.jpg"].write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    noisy = _png_bytes(Image.fromarray(rng.integers(0, 256, (100, 120, 3), np.uint8)))
    files["truncated.png"] = root / "truncated.png"
    files["truncated.png"].write_bytes(noisy[: len(noisy) // 2])
    files["missing.png"] = root / "missing.png"
    big = np.zeros((2000, 3000, 3), np.uint8)
    big[..., 0] = np.linspace(0, 255, 3000, dtype=np.uint8)[None, :]
    save("big.png", Image.fromarray(big))
    save("huge.png", Image.new("L", (5000, 5000), 128))
    return files


def _llava_entries(files: dict[str, Path]) -> list[dict[str, Any]]:
    def conv(q: str, a: str = "An answer.") -> list[dict[str, str]]:
        return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]

    long_text = "Describe every colour and shape you can see, then count them. " * 400
    return [
        {"id": "r00", "image": "imgs/red.png",
         "conversations": conv("<image>\nDescribe this image.", "A red square.")},
        {"id": "r01", "image": "imgs/gradient.png",
         "conversations": conv("What colours are here?\n<image>")},
        {"id": "r02", "image": str(files["noise.png"]), "conversations": conv("Count the dots.")},
        {"id": "r03_gray", "image": "imgs/gray.png",
         "conversations": conv("<image>\nWhat animal?")},
        {"id": "r04_rgba", "image": "imgs/rgba.png", "conversations": conv("<image>\nColours?")},
        {"id": "r05_palette", "image": "imgs/palette.png",
         "conversations": conv("<image>\nWho is this?")},
        {"id": "r06_cmyk", "image": "imgs/cmyk.jpg", "conversations": conv("<image>\nDescribe.")},
        {"id": "r07_corrupt", "image": "imgs/corrupt.jpg", "conversations": conv("<image>\nHi.")},
        {"id": "r08_truncated", "image": "imgs/truncated.png",
         "conversations": conv("<image>\nHi.")},
        {"id": "r09_missing", "image": "imgs/missing.png", "conversations": conv("<image>\nHi.")},
        {"id": "r10_big", "image": "imgs/big.png", "conversations": conv("<image>\nDescribe it.")},
        {"id": "r11_huge", "image": "imgs/huge.png", "conversations": conv("<image>\nHi.")},
        {"id": "r12_text", "conversations": conv("Count from one to ten, please.")},
        {"id": "r13_two", "image": ["imgs/red.png", "imgs/noise.png"],
         "conversations": conv("Compare <image> with <image> please.")},
        {"id": "r14_multiturn", "image": "imgs/gradient.png",
         "conversations": conv("<image>\nFirst question?", "First answer.")
         + conv("Second question?", "Second answer.")},
        {"id": "r15_long", "image": "imgs/red.png", "conversations": conv("<image>\n" + long_text)},
        # not a record: two markers for one image (counted while reading)
        {"id": "r16_mismatch", "image": "imgs/red.png", "conversations": conv("<image><image>Hi")},
    ]


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("llava")
    files = _make_images(root / "imgs")
    path = root / "llava.json"
    path.write_text(json.dumps(_llava_entries(files)))
    return SimpleNamespace(root=root, json=path, files=files)


def _read_llava(llava: SimpleNamespace, skipped: Counter | None = None) -> list[D.PromptRecord]:
    return list(D.read_llava_json(llava.json, image_root=llava.root, skipped=skipped))


# ----------------------------------------------------------------------------------------------
# Image loading (no engine)
# ----------------------------------------------------------------------------------------------


def test_load_image_conversions_and_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    files = _make_images(tmp_path)
    for name in ("red.png", "gray.png", "rgba.png", "palette.png", "cmyk.jpg"):
        img = D.load_image(files[name])
        assert img is not None and img.mode == "RGB", name
    rgba = np.asarray(D.load_image(files["rgba.png"]))
    assert (rgba[:, :80] == 255).all()                     # transparent -> white
    assert (rgba[:, 80:, 0] == 200).all() and (rgba[:, 80:, 1:] == 0).all()
    gray = np.asarray(D.load_image(files["gray.png"]))
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    # 16-bit grayscale and a palette image with a transparent colour
    Image.fromarray(np.full((10, 20), 65535, np.uint16)).save(tmp_path / "g16.png")
    assert np.asarray(D.load_image(tmp_path / "g16.png")).min() == 255
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.info["transparency"] = 1
    pal.save(tmp_path / "pal_t.png", transparency=1)
    assert (np.asarray(D.load_image(tmp_path / "pal_t.png")) == 255).all()

    # downsizing keeps the aspect ratio and respects the limit
    big = D.load_image(files["big.png"], max_pixels=MAX_PIXELS)
    assert big.size[0] * big.size[1] <= MAX_PIXELS
    assert abs(big.size[0] / big.size[1] - 1.5) < 0.01 and big.size[0] > 1200
    assert D.load_image(files["big.png"], max_pixels=None).size == (3000, 2000)
    Image.new("RGB", (3000, 2000), (1, 2, 3)).save(tmp_path / "big.jpg")  # JPEG draft path
    jpg = D.load_image(tmp_path / "big.jpg", max_pixels=MAX_PIXELS)
    assert jpg.size[0] * jpg.size[1] <= MAX_PIXELS and jpg.size[0] > 1200

    checked = {n: D.load_image_checked(files[n])[1]
               for n in ("corrupt.jpg", "truncated.png", "missing.png")}
    assert checked == {"corrupt.jpg": "unreadable", "truncated.png": "truncated",
                       "missing.png": "missing"}
    assert D.load_image(files["corrupt.jpg"]) is None
    assert D.load_image_checked(files["huge.png"])[1] is None  # under PIL's default bomb limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", BOMB_LIMIT)
    assert D.load_image_checked(files["huge.png"]) == (None, "too_large")


# ----------------------------------------------------------------------------------------------
# Readers (no engine)
# ----------------------------------------------------------------------------------------------


def test_build_content_markers():
    img, txt = {"type": "image"}, lambda t: {"type": "text", "text": t}
    assert D.build_content("<image>\nQ?", 1) == [img, txt("Q?")]
    assert D.build_content("Q?\n<image>", 1) == [txt("Q?"), img]
    assert D.build_content("Q?", 2) == [img, img, txt("Q?")]
    assert D.build_content("A <image> and <image>: go.", 2) == [txt("A "), img, txt(" and "), img,
                                                                txt(": go.")]
    assert D.build_content("<image><image>Q", 1) is None
    assert D.build_content("<image>Q", 0) is None


def test_read_llava_json(llava: SimpleNamespace, tmp_path: Path):
    skipped: Counter = Counter()
    records = _read_llava(llava, skipped)
    by_id = {r.id: r for r in records}
    assert list(by_id) == GOOD[:7] + list(BAD)[:3] + ["r10_big", "r11_huge"] + GOOD[8:] + [
        "r15_long"]
    assert skipped == {"image_marker_mismatch": 1}
    r00 = by_id["r00"]
    assert r00.messages == [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    assert r00.images == [str(llava.root / "imgs" / "red.png")] and r00.reference == "A red square."
    assert by_id["r01"].messages[0]["content"][-1] == {"type": "image"}
    assert by_id["r02"].images == [str(llava.files["noise.png"])]     # absolute path kept
    assert by_id["r12_text"].images == [] and by_id["r12_text"].messages[0]["content"] == [
        {"type": "text", "text": "Count from one to ten, please."}]
    assert len(by_id["r13_two"].images) == 2
    assert by_id["r14_multiturn"].reference == "First answer."
    # default image root: the JSON's folder; JSONL; repeated / missing ids; limit; no human turn
    assert [r.images for r in D.read_llava_json(llava.json, limit=1)] == [r00.images]
    lines = [{"id": "a", "conversations": [{"from": "human", "value": "x"}]},
             {"id": "a", "conversations": [{"from": "human", "value": "y"}]},
             {"conversations": [{"from": "human", "value": "z"}]},
             {"id": "b", "conversations": [{"from": "gpt", "value": "only an answer"}]}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    skipped = Counter()
    got = list(D.read_llava_json(tmp_path / "d.jsonl", skipped=skipped))
    assert [r.id for r in got] == ["a", "a#2", "2"] and skipped == {"no_prompt": 1}


def test_read_dataset_on_disk_and_files(tmp_path: Path):
    import datasets

    imgs = mt.sample_images()
    pil = [imgs["red"], imgs["gradient"], imgs["noise"]]
    ds = datasets.Dataset.from_dict(
        {"image": pil, "question": ["<image>\nWhat colour?", "Describe.", "Texture?"],
         "answer": ["red", "a gradient", None]},
        features=datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                    "answer": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "saved"))
    out_images = tmp_path / "out" / "images"
    records = list(D.read_dataset(tmp_path / "saved", prompt_column="question",
                                  reference_column="answer", image_dir=out_images))
    assert [r.id for r in records] == ["0", "1", "2"]
    assert [r.reference for r in records] == ["red", "a gradient", None]
    assert records[1].messages[0]["content"] == [{"type": "image"},
                                                 {"type": "text", "text": "Describe."}]
    for r, img in zip(records, pil):
        (path,) = r.images
        assert Path(path).parent == out_images and Path(path).suffix == ".png"
        assert np.array_equal(np.asarray(D.load_image(path)), np.asarray(img))
    mtimes = [os.stat(r.images[0]).st_mtime_ns for r in records]
    again = list(D.read_dataset(tmp_path / "saved", prompt_column="question",
                                image_dir=out_images))          # saved once, not rewritten
    assert [os.stat(r.images[0]).st_mtime_ns for r in again] == mtimes
    with pytest.raises(ValueError, match="image_dir"):
        list(D.read_dataset(tmp_path / "saved", prompt_column="question"))
    with pytest.raises(ValueError, match="prompt column"):
        list(D.read_dataset(tmp_path / "saved", image_dir=out_images))

    # a parquet file with path strings and LLaVA-style conversations
    files = [str(tmp_path / f"{i}.png") for i in range(2)]
    for f, img in zip(files, pil):
        img.save(f)
    datasets.Dataset.from_dict({
        "image": ["0.png", files[1]], "uid": ["x", "y"],
        "conversations": [[{"from": "human", "value": "<image>\nQ0"},
                           {"from": "gpt", "value": "A0"}],
                          [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"}]],
    }).to_parquet(str(tmp_path / "data.parquet"))
    records = list(D.read_dataset(tmp_path / "data.parquet", prompt_column="conversations",
                                  id_column="uid", cache_dir=str(tmp_path / "hf_cache")))
    assert [(r.id, r.images, r.reference) for r in records] == [("x", [files[0]], "A0"),
                                                                ("y", [files[1]], "A1")]

    # an image folder read by datasets ("imagefolder"), prompts from templates
    (tmp_path / "folder").mkdir()
    for i, img in enumerate(pil):
        img.save(tmp_path / "folder" / f"{i}.png")
    records = list(D.read_dataset(tmp_path / "folder", prompts=["Describe.", "What is it?"],
                                  image_dir=out_images, cache_dir=str(tmp_path / "hf_cache")))
    assert len(records) == 3 and all(len(r.images) == 1 for r in records)
    assert all(Path(r.images[0]).is_file() for r in records)


def test_read_image_folder(tmp_path: Path):
    imgs = mt.sample_images()
    (tmp_path / "sub").mkdir()
    for name, rel in (("red", "b.png"), ("noise", "sub/a.JPG"), ("gradient", "a.webp")):
        imgs[name].save(tmp_path / rel, format={".png": "PNG", ".JPG": "JPEG",
                                                ".webp": "WEBP"}[Path(rel).suffix])
    (tmp_path / "notes.txt").write_text("not an image")
    templates = ["Describe this image.", "What do you see?", "<image>\nName the colours."]
    records = list(D.read_image_folder(tmp_path, templates, seed=3))
    rels = [r.id.rsplit("#", 1)[0] for r in records]
    assert rels == ["a.webp", "b.png", "sub/a.JPG"]
    for r, rel in zip(records, rels):
        k = int(r.id.rsplit("#", 1)[1])
        assert k == D.choose_template(rel, 3, seed=3)
        assert r.images == [str(tmp_path / rel)] and r.reference is None
        assert r.messages[0]["content"] == D.build_content(templates[k], 1)
    assert [r.id for r in D.read_image_folder(tmp_path, templates, seed=3)] == [
        r.id for r in records]                                   # deterministic
    everything = [r.id for r in D.read_image_folder(tmp_path, templates, all_prompts=True)]
    assert everything == [f"{rel}#{k}" for rel in rels for k in range(3)]
    assert len(list(D.read_image_folder(tmp_path, templates, limit=2))) == 2


def test_shard_assignment(llava: SimpleNamespace):
    ids = [f"img{i}.jpg#{i % 3}" for i in range(1000)]
    shards = [{i for i in ids if G.assign_shard(i, 2) == s} for s in range(2)]
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(ids)
    assert 400 < len(shards[0]) < 600
    assert [G.assign_shard(i, 2) for i in ids[:20]] == [D.shard_of(i, 2) for i in ids[:20]]
    assert all(G.assign_shard(i, 1) == 0 for i in ids)
    # readers' shard filter == generate's assignment, and together they cover the input
    records = _read_llava(llava)
    per_shard = [[r.id for r in D.read_llava_json(llava.json, image_root=llava.root, shard=s,
                                                  num_shards=2)] for s in range(2)]
    for s in range(2):
        assert per_shard[s] == [r.id for r in G.shard_records(records, s, 2)]
    assert sorted(per_shard[0] + per_shard[1]) == sorted(r.id for r in records)
    with pytest.raises(ValueError, match="duplicate"):
        G.shard_records(records + records[:1], 0, 1)


def test_cli_generate_arguments(llava: SimpleNamespace, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    calls: list[tuple[list, dict]] = []

    def fake_generate(records, **kwargs):
        calls.append((list(records), kwargs))
        return SimpleNamespace(complete=True)

    monkeypatch.setattr(G, "generate", fake_generate)
    rc = massv_main(["generate", "--target", "T", "--out", str(tmp_path), "--llava-json",
                     str(llava.json), "--image-root", str(llava.root), "--shard", "1",
                     "--num-shards", "2", "--max-tokens", "7", "--logprobs", "2", "--dtype",
                     "float32", "--enforce-eager", "--max-model-len", "2048", "--engine-arg",
                     "block_size=32", "--engine-arg", "enable_prefix_caching=false"])
    assert rc == 0
    records, kwargs = calls[0]
    assert [r.id for r in records] == [r.id for r in G.shard_records(_read_llava(llava), 1, 2)]
    assert kwargs["engine_kwargs"] == {"dtype": "float32", "enforce_eager": True,
                                       "max_model_len": 2048, "block_size": 32,
                                       "enable_prefix_caching": False}
    assert (kwargs["target"], kwargs["shard"], kwargs["num_shards"], kwargs["max_tokens"],
            kwargs["logprobs"], kwargs["temperature"]) == ("T", 1, 2, 7, 2, 0.0)
    assert kwargs["read_skipped"] == {"image_marker_mismatch": 1}
    for bad, msg in ((["--image-folder", str(tmp_path)], "--prompt"),
                     (["--llava-json", str(llava.json), "--shard", "2", "--num-shards", "2"],
                      "--shard"),
                     (["--llava-json", str(llava.json), "--shard", "1", "--shards", "0-1",
                       "--num-shards", "2"], "not both"),
                     (["--llava-json", str(llava.json), "--shards", "0-x"], "expected A-B"),
                     (["--llava-json", str(llava.json), "--shards", "1-0", "--num-shards", "2"],
                      "0 <= A <= B"),
                     (["--dataset", str(tmp_path / "nope")], "does not exist"),
                     (["--image-folder", str(tmp_path / "nope"), "--prompt", "Hi"],
                      "does not exist")):
        assert massv_main(["generate", "--target", "T", "--out", str(tmp_path)] + bad) == 2
        assert msg in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Generation (one shared engine)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(models):
    with engine(models.target, **ENGINE_OVERRIDES) as llm:
        yield llm


def _run(llm, records, out: Path, target: Path, **kw: Any) -> G.Summary:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Image, "MAX_IMAGE_PIXELS", BOMB_LIMIT)
        return G.generate(records, str(target), out, llm=llm, max_tokens=MAX_TOKENS,
                          max_image_pixels=MAX_PIXELS, progress=False, **kw)


def _rows(out: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    rows = [r for p in sorted((out / G.PARTS_DIR).glob("part-*.parquet"))
            for r in pq.read_table(p).to_pylist()]
    return sorted(rows, key=lambda r: r["id"])


@pytest.fixture(scope="module")
def full_run(llm, models, llava, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen_full")
    read_skipped: Counter = Counter()
    records = _read_llava(llava, read_skipped)
    summary = _run(llm, records, out, models.target, shard_size=5, read_skipped=read_skipped)
    return SimpleNamespace(out=out, summary=summary, records=records)


def test_generate_skips_bad_images(full_run, models):
    s = full_run.summary
    assert s.complete and s.records == 16 and s.written == s.written_total == len(GOOD)
    assert s.skipped == s.skipped_total == dict(Counter(BAD.values()))
    assert s.skipped_reading == {"image_marker_mismatch": 1}
    assert s.response_tokens > 0 and s.response_tokens_per_s > 0 and s.prompt_tokens > 0
    on_disk = json.loads((full_run.out / "summary-00000.json").read_text())
    assert on_disk["written_total"] == len(GOOD) and on_disk["complete"]
    rows = {r["id"]: r for r in _rows(full_run.out)}
    assert sorted(rows) == sorted(GOOD)
    for rid, row in rows.items():
        assert 0 < len(row["token_ids"]) <= MAX_TOKENS
        assert row["finish_reason"] in ("stop", "length")
        assert (row["temperature"], row["top_p"], row["max_tokens"], row["seed"]) == (
            0.0, 1.0, MAX_TOKENS, 0)
        assert row["target"] == str(models.target) and "top_logprobs" not in row
        n_img = len(row["images"])
        assert row["prompt"].count("<|image_pad|>") == n_img            # as rendered
        n_pad = row["prompt_token_ids"].count(mt.IMAGE_TOKEN_ID)
        assert n_pad > n_img if n_img else n_pad == 0                   # expanded by vLLM
        assert json.loads(row["messages"])[0]["role"] == "user"
    assert rows["r00"]["prompt"] == mt.image_prompt(models.target, "Describe this image.")
    assert rows["r00"]["reference"] == "A red square."
    assert rows["r12_text"]["images"] == [] and mt.IMAGE_TOKEN_ID not in rows["r12_text"][
        "prompt_token_ids"]
    assert len(rows["r13_two"]["images"]) == 2
    # the parts record the skipped ids; the last chunk (r15_long only) left a hidden marker
    import pyarrow.parquet as pq

    skipped = {}
    for p in (full_run.out / G.PARTS_DIR).glob("part-*.parquet"):
        skipped.update(json.loads(pq.read_schema(p).metadata[b"massv"])["skipped"])
    marker = json.loads((full_run.out / G.PARTS_DIR / ".part-00000-000003.empty.json").read_text())
    assert marker["skipped"] == {"r15_long": "prompt_too_long"}
    assert {**skipped, **marker["skipped"]} == BAD


def test_output_loads_and_equals_plain_generate(full_run, llm, tmp_path):
    import datasets
    from vllm import SamplingParams

    ds = datasets.load_dataset("parquet", data_dir=str(full_run.out),
                               cache_dir=str(tmp_path / "hf"))["train"]
    assert len(ds) == len(GOOD) and set(ds["id"]) == set(GOOD)
    assert ds.features["token_ids"].feature.dtype == "int32"
    rows = sorted(ds, key=lambda r: r["id"])
    prompts = []
    for row in rows:
        p: dict[str, Any] = {"prompt": row["prompt"]}
        if row["images"]:
            p["multi_modal_data"] = {"image": [D.load_image(f, MAX_PIXELS)
                                               for f in row["images"]]}
        prompts.append(p)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS),
                        use_tqdm=False)
    for row, o in zip(rows, outs):
        assert list(o.outputs[0].token_ids) == row["token_ids"], row["id"]
        assert list(o.prompt_token_ids) == row["prompt_token_ids"], row["id"]
        assert o.outputs[0].text == row["response"]


class _SharedEngine:
    """Stands in for `vllm.LLM(...)`: hands out the module's engine and keeps it running."""

    def __init__(self, llm):
        self.llm, self.calls = llm, []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return SimpleNamespace(**{n: getattr(self.llm, n) for n in (
            "model_config", "enqueue", "wait_for_completion", "get_tokenizer")},
            llm_engine=SimpleNamespace(engine_core=SimpleNamespace(shutdown=lambda: None),
                                       abort_request=self.llm.llm_engine.abort_request))


def test_interrupted_run_resumes_to_the_same_dataset(full_run, llm, models, llava, tmp_path,
                                                     monkeypatch):
    import vllm

    out = tmp_path / "gen"
    records = _read_llava(llava)
    first = _run(llm, records, out, models.target, shard_size=3, max_chunks=2)
    assert not first.complete and first.chunks_done == 2
    assert sorted(p.name for p in (out / G.PARTS_DIR).iterdir()) == [
        "part-00000-000000.parquet", "part-00000-000001.parquet"]
    assert first.written == 6 and not first.skipped
    (out / G.PARTS_DIR / ".part-00000-000002.parquet.tmp-999").write_bytes(b"half a chunk")

    # resume through the CLI; its engine start goes to the shared engine
    shared = _SharedEngine(llm)
    monkeypatch.setattr(vllm, "LLM", shared)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", BOMB_LIMIT)
    argv = ["generate", "--target", str(models.target), "--out", str(out), "--llava-json",
            str(llava.json), "--image-root", str(llava.root), "--shard-size", "3",
            "--max-tokens", str(MAX_TOKENS), "--max-image-pixels", str(MAX_PIXELS),
            "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
            "--max-num-seqs", "4", "--engine-arg", "block_size=32", "--no-progress"]
    assert massv_main(argv) == 0
    assert shared.calls == [{"model": str(models.target), "seed": 0,
                             "limit_mm_per_prompt": {"image": 2, "video": 0},
                             "dtype": "float32", "enforce_eager": True, "max_model_len": 2048,
                             "max_num_seqs": 4, "block_size": 32}]
    summary = json.loads((out / "summary-00000.json").read_text())
    assert summary["complete"] and summary["written"] == len(GOOD) - 6
    assert summary["written_total"] == len(GOOD)
    assert summary["skipped_total"] == dict(Counter(BAD.values()))
    names = sorted(p.name for p in (out / G.PARTS_DIR).iterdir())
    # chunk 5 (r15_long only) has no rows: a hidden marker; the stale temp file is gone
    assert names == [".part-00000-000005.empty.json"] + [G.part_name(0, c) for c in range(5)]

    rows, ref = _rows(out), _rows(full_run.out)
    assert len({r["id"] for r in rows}) == len(rows) == len(GOOD)
    assert rows == ref                                       # every column, every row

    # a finished data set: nothing to do, no engine started
    assert massv_main(argv) == 0 and len(shared.calls) == 1
    assert _rows(out) == ref
    # other settings into the same directory are refused (before any engine starts)
    with pytest.raises(MassvConfigError, match="temperature"):
        G.generate(records, str(models.target), out, temperature=0.7, max_tokens=MAX_TOKENS,
                   max_image_pixels=MAX_PIXELS, progress=False)


def test_logprobs_and_seeded_sampling(llm, models, llava, tmp_path):
    records = [r for r in _read_llava(llava) if r.id in ("r00", "r12_text", "r13_two")]
    s = _run(llm, records, tmp_path / "lp", models.target, logprobs=3)
    assert s.written == 3
    rows = _rows(tmp_path / "lp")
    for row in rows:
        n = len(row["token_ids"])
        assert len(row["top_logprob_ids"]) == len(row["top_logprobs"]) == n
        for tok, ids, lps in zip(row["token_ids"], row["top_logprob_ids"], row["top_logprobs"]):
            assert len(ids) == len(lps) == 3 and ids[0] == tok       # greedy = top-1
            assert lps[0] >= lps[1] >= lps[2] and lps[0] <= 0

    # sampling is seeded per request: the same rows whatever the chunking / batch
    good = [r for r in _read_llava(llava) if r.id in GOOD]
    _run(llm, good, tmp_path / "t1", models.target, temperature=1.0, seed=5, shard_size=20)
    _run(llm, good, tmp_path / "t2", models.target, temperature=1.0, seed=5, shard_size=2)
    sampled = _rows(tmp_path / "t1")
    assert sampled == _rows(tmp_path / "t2")
    greedy = {r["id"]: r["token_ids"] for r in _rows(tmp_path / "lp")}
    assert any(r["token_ids"] != greedy[r["id"]] for r in sampled if r["id"] in greedy)


@pytest.mark.slow
def test_parallel_shards_make_the_one_shard_dataset(full_run, models, llava, tmp_path):
    """`massv generate --shards 0-1 --num-shards 2`: two processes, each with its own engine and
    CPU core (`shard_device_envs`), run concurrently; every row lands in its own shard's parts,
    no id twice, and the union equals the 1-shard rows (greedy). Rerunning the command finds both
    shards complete and writes nothing."""
    from tests.support.profile import ENGINE_ARGS

    out, n = tmp_path / "gen2", 7   # the first 7 entries: r00..r06, all loadable
    engine_args = {**ENGINE_ARGS, **ENGINE_OVERRIDES}
    argv = ["generate", "--target", str(models.target), "--out", str(out), "--llava-json",
            str(llava.json), "--image-root", str(llava.root), "--limit", str(n),
            "--shards", "0-1", "--num-shards", "2", "--shard-size", "2",
            "--max-tokens", str(MAX_TOKENS), "--max-image-pixels", str(MAX_PIXELS),
            "--no-progress", "--dtype", "float32", "--enforce-eager",
            *[f"--engine-arg={k}={json.dumps(v)}" for k, v in engine_args.items()
              if k not in ("dtype", "enforce_eager")]]
    assert massv_main(argv) == 0
    rows = _rows(out)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == n
    one = {r["id"]: r for r in _rows(full_run.out)}
    for r in rows:
        assert (r["token_ids"], r["prompt_token_ids"], r["response"]) == (
            one[r["id"]]["token_ids"], one[r["id"]]["prompt_token_ids"], one[r["id"]]["response"])
    import pyarrow.parquet as pq

    for part in (out / G.PARTS_DIR).glob("part-*.parquet"):
        shard = int(part.name.split("-")[1])
        assert {G.assign_shard(i, 2) for i in pq.read_table(part).column("id").to_pylist()} == {
            shard}
    summaries = [json.loads((out / f"summary-{s:05d}.json").read_text()) for s in range(2)]
    assert all(s["complete"] for s in summaries)
    assert sum(s["written_total"] for s in summaries) == n and all(
        s["written_total"] for s in summaries)
    parts = sorted(p.name for p in (out / G.PARTS_DIR).iterdir())
    assert massv_main(argv) == 0                      # resume: both shards already complete
    assert sorted(p.name for p in (out / G.PARTS_DIR).iterdir()) == parts
    assert [json.loads((out / f"summary-{s:05d}.json").read_text())["written"]
            for s in range(2)] == [0, 0]
    assert massv_main([a if a != "0-1" else "1-2" for a in argv]) == 2  # beyond --num-shards


def test_shard_device_envs(monkeypatch: pytest.MonkeyPatch):
    """Each parallel shard gets its own GPUs (tensor_parallel_size each) or CPU cores."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    bind = "VLLM_CPU_OMP_THREADS_BIND"
    assert G.shard_device_envs(2, environ={}) == [{bind: "0,1"}, {bind: "2,3"}]
    assert G.shard_device_envs(2, 2, environ={bind: "auto"}) == [{bind: "0|1"}, {bind: "2|3"}]
    assert G.shard_device_envs(2, environ={bind: "0-3"}) == [{}, {}]   # the user's binding
    with pytest.raises(MassvConfigError, match="need 6 CPU cores; 5"):
        G.shard_device_envs(3, 2, environ={})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert G.shard_device_envs(4, 2, environ={}) == [
        {"CUDA_VISIBLE_DEVICES": d} for d in ("0,1", "2,3", "4,5", "6,7")]
    assert G.shard_device_envs(2, environ={"CUDA_VISIBLE_DEVICES": "3,5,7"}) == [
        {"CUDA_VISIBLE_DEVICES": "3"}, {"CUDA_VISIBLE_DEVICES": "5"}]
    with pytest.raises(MassvConfigError, match="need 16 GPUs; 8"):
        G.shard_device_envs(8, 2, environ={})
