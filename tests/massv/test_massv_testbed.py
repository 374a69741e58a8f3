"""The checked-in testbed MASSV drafter in vLLM, on both model runners: lossless, and every verify
step's accepted count equal to the transformers replay.

The drafter (`benchmarks/testbed/models/drafter-massv`: the trained 1-D Qwen2 drafter with its
`mlp2x_gelu` projector) on the testbed target, k = 4, 12 held-out test-split questions (the
scenes never appear in the training data; image and text questions), 48 greedy tokens, the test
profile's 64-token prefill chunks. The module runs in both sessions of `make test`: on V1 and on
Model Runner V2 (through Triton's interpreter). Equal replays on both runners mean equal per-step
acceptance on both: MRV2's MASSV speculator gives the drafter the inputs V1's proposer gives it.

The core promise, defended on V1: on the image questions MASSV's tau beats the text-only
control's -- `drafter-distilled`, the same blind LM trained the same way on the same target
answers but without the image (`projector: none`), the strongest text-only drafter of the
testbed -- by a stated margin. A MASSV drafter whose image path broke would fall to about the
control's tau (or below: its projector would feed noise).
"""

from __future__ import annotations

import json

import pytest

from benchmarks.testbed import assets
from tests.support.engine import engine, generate, greedy, prompt_images, token_ids
from tests.support.profile import RUNNER
from tests.support.replay import assert_replay_equal
from tests.support.testbed import TARGET, eos_ids, held_out_prompts, image_tau

pytestmark = [pytest.mark.slow, pytest.mark.both_runners]

K = 4
MAX_TOKENS = 48
DRAFTER = assets.MODELS / "drafter-massv"
TEXT_ONLY = assets.MODELS / "drafter-distilled"
#: MASSV's image-question tau over the answers must exceed the text-only control's by at least
#: this much (measured on these 12 questions, V1: 4.727 vs 3.807). Past EOS (the tests ignore it)
#: the trained target continues out of distribution and neither drafter predicts it (2.775 vs
#: 2.689 over all 48 tokens): the comparison counts the answers only.
MARGIN = 0.5


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


@pytest.fixture(scope="module")
def text_only(prompts) -> dict:
    spec = {"method": "draft_model", "model": str(TEXT_ONLY), "num_speculative_tokens": K}
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


@pytest.mark.skipif(RUNNER != "v1", reason="one runner suffices: tau is runner-independent "
                    "(equal replays above)")
def test_massv_beats_text_only_on_images(massv, text_only, prompts, target_alone) -> None:
    assert token_ids(text_only) == target_alone
    cfg = json.loads((TEXT_ONLY / "config.json").read_text())
    assert cfg["massv"]["projector"] == "none"  # the control sees no image
    eos = eos_ids(TARGET)
    (ours, ours_all), (control, control_all) = (image_tau(massv, prompts, eos),
                                                image_tau(text_only, prompts, eos))
    print(f"image questions, k = {K}, tau over the answers: MASSV {ours:.3f} vs text-only "
          f"control {control:.3f} (+{ours - control:.3f}; required > +{MARGIN}); over all "
          f"{MAX_TOKENS} tokens (past EOS too): {ours_all:.3f} vs {control_all:.3f}")
    assert ours > control + MARGIN
