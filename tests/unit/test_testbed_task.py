"""The testbed task generator (`benchmarks/testbed/task.py`), without a vLLM engine.

The testbed task generator (benchmarks/testbed/task.py): determinism, held-out splits, question
validity, answer lengths, the checker, and images that carry the answers. No vLLM engine."""

from __future__ import annotations

import itertools
import json
import random
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.testbed import task

SIZES = dict(n_train=120, n_val=40, n_test=40)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[task.Sample]]]:
    out = tmp_path_factory.mktemp("testbed")
    return out, task.build_splits(out, seed=3, **SIZES)


@pytest.fixture(scope="module")
def many() -> dict[str, list[task.Sample]]:
    """Larger splits, generated in memory only."""
    sizes = {"train": 1500, "val": 300, "test": 300}
    return {split: task.generate_split(split, n, seed=0) for split, n in sizes.items()}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_is_deterministic(built, tmp_path: Path) -> None:
    out, splits = built
    again = task.build_splits(tmp_path / "again", seed=3, **SIZES)
    first, second = _files(out), _files(tmp_path / "again")
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []
    n_images = sum(s.has_image for samples in splits.values() for s in samples)
    assert sum(k.endswith(".png") for k in first) == n_images
    assert {"train.json", "val.json", "test.json", "metadata.jsonl", "info.json"} <= first.keys()
    assert [s.to_dict() for s in again["test"]] == [s.to_dict() for s in splits["test"]]
    # another seed gives other data
    other = task.generate_split("test", SIZES["n_test"], seed=4)
    assert [s.answer for s in other] != [s.answer for s in splits["test"]]


def test_rebuild_smaller_removes_stale_images(tmp_path: Path) -> None:
    task.build_splits(tmp_path, seed=1, n_train=30, n_val=10, n_test=10)
    task.build_splits(tmp_path, seed=1, n_train=10, n_val=10, n_test=10)
    entries = json.loads((tmp_path / "train.json").read_text())
    pngs = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "images/train").glob("*"))
    assert pngs == sorted(e["image"] for e in entries if "image" in e)


def test_files_and_reader(built) -> None:
    from vllm_massv.training.data import read_llava_json

    out, splits = built
    for split, samples in splits.items():
        entries = json.loads((out / f"{split}.json").read_text())
        assert [e["id"] for e in entries] == [s.id for s in samples]
        for entry, sample in zip(entries, samples):
            human, gpt = entry["conversations"]
            assert gpt == {"from": "gpt", "value": sample.answer}
            if sample.has_image:
                assert human["value"] == "<image>\n" + sample.prompt
                assert (out / entry["image"]).is_file()
            else:
                assert "image" not in entry and human["value"] == sample.prompt
        records = list(read_llava_json(out / f"{split}.json"))
        assert len(records) == len(samples)
        for rec, sample in zip(records, samples):
            assert rec.reference == sample.answer
            assert len(rec.images) == int(sample.has_image)
            assert rec.messages == task.messages(sample)
        loaded = task.load_split(out, split)
        assert [s.to_dict() for s in loaded] == [s.to_dict() for s in samples]
    info = json.loads((out / "info.json").read_text())
    assert info["sizes"] == {"train": 120, "val": 40, "test": 40} and info["seed"] == 3


def test_png_matches_render(built) -> None:
    from PIL import Image

    out, splits = built
    sample = next(s for s in splits["val"] if s.has_image)
    with Image.open(out / task.image_path(sample)) as im:
        assert im.size == (task.IMAGE_SIZE, task.IMAGE_SIZE) and im.mode == "RGB"
        assert im.tobytes() == task.render(sample.scene).tobytes()


def test_splits_disjoint(built, many) -> None:
    for splits in (built[1], many):
        keys = {split: {s.key for s in samples} for split, samples in splits.items()}
        scenes = {split: {s.scene.key for s in samples if s.has_image}
                  for split, samples in splits.items()}
        for a, b in itertools.combinations(task.SPLITS, 2):
            assert not keys[a] & keys[b], (a, b)
            assert not scenes[a] & scenes[b], (a, b)
        for split, samples in splits.items():
            assert all(task.split_of(s.key, 0 if splits is many else 3) == split for s in samples)
            assert len({s.id for s in samples}) == len(samples)


def test_every_kind_in_every_split(built, many) -> None:
    for splits in (built[1], many):
        for split, samples in splits.items():
            counts = Counter(s.kind for s in samples)
            assert set(counts) == set(task.KINDS), (split, counts)
            text_share = sum(counts[k] for k in task.TEXT_KINDS) / len(samples)
            assert 0.1 <= text_share <= 0.2


def _all(many) -> list[task.Sample]:
    return [s for samples in many.values() for s in samples]


