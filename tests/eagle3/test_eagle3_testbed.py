"""The trained testbed EAGLE-3 head in stock vLLM: accepted, and equal to the transformers replay.

The head (`benchmarks/testbed/models/drafter-eagle3`) in
stock vLLM, method eagle3, k = 4, on the unpadded testbed target (CPU, fp32, eager, the test
profile's 64-token chunks): 12 held-out test-split questions (the scenes never appear in the
training data), greedy.

* vLLM's per-step accepted counts equal a replay: the transformers twin drafts greedily along
  the emitted output (with vLLM's partial-prefill rows, `tests.support.replay.Eagle3Replay`),
  and a draft counts until the first one that differs from the token the target emitted;
* the trained head is accepted (τ on these image questions well above 1).

Lossless output through the OpenAI server is checked in `test_serve_one_arg.py`.
"""

from __future__ import annotations

import pytest

from benchmarks.testbed import assets
from tests.support import recorders
from tests.support.engine import engine, prompt_images
from tests.support.replay import (Eagle3Replay, chunk_end_overrides, draft_logprob_diffs,
                                  emitted_accepted, matched_drafts)
from tests.support.testbed import TARGET, held_out_prompts

pytestmark = [pytest.mark.slow, pytest.mark.both_runners]

K = 4
HEAD = assets.MODELS / "drafter-eagle3"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> dict[str, dict]:
    return held_out_prompts(tmp_path_factory.mktemp("testbed") / "data", 12)


@pytest.fixture(scope="module")
def run(prompts) -> dict:
    from vllm import SamplingParams

    with engine(TARGET, {"method": "eagle3", "model": str(HEAD), "num_speculative_tokens": K},
                env=recorders.ENV, max_model_len=1024) as llm:
        llm.collective_rpc(recorders.install_recorder)
        outs = llm.generate(list(prompts.values()),
                            SamplingParams(temperature=0.0, max_tokens=48), use_tqdm=False)
        record = llm.collective_rpc(recorders.read_record)[0]
        return {"outputs": dict(zip(prompts, outs)), "log": record["drafts"],
                "logits": record["logits"], "chunk_ends": record["chunk_ends"]}


@pytest.fixture(scope="module")
def twin():
    from vllm_massv.drafters.eagle3.hf_model import Eagle3Drafter

    return Eagle3Drafter.from_pretrained(HEAD).eval()


@pytest.fixture(scope="module")
def features(twin):
    from vllm_massv.training.features import FINAL, TargetHiddenStates

    return TargetHiddenStates(TARGET, layers=tuple(
        a - 1 for a in twin.cfg.eagle_aux_hidden_state_layer_ids) + (FINAL,))


def test_trained_head_logprobs_match_twin(run, prompts, twin, features) -> None:
    """The trained head loads in vLLM and in the transformers twin with equal next-token
    log-probabilities at every draft step (first 6 verify steps of each request)."""
    rows = chunk_end_overrides(run["chunk_ends"], run["outputs"])
    replays = {n: Eagle3Replay(twin, features, rows[n]) for n in run["outputs"]}
    worst, compared, _ = draft_logprob_diffs(run["outputs"], run["log"], run["logits"], prompts,
                                             features, replays)
    print(f"compared {compared} draft steps, max |logprob diff| {worst:.2e}")
    assert compared >= 200 and worst < 2e-3


def test_accepted_counts_equal_replay(run, prompts, twin, features) -> None:
    rows = chunk_end_overrides(run["chunk_ends"], run["outputs"])
    steps = accepted = 0
    for name, out in run["outputs"].items():
        images = prompt_images(prompts[name])
        prompt, tokens = list(out.prompt_token_ids), list(out.outputs[0].token_ids)
        seq, p = prompt + tokens, len(prompt)
        (states, _), = features([seq], [images], [p])
        replay = Eagle3Replay(twin, features, rows[name])
        metrics, expected, m = out.outputs[0].spec_decode_metrics, [], 1
        for drafted in metrics.per_step_drafted:
            if m >= len(tokens):
                break
            drafts, _ = replay(seq, states, None, p, p + m, drafted)
            a = matched_drafts(drafts, tokens, m, drafted)
            expected.append(a)
            m += a + 1
        got = emitted_accepted(metrics.per_step_accepted, len(tokens))[: len(expected)]
        assert got == expected, name
        steps, accepted = steps + len(expected), accepted + sum(expected)
    print(f"replayed {steps} verify steps, {accepted} accepted drafts")
    assert accepted > steps   # the trained head is accepted: > 1 draft per step on average


def test_trained_head_is_accepted(run) -> None:
    drafted = accepted = 0
    for out in run["outputs"].values():
        metrics = out.outputs[0].spec_decode_metrics
        drafted += len(metrics.per_step_drafted)
        accepted += sum(metrics.per_step_accepted)
    tau = 1 + accepted / drafted
    print(f"tau {tau:.2f} over {drafted} verify steps")
    assert tau > 2.5
