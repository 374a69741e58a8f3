"""The checked-in testbed MASSV drafter in vLLM, on both model runners: lossless, and every verify
step's accepted count equal to the transformers replay.

The drafter (`benchmarks/testbed/models/drafter-massv`: the trained 1-D Qwen2 drafter with its
`mlp2x_gelu` projector) on the testbed target, k = 4, 12 held-out test-split questions (the
scenes never appear in the training data; image and text questions), 48 greedy tokens, the test
profile's 64-token prefill chunks. The module runs in both sessions of `make test`: on V1 and on
Model Runner V2 (through Triton's interpreter). Equal replays on both runners mean equal per-step
acceptance on both: MRV2's MASSV speculator gives the drafter the inputs V1's proposer gives it.
"""

from __future__ import annotations

import pytest

from benchmarks.testbed import assets
from tests.support.engine import engine, generate, greedy, prompt_images, token_ids
from tests.support.profile import RUNNER
from tests.support.replay import assert_replay_equal
from tests.support.testbed import TARGET, held_out_prompts

pytestmark = [pytest.mark.slow, pytest.mark.both_runners]

K = 4
MAX_TOKENS = 48
DRAFTER = assets.MODELS / "drafter-massv"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> dict[str, dict]:
    return held_out_prompts(tmp_path_factory.mktemp("testbed") / "data", 12)


@pytest.fixture(scope="module")
def target_alone(prompts) -> dict[str, list[int]]:
    with engine(TARGET, max_model_len=1024) as llm:
        return token_ids(generate(llm, prompts, greedy(MAX_TOKENS)))


@pytest.fixture(scope="module")
def massv(prompts, target_alone) -> dict:
    spec = {"method": "draft_model", "model": str(DRAFTER), "num_speculative_tokens": K}
    with engine(TARGET, spec, max_model_len=1024) as llm:
        return generate(llm, prompts, greedy(MAX_TOKENS))


def test_lossless(massv, target_alone) -> None:
    assert token_ids(massv) == target_alone
    print(f"{RUNNER}: {len(target_alone)}/{len(target_alone)} requests equal to the target alone")


def test_accepted_counts_equal_replay(massv, prompts) -> None:
    steps, accepted = assert_replay_equal(TARGET, DRAFTER, massv, prompts)
    tau = {}
    for kind, has_image in (("image", True), ("text", False)):
        m = [o.outputs[0].spec_decode_metrics for n, o in massv.items()
             if bool(prompt_images(prompts[n])) == has_image]
        if m:
            tau[kind] = 1 + (sum(sum(x.per_step_accepted) for x in m)
                             / sum(len(x.per_step_drafted) for x in m))
    print(f"{RUNNER}: {steps} verify steps equal to the replay; tau all {1 + accepted / steps:.3f}"
          + "".join(f", {kind} {t:.3f}" for kind, t in tau.items()) + f" (k = {K})")
    assert tau["image"] > 2.0  # the trained drafter is accepted on images