def test_questions_make_sense(many) -> None:
    for s in _all(many):
        if s.kind in task.TEXT_KINDS:
            assert s.scene is None and s.target is None
            continue
        assert s.scene is not None
        shapes = s.scene.shapes
        assert 1 <= len(shapes) <= task.MAX_SHAPES
        assert [x.slot for x in shapes] == sorted({x.slot for x in shapes})
        assert s.scene.text_slot not in {x.slot for x in shapes}
        if s.kind == "colour":
            t = shapes[s.target]
            assert sum(x.type == t.type for x in shapes) == 1
            assert t.type in s.prompt and t.colour not in s.prompt
        elif s.kind == "where":
            t = shapes[s.target]
            assert sum((x.type, x.colour) == (t.type, t.colour) for x in shapes) == 1
            assert f"{t.colour} {t.type}" in s.prompt
        else:
            assert s.target is None
        if s.kind == "read":
            assert s.scene.text is not None
        if s.scene.text is not None:
            assert len(shapes) <= task.MAX_SHAPES_WITH_TEXT
            assert s.scene.text.isdigit() or s.scene.text in task.IMAGE_WORDS
    kinds_with_text = {s.kind for s in _all(many) if s.has_image and s.scene.text is not None}
    assert kinds_with_text == set(task.IMAGE_KINDS)  # text also appears in other questions' images


def test_answer_lengths_and_variety(many) -> None:
    samples = _all(many)
    for s in samples:
        assert s.answer in s.answer_variants and len(set(s.answer_variants)) >= 2
        for v in s.answer_variants:
            assert task.MIN_WORDS <= len(v.split()) <= task.MAX_WORDS, v
    for kind in task.KINDS:
        chosen = {s.answer_variants.index(s.answer) for s in samples if s.kind == kind}
        assert len(chosen) >= 2, kind  # the seeded RNG really picks different templates
    assert len({s.prompt for s in samples if s.kind == "describe"}) >= 2
    describe = [len(s.answer.split()) for s in samples if s.kind == "describe"]
    assert sum(describe) / len(describe) >= 30


def _swap(text: str, old: str, new: str) -> str:
    out, n = re.subn(rf"\b{re.escape(old)}\b", new, text, count=1)
    assert n == 1, (old, text)
    return out


def test_checker_accepts_every_template_and_rejects_corruptions(many) -> None:
    colours, n_checked = list(task.COLOURS), Counter()
    for s in _all(many)[:800]:
        for v in s.answer_variants:
            assert task.correct(s, v) and task.exact_match(s, v), v
            assert all(task.score(s, v).values())
        assert task.correct(s, "  " + s.answer.upper().replace(" ", "  ") + " ")
        assert list(task.score(s, s.answer)) == list(task.KIND_ATTRS[s.kind])
        assert not task.correct(s, "") and not task.correct(s, "I do not know.")
        if s.kind in task.TEXT_KINDS:
            numbers = re.findall(r"\b\d+\b", s.answer)
            if numbers:
                bad = _swap(s.answer, numbers[-1], str(int(numbers[-1]) + 1))
                assert not task.correct(s, bad)
                n_checked["text"] += 1
            continue
        shapes = s.scene.shapes
        if s.kind in ("colour", "where", "describe", "count"):
            shape = shapes[s.target] if s.target is not None else shapes[0]
            wrong = colours[(colours.index(shape.colour) + 1) % len(colours)]
            bad = _swap(s.answer, shape.colour, wrong)
            sc = task.score(s, bad)
            assert not sc["colour"] and not task.correct(s, bad) and not task.exact_match(s, bad)
            others = {k: v for k, v in sc.items() if k != "colour"}
            assert all(others.values()), sc  # partial credit for the rest
            n_checked["colour"] += 1
        if s.kind in ("count", "describe"):
            n = len(shapes)
            words = ("zero", "one", "two", "three", "four", "five")
            wrong_n = 3 if n != 3 else 2
            bad = re.sub(rf"\b{words[n]} (shapes?)\b", f"{words[wrong_n]} shapes", s.answer,
                         count=1)
            assert bad != s.answer
            assert not task.score(s, bad)["count"] and not task.correct(s, bad)
            n_checked["count"] += 1
        if s.kind == "where":
            pos = task.extract(s.answer, "where")["position"]
            word = next(iter(pos))
            phrase = {"centre": r"(centre|middle)"}.get(word, word)
            new = "bottom right" if word != "bottom right" else "top left"
            bad = re.sub(rf"\b{phrase}\b", new, s.answer, count=1)
            assert not task.score(s, bad)["position"] and not task.correct(s, bad)
            n_checked["where"] += 1
        if s.kind == "read":
            text = s.scene.text
            wrong = str(int(text) % 99 + 1) if text.isdigit() else "ZZZ"
            bad = _swap(s.answer, text, wrong)
            assert not task.score(s, bad)["text"] and not task.correct(s, bad)
            n_checked["read"] += 1
    assert min(n_checked.values()) >= 10 and len(n_checked) == 5, n_checked


