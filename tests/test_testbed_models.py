"""The checked-in CPU testbed (benchmarks/testbed/models) and benchmarks/throughput.py.

* the zero-output padding that makes the target costlier leaves its logits bit-identical;
* the trained target answers held-out questions above a floor (and better than the blind LM,
  which cannot see the image);
* a one-config run of the throughput benchmark writes every field, and its greedy outputs
  match the target's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import throughput as tp
from benchmarks.testbed import assets, models, task

ROOT = Path(__file__).resolve().parents[1]
MODELS = assets.MODELS
DRAFTERS = ("drafter-distilled", "drafter-phase1", "drafter-massv", "drafter-massv-mrope")


def test_checked_in_models_are_complete_and_small() -> None:
    total = 0
    for name in ("target", "blind", *DRAFTERS):
        d = MODELS / name
        assert (d / "config.json").is_file(), d
        assert (d / "model.safetensors").is_file(), d
        assert (d / "tokenizer.json").is_file(), d
        assert not (d / "checkpoints").exists(), f"{d}: training scratch checked in"
        total += sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    assert total <= 30 * 2**20, f"testbed models take {total / 2**20:.1f} MiB (> 30 MiB)"
    for name in DRAFTERS:
        cfg = json.loads((MODELS / name / "config.json").read_text())
        assert "massv" in cfg
        expected = "none" if name == "drafter-distilled" else "mlp2x_gelu"
        assert cfg["massv"]["projector"] == expected, name
        assert cfg["massv"]["positions"] == ("mrope" if name.endswith("mrope") else "1d"), name


def test_padding_keeps_logits_identical(tmp_path: Path) -> None:
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    padded = assets.pad_target(MODELS / "target", tmp_path / "padded", extra_layers=3)
    cfg = json.loads((padded / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 9
    processor = AutoProcessor.from_pretrained(str(MODELS / "target"))
    sample = task.make_sample(__import__("random").Random(3), "describe")
    text = models.chat_prompt(processor.tokenizer, sample) + sample.answer
    inputs = processor(text=[text], images=[task.render(sample.scene)], return_tensors="pt",
                       return_mm_token_type_ids=True)
    logits = []
    for path in (MODELS / "target", padded):
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32)
        with torch.no_grad():
            logits.append(model(**inputs).logits)
    assert len(model.model.language_model.layers) == 9
    assert torch.equal(logits[0], logits[1])
    with pytest.raises(ValueError, match="extra_layers"):
        assets.pad_target(MODELS / "target", tmp_path / "bad", extra_layers=-1)


@pytest.fixture(scope="module")
def target_report() -> dict:
    return models.evaluate(MODELS / "target", n=32, split="test", batch_size=16)


def test_target_accuracy_floor(target_report: dict) -> None:
    kinds = target_report["kinds"]
    print(json.dumps({k: v["all_correct"] for k, v in kinds.items()}))
    assert kinds["count"]["count"] >= 0.6
    image = [v for k, v in kinds.items() if k in task.IMAGE_KINDS]
    n = sum(v["n"] for v in image)
    assert sum(v["all_correct"] * v["n"] for v in image) / n >= 0.4
    text = [v for k, v in kinds.items() if k in task.TEXT_KINDS]
    assert sum(v["answer"] * v["n"] for v in text) / sum(v["n"] for v in text) >= 0.8


def test_blind_lm_cannot_see(target_report: dict) -> None:
    blind = models.evaluate(MODELS / "blind", n=32, split="test", batch_size=16)

    def image_acc(report: dict) -> float:
        rows = [v for k, v in report["kinds"].items() if k in task.IMAGE_KINDS]
        return sum(v["all_correct"] * v["n"] for v in rows) / sum(v["n"] for v in rows)

    assert image_acc(blind) < image_acc(target_report) - 0.2


def test_method_parse() -> None:
    assert tp.Method.parse("a=none") == tp.Method("a", "none")
    assert tp.Method.parse("m=massv:/x").speculative_config(3) == {
        "method": "draft_model", "model": "/x", "num_speculative_tokens": 3}
    assert tp.Method.parse("n=ngram").speculative_config(2)["method"] == "ngram"
    for bad in ("nolabel", "a=draft_model", "a=none:/x", "a=eagle:/x"):
        with pytest.raises(ValueError):
            tp.Method.parse(bad)
    with pytest.raises(ValueError, match="massv"):
        tp.Method("b", "massv", str(MODELS / "blind")).speculative_config(2)


@pytest.mark.slow
def test_throughput_smoke(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--testbed",
           str(assets.TESTBED), "--method", f"massv=massv:{MODELS / 'drafter-massv'}",
           "--k", "2", "--batch-sizes", "1", "--temperatures", "0", "--num-prompts", "4",
           "--max-tokens", "32", "--out", str(out), "--no-progress"]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    meta = data["meta"]
    for key in ("target", "device", "c", "target_itl_ms", "drafter_itl_ms", "num_prompts",
                "num_image_prompts", "reference", "methods"):
        assert meta[key] is not None, key
    assert 0 < meta["c"] < 1.5
    rows = {r["method"]: r for r in data["results"]}
    assert set(rows) == {"none", "massv"}
    fields = set(tp.RunResult.__dataclass_fields__)
    m = rows["massv"]
    assert set(m) == fields
    assert m["greedy_equal"] is True and m["greedy_mismatches"] == []
    assert 1.0 <= m["tau"] <= 3.0 and len(m["acceptance_per_position"]) == 2
    assert m["tau_per_kind"] and "all image prompts" in m["tau_per_kind"]
    assert m["speedup_vs_none"] > 0 and m["analytic_bound"] > 0
    assert m["output_tokens"] > 0 and m["latency_p90_s"] >= m["latency_p50_s"] > 0
    assert rows["none"]["tau"] is None
    for name in ("results.md", "tau_vs_k.png", "speedup_vs_batch.png",
                 "acceptance_per_position.png"):
        assert (out / name).stat().st_size > 0, name
