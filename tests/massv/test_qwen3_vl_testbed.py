"""The Qwen3-VL testbed (issue 24) in vLLM, on both model runners: the trained MASSV drafter of a
Qwen3-VL target is lossless, every verify step's accepted count equals the transformers replay,
and on image questions it beats the text-only control by a stated margin.

`benchmarks/testbed/qwen3-vl/models`: a 4-layer Qwen3-VL target (DeepStack taps [0, 1],
interleaved M-RoPE) trained on the testbed task, and drafters made from a blind 2-layer Qwen3 LM
by `massv init` + `massv train` on the target's own answers (`FAMILY=qwen3_vl
benchmarks/testbed/build.sh`). `drafter-massv` is the projector input chosen on the validation
split (README, "Qwen3-VL"); `drafter-distilled` is the same LM trained the same way without the
image (`projector: none`). k = 4, the same 12 held-out questions and 48 greedy tokens as
`test_massv_testbed.py`; MRV2 runs through Triton's interpreter and gets 1-D drafters (both are).
"""

from __future__ import annotations

import json

import pytest

from tests.support.engine import engine, generate, greedy, prompt_images, token_ids
from tests.support.profile import RUNNER
from tests.support.replay import assert_replay_equal
from tests.support.testbed import QWEN3_VL_MODELS, eos_ids, held_out_prompts, image_tau

pytestmark = [pytest.mark.slow, pytest.mark.both_runners]

K = 4
MAX_TOKENS = 48
TARGET = QWEN3_VL_MODELS / "target"
DRAFTER = QWEN3_VL_MODELS / "drafter-massv"
TEXT_ONLY = QWEN3_VL_MODELS / "drafter-distilled"
#: MASSV's image-question tau over the answers must exceed the text-only control's by at least
#: this much (measured on these 12 questions, V1: see test_massv_beats_text_only_on_images).
MARGIN = 0.5


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> dict[str, dict]:
    return held_out_prompts(tmp_path_factory.mktemp("testbed") / "data", 12, TARGET)


@pytest.fixture(scope="module")
def target_alone(prompts) -> dict[str, list[int]]:
    with engine(TARGET, max_model_len=1024) as llm:
        return token_ids(generate(llm, prompts, greedy(MAX_TOKENS)))


def _spec_run(drafter, prompts) -> dict:
    spec = {"method": "draft_model", "model": str(drafter), "num_speculative_tokens": K}
    with engine(TARGET, spec, max_model_len=1024) as llm:
        return generate(llm, prompts, greedy(MAX_TOKENS))


@pytest.fixture(scope="module")
def massv(prompts, target_alone) -> dict:
    return _spec_run(DRAFTER, prompts)


@pytest.fixture(scope="module")
def text_only(prompts) -> dict:
    return _spec_run(TEXT_ONLY, prompts)


def test_drafter_is_a_qwen3_massv_drafter_on_deepstack_features() -> None:
    target = json.loads((TARGET / "config.json").read_text())
    assert target["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert target["vision_config"]["deepstack_visual_indexes"] == [0, 1]
    cfg = json.loads((DRAFTER / "config.json").read_text())
    assert cfg["architectures"] == ["MassvQwen3ForCausalLM"]
    assert cfg["massv"]["positions"] == "1d" and cfg["massv"]["projector"] == "mlp2x_gelu"


def test_lossless(massv, target_alone) -> None:
    assert token_ids(massv) == target_alone
    print(f"{RUNNER}: Qwen3-VL testbed, {len(target_alone)}/{len(target_alone)} requests equal "
          "to the target alone")


def test_accepted_counts_equal_replay(massv, prompts) -> None:
    steps, accepted = assert_replay_equal(TARGET, DRAFTER, massv, prompts)
    m = [o.outputs[0].spec_decode_metrics for n, o in massv.items()
         if prompt_images(prompts[n])]
    tau_image = 1 + sum(sum(x.per_step_accepted) for x in m) / sum(len(x.per_step_drafted)
                                                                    for x in m)
    print(f"{RUNNER}: Qwen3-VL testbed, {steps} verify steps equal to the replay; tau all "
          f"{1 + accepted / steps:.3f}, image {tau_image:.3f} (k = {K})")
    assert tau_image > 2.0


@pytest.mark.skipif(RUNNER != "v1", reason="one runner suffices: tau is runner-independent "
                    "(equal replays above)")
def test_massv_beats_text_only_on_images(massv, text_only, prompts, target_alone) -> None:
    assert token_ids(text_only) == target_alone
    cfg = json.loads((TEXT_ONLY / "config.json").read_text())
    assert cfg["massv"]["projector"] == "none"  # the control sees no image
    eos = eos_ids(TARGET)
    (ours, ours_all), (control, control_all) = (image_tau(massv, prompts, eos),
                                                image_tau(text_only, prompts, eos))
    print(f"Qwen3-VL testbed, image questions, k = {K}, tau over the answers: MASSV {ours:.3f} "
          f"vs text-only control {control:.3f} (+{ours - control:.3f}; required > +{MARGIN}); "
          f"over all {MAX_TOKENS} tokens: {ours_all:.3f} vs {control_all:.3f}")
    assert ours > control + MARGIN
