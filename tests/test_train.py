"""Training phases on tiny models without a vLLM engine: resume, phase semantics, export, and the
parity of the transformers drafter with vLLM's (the logits test lives in test_pipeline.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vllm_massv import testing as mt
from vllm_massv.training.train import TrainConfig, train


@pytest.fixture(scope="module")
def dataset(models, tmp_path_factory) -> Path:
    """A small `massv generate`-format data set: image prompts; the 'target' responses name the
    image, so a drafter can learn them only through the projector."""
    from transformers import AutoProcessor

    root = tmp_path_factory.mktemp("data")
    (root / "train").mkdir()
    processor = AutoProcessor.from_pretrained(models.target)
    images = mt.sample_images()
    rows = []
    for i in range(24):
        name = ["astronaut", "chelsea", "red", "gradient", "noise"][i % 5]
        path = root / f"{name}.png"
        if not path.exists():
            images[name].save(path)
        prompt = mt.image_prompt(models.target, f"Question number {i}: what is shown?")
        ids = processor(text=[prompt], images=[images[name]])["input_ids"][0]
        reference = f"A picture of a {name}."
        response = processor.tokenizer(reference, add_special_tokens=False)["input_ids"] + [2]
        rows.append({"id": f"s{i:03d}", "prompt_token_ids": list(map(int, ids)),
                     "images": [str(path)], "token_ids": response,
                     "reference": reference, "prompt": prompt})
    pq.write_table(pa.Table.from_pylist(rows), root / "train" / "part-00000-000000.parquet")
    return root


def _cfg(models, dataset, out, **kw) -> TrainConfig:
    base = dict(phase="sdvit", drafter=str(models.blind), data=str(dataset),
                target=str(models.target), out=str(out), max_steps=6, batch_size=4, lr=3e-3,
                eval_fraction=0.2, save_every=3, seed=0)
    return TrainConfig(**(base | kw))


def _log(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]


def test_resume_continues_the_same_loss_curve(models, dataset, tmp_path):
    straight = train(_cfg(models, dataset, tmp_path / "straight"))
    interrupted = tmp_path / "resumed"
    assert train(_cfg(models, dataset, interrupted, stop_after=4)) == {"stopped_at": 4}
    resumed = train(_cfg(models, dataset, interrupted))   # continues from checkpoints/step-3
    a, b = _log(tmp_path / "straight"), _log(interrupted)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(7))
    for ra, rb in zip(a, b):
        for key in ("loss", "eval_loss", "agreement"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (ra, rb)
    assert resumed["steps"] == straight["steps"] == 6


def test_align_trains_only_the_projector(models, dataset, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "align"
    train(_cfg(models, dataset, out, phase="align", max_steps=3, save_every=0))
    before = load_file(models.blind / "model.safetensors")
    after = load_file(out / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("mm_projector.") for k in changed), changed
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MassvQwen2ForCausalLM"]
    assert config["massv"] == json.loads((models.blind / "config.json").read_text())["massv"]
    assert (out / "tokenizer.json").is_file()


def test_sdvit_raises_heldout_agreement(models, dataset, tmp_path):
    out = tmp_path / "sdvit"
    final = train(_cfg(models, dataset, out, max_steps=40, save_every=0, lr=5e-3,
                       eval_fraction=0.0))
    log = _log(out)
    # no held-out split here (eval_fraction 0): training agreement must rise on memorizable data
    assert log[-1]["agreement"] > log[1]["agreement"] + 0.2, (log[1], log[-1])
    assert final["steps"] == 40
