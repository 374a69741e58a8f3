"""The whole MASSV path on tiny models: init, generate, train, serve through the `massv` CLI.

The whole MASSV path on tiny models, through the `massv` CLI and vLLM:

massv init -> massv generate (vLLM, the target answers) -> massv train --phase align ->
massv train --phase sdvit -> vLLM serves the trained drafter: greedy output identical to the
target alone, and held-out draft/target token agreement higher after training than before.
"""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest

from tests.support.data import shape_records
from tests.support.engine import engine, generate, spec_config
from tests.support.profile import ENGINE_ARGS, cli_flags
from vllm_massv.cli import main as massv

pytestmark = pytest.mark.slow
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def run(models, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pipeline")
    records = shape_records(root)
    (root / "shapes.json").write_text(json.dumps(records))
    data, drafter = root / "data", root / "drafter"
    engine_flags = [f"--engine-arg={k}={json.dumps(v)}" for k, v in ENGINE_ARGS.items()
                    if k not in ("dtype", "max_model_len", "max_num_seqs", "enforce_eager",
                                 "max_num_batched_tokens", "disable_log_stats")]
    assert massv(["init", "--target", str(models.target), "--draft-lm", str(models.text_lm),
                  "--out", str(drafter), "--seed", "0"]) == 0
    assert massv(["generate", "--target", str(models.target), "--llava-json",
                  str(root / "shapes.json"), "--out", str(data), "--max-tokens", str(MAX_TOKENS),
                  *cli_flags(), "--max-model-len", "2048",
                  "--max-num-seqs", "4", "--max-num-batched-tokens", "64", "--no-progress",
                  *engine_flags]) == 0
    common = ["--data", str(data), "--target", str(models.target), "--batch-size", "8",
              "--eval-fraction", "0.25", "--feature-cache", str(root / "features")]
    assert massv(["train", "--phase", "align", "--drafter", str(drafter), "--out",
                  str(root / "align"), "--max-steps", "30", "--lr", "3e-3", *common]) == 0
    assert massv(["train", "--phase", "sdvit", "--drafter", str(root / "align"), "--out",
                  str(root / "sdvit"), "--max-steps", "90", "--lr", "2e-3", *common]) == 0
    rows = [r for f in sorted((data / "train").glob("part-*.parquet"))
            for r in pq.read_table(f).to_pylist()]
    summary = json.loads(next(data.glob("summary-*.json")).read_text())
    logs = {phase: [json.loads(ln) for ln in (root / phase / "train_log.jsonl").read_text()
                    .splitlines()] for phase in ("align", "sdvit")}
    return {"root": root, "rows": rows, "summary": summary, "logs": logs}


def test_generate_wrote_every_prompt(run):
    assert len(run["rows"]) == 36 and run["summary"]["complete"]
    assert not any(run["summary"]["skipped_total"].values())
    print(f"massv generate: {run['summary']['response_tokens_per_s']:.0f} response tokens/s")


def test_heldout_agreement_rises(run):
    """Each phase raises held-out agreement on its own labels: align on the data set's captions,
    sdvit on the target's responses. (The tiny target has random weights: its answers are
    gibberish that held-out images share little of, so sdvit's held-out gain is small here;
    training agreement shows it learns them.)"""
    align, sdvit = run["logs"]["align"], run["logs"]["sdvit"]
    steps = {p: json.loads((run["root"] / p / "train_summary.json").read_text())["steps_per_s"]
             for p in ("align", "sdvit")}
    print(f"held-out agreement: align (captions) {align[0]['eval_agreement']:.3f} -> "
          f"{align[-1]['eval_agreement']:.3f}; sdvit (target responses) "
          f"{sdvit[0]['eval_agreement']:.3f} -> {sdvit[-1]['eval_agreement']:.3f} "
          f"(train {sdvit[1]['agreement']:.3f} -> {sdvit[-1]['agreement']:.3f}); "
          f"train steps/s {steps}")
    assert align[-1]["eval_agreement"] > align[0]["eval_agreement"] + 0.2
    assert sdvit[-1]["eval_agreement"] > sdvit[0]["eval_agreement"]
    assert sdvit[-1]["agreement"] > sdvit[1]["agreement"] + 0.5
    assert all(math.isfinite(r.get("loss", 0.0)) for r in align + sdvit)


def test_trained_drafter_serves_losslessly(run, models):
    from PIL import Image
    from vllm import SamplingParams

    rows = sorted(run["rows"], key=lambda r: r["id"])[:12]
    prompts = {r["id"]: {"prompt": r["prompt"], "multi_modal_data": {"image": [
        Image.open(p).convert("RGB") for p in r["images"]]}} for r in rows}
    with engine(models.target, spec_config(run["root"] / "sdvit", 3)) as llm:
        outs = generate(llm, prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    for r in rows:
        assert list(outs[r["id"]].outputs[0].token_ids) == r["token_ids"], r["id"]
    acc = sum(sum(o.outputs[0].spec_decode_metrics.per_step_accepted) for o in outs.values())
    drafted = sum(sum(o.outputs[0].spec_decode_metrics.per_step_drafted) for o in outs.values())
    print(f"trained tiny drafter served by vLLM: acceptance {acc / max(drafted, 1):.3f}")