def test_checker_ignores_wording_but_not_order() -> None:
    rng = random.Random(0)
    s = task.make_sample(rng, "describe")
    while len(s.scene.shapes) < 2 or len({x.colour for x in s.scene.shapes}) < 2:
        s = task.make_sample(rng, "describe")
    a, b = s.scene.shapes[:2]
    # other words, same facts in the same order: right
    sentences = [f"Here, {x.size} {x.colour} {x.type}, {x.position}." for x in s.scene.shapes]
    n_word = ("zero", "one", "two", "three", "four")[len(s.scene.shapes)]
    paraphrase = f"{n_word} shapes. " + " ".join(sentences)
    if s.scene.text is not None:
        t = s.scene.text if s.scene.text.isdigit() else f'"{s.scene.text}"'
        paraphrase += f" Writing {t} at the {task.POSITIONS[s.scene.text_slot]}."
    assert task.correct(s, paraphrase) and not task.exact_match(s, paraphrase)
    # colours of the first two shapes swapped: wrong colour, the rest right
    swapped = paraphrase.replace(f"{a.size} {a.colour} {a.type}", "\0", 1)
    swapped = swapped.replace(f"{b.size} {b.colour} {b.type}", f"{b.size} {a.colour} {b.type}", 1)
    swapped = swapped.replace("\0", f"{a.size} {b.colour} {a.type}")
    assert task.score(s, swapped) == {**task.score(s, paraphrase), "colour": False}


def test_render_depends_on_every_attribute() -> None:
    shapes = (task.Shape("circle", "red", "big", 0, 30, 30),
              task.Shape("square", "blue", "small", 2, 70, 70))
    scene = task.Scene(shapes, text="CAT", text_slot=4, text_x=110, text_y=110)
    base = task.render(scene).tobytes()
    assert task.render(scene).tobytes() == base
    s0 = scene.shapes[0]
    changed = {
        "colour": replace(s0, colour="green"),
        "size": replace(s0, size="small"),
        "type": replace(s0, type="triangle"),
        "position": replace(s0, slot=1, x=110, y=30),
    }
    for attr, shape in changed.items():
        other = replace(scene, shapes=(shape, scene.shapes[1]))
        assert other.key != scene.key
        assert task.render(other).tobytes() != base, attr
    for attr, other in {"text": replace(scene, text="DOG"),
                        "number": replace(scene, text="42"),
                        "no text": replace(scene, text=None, text_slot=None)}.items():
        assert other.key != scene.key
        assert task.render(other).tobytes() != base, attr
    # jitter changes pixels but not the scene key
    jittered = replace(scene, shapes=(replace(s0, x=31), scene.shapes[1]))
    assert jittered.key == scene.key and task.render(jittered).tobytes() != base


def _overlap(a, b) -> bool:
    from PIL import ImageChops, ImageFilter

    return ImageChops.multiply(a.filter(ImageFilter.MaxFilter(3)), b).getbbox() is not None


def test_objects_never_overlap_or_leave_the_canvas() -> None:
    """Every pair of positions, every pair of object kinds at the big size, worst-case jitter."""
    j = task.JITTER
    objects = [*task.SHAPES, "text"]
    widest = max(task.IMAGE_WORDS, key=lambda w: task._font().getlength(w))
    inner = (1, 1, task.IMAGE_SIZE - 1, task.IMAGE_SIZE - 1)
    for (sa, sb), (oa, ob) in itertools.product(
            itertools.combinations(range(len(task.POSITIONS)), 2),
            itertools.product(objects, repeat=2)):
        if oa == ob == "text":
            continue
        (xa, ya), (xb, yb) = task.SLOT_XY[sa], task.SLOT_XY[sb]
        # jitter each object towards the other (the closest they get)
        da = (j * ((xb > xa) - (xb < xa)), j * ((yb > ya) - (yb < ya)))
        pa, pb = (xa + da[0], ya + da[1]), (xb - da[0], yb - da[1])
        shapes, text = [], None
        for obj, slot, (x, y) in ((oa, sa, pa), (ob, sb, pb)):
            if obj == "text":
                text = (slot, x, y)
            else:
                shapes.append(task.Shape(obj, "red", "big", slot, x, y))
        kw = {} if text is None else dict(text=widest, text_slot=text[0], text_x=text[1],
                                          text_y=text[2])
        scene = task.Scene(tuple(shapes), **kw)
        m1, m2 = task.object_masks(scene)
        assert not _overlap(m1, m2), (sa, sb, oa, ob)
        for m in (m1, m2):
            box = m.getbbox()
            assert box[0] >= inner[0] and box[1] >= inner[1], (sa, sb, oa, ob, box)
            assert box[2] <= inner[2] and box[3] <= inner[3], (sa, sb, oa, ob, box)


def test_sampled_scenes_never_overlap() -> None:
    rng = random.Random(7)
    for _ in range(150):
        masks = task.object_masks(task.sample_scene(rng))
        for a, b in itertools.combinations(masks, 2):
            assert not _overlap(a, b)


def test_corpus_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = task.corpus(50)
    assert lines == task.corpus(50) and all(isinstance(x, str) and x for x in lines)
    text = " ".join(lines)
    for word in (*task.SHAPES, *task.COLOURS, *task.IMAGE_WORDS, "middle", "large"):
        assert word in text
    assert task.main(["--out", str(tmp_path), "--train", "30", "--val", "20",
                      "--test", "20", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    for kind in task.KINDS:
        assert re.search(rf"^{kind}\s", out, re.M), kind
    assert (tmp_path / "test.json").is_file()
