"""Data-parallel training with 2 real CPU processes through `accelerate launch`.

`accelerate launch --multi_gpu --num_processes 2`: torchrun starts 2 ranks; without CUDA the
trainer's Accelerator runs them on the CPU over gloo (accelerate's own `--cpu` launcher starts
several processes only through MPI). Each rank gets its own share of every global batch, 2 ranks
x batch B follow the loss curve of 1 rank x batch 2B, and a resumed 2-rank run equals an
uninterrupted one.

Each launch starts 2 Python processes (about 20 s each on a 2-core CPU); no vLLM engine.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from test_train import _cfg, _log, dataset  # noqa: F401 -- the shared data set fixture

from vllm_massv.training.loop import TrainConfig, train

pytestmark = pytest.mark.slow
RUN = dict(max_steps=5, grad_accum=2, save_every=2, eval_fraction=0.2, log_examples=True)
B = 2  # per-rank micro-batch of the 2-rank runs; the 1-rank run uses 2 * B


def _launch(cfg: TrainConfig, num_processes: int = 2) -> None:
    """`accelerate launch --multi_gpu --num_processes N -m vllm_massv.training.train
    <config.json>` (on this CPU: N gloo ranks)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    config = out.parent / f"{out.name}-config.json"
    config.write_text(json.dumps(asdict(cfg)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes",
           str(num_processes), "--num_machines", "1", "--multi_gpu", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "vllm_massv.training.train", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _examples(out: Path, rank: int) -> list[dict]:
    return [json.loads(ln) for ln in (out / f"examples-rank{rank}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(models, dataset, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    root = tmp_path_factory.mktemp("ddp")
    paths = {name: root / name for name in ("one", "two", "resumed")}
    train(_cfg(models, dataset, paths["one"], batch_size=2 * B, **RUN))
    _launch(_cfg(models, dataset, paths["two"], batch_size=B, **RUN))
    _launch(_cfg(models, dataset, paths["resumed"], batch_size=B, stop_after=3, **RUN))
    assert not (paths["resumed"] / "model.safetensors").exists()
    _launch(_cfg(models, dataset, paths["resumed"], batch_size=B, **RUN))  # from step-2
    return paths


def test_ranks_get_disjoint_shares_of_the_epoch(runs, models, dataset):  # noqa: F811
    """Rank r's micro-batch m of step s is global micro-batch (s*grad_accum + m)*2 + r: the
    ranks' examples are disjoint, their union in that order is the 1-rank stream (the same global
    batches), and the first len(train set) of it is one epoch: every example exactly once."""
    from transformers import AutoTokenizer

    from vllm_massv.training.examples import load_examples, split_examples

    cfg = _cfg(models, dataset, "unused", **RUN)
    train_ids, _ = split_examples(load_examples(cfg, AutoTokenizer.from_pretrained(cfg.drafter)),
                                  cfg.eval_fraction, cfg.seed)
    ranks = [_examples(runs["two"], r) for r in range(2)]
    assert [r["step"] for r in ranks[0]] == [r["step"] for r in ranks[1]] == list(range(5))
    stream = []
    for s in range(5):
        for m in range(RUN["grad_accum"]):
            shares = [ranks[r][s]["ids"][m] for r in range(2)]
            assert all(len(x) == B for x in shares)
            assert not set(shares[0]) & set(shares[1]), (s, m, shares)
            stream += shares[0] + shares[1]
    one = [i for r in _examples(runs["one"], 0) for micro in r["ids"] for i in micro]
    assert stream == one
    n = len(train_ids)
    assert len(stream) == 5 * 2 * B * RUN["grad_accum"] > n
    assert sorted(stream[:n]) == sorted(e.id for e in train_ids)


def test_two_ranks_follow_the_one_rank_loss_curve(runs):
    """2 ranks x batch B == 1 rank x batch 2B, step by step (fp32: only the summation order and
    the padded batch shapes differ), held-out metrics included; logged once (main process)."""
    one, two = _log(runs["one"]), _log(runs["two"])
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(6))
    diffs = {}
    for ra, rb in zip(one, two):
        for key in ("loss", "eval_loss", "agreement", "eval_agreement", "lr"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5), (key, ra, rb)
                diffs[key] = max(diffs.get(key, 0.0), abs(ra[key] - rb[key]))
    assert one[-1]["loss"] < one[1]["loss"]  # it trains
    summary = json.loads((runs["two"] / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["global_batch"] == 2 * B * RUN["grad_accum"]
    print("max |1-rank - 2-rank| per metric:", diffs)


def test_resumed_two_rank_run_equals_uninterrupted(runs):
    """Stopped after step 3, resumed from checkpoints/step-2 (2 ranks both times): the same
    examples per rank and step, the same losses, the same exported weights."""
    from safetensors.torch import load_file

    a, b = _log(runs["two"]), _log(runs["resumed"])
    assert [r["step"] for r in b] == list(range(6))
    for ra, rb in zip(a, b):
        for key in ("loss", "eval_loss", "agreement"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra, rb)
    for r in range(2):
        assert _examples(runs["two"], r) == _examples(runs["resumed"], r)
    wa = load_file(runs["two"] / "model.safetensors")
    wb = load_file(runs["resumed"] / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5
