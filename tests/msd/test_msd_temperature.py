"""MSD at temperature > 0: vLLM's drafts after sampled tokens equal the transformers twin's.

MSD at temperature > 0: the drafts vLLM makes after sampled (non-greedy) tokens equal the
transformers twin's, given the emitted tokens.

Diagnostic for the benchmark's MSD acceptance drop at T > 0 (benchmarks/results/
cpu-testbed-msd-temperature.md): if the EAGLE path fed the drafter wrong token ids, hidden
states or positions after a step whose emitted token was sampled (a recovered or bonus token
from the random rejection sampler, `vllm/v1/sample/rejection_sampler.py`), the first draft of
the next step would differ from the twin's. Engine: the tiny random Qwen2.5-VL target and an
untrained MSD drafter (acceptance ~0, so nearly every step emits a recovered token), k=3,
T=0.1, the mixed batch (`tests.support.engine.mixed_batch`), CPU, eager.

Finding (msdtemp, testbed drafter-msd, k=4, T=0.1, 6-20 test prompts): vLLM's drafts equal the
twin's at every position and first-draft acceptance equals the mean target p_T(draft)
(0.464 vs 0.467), so the EAGLE path and the rejection sampler are right; the drop is the
trained MSD head itself drafting poorly once a sampled token leaves the greedy answers it was
trained on (3.7% of emitted tokens differ from the argmax; draft == argmax falls 0.905 -> 0.554).
"""

from __future__ import annotations

import pytest

from tests.support import recorders
from tests.support.engine import engine, generate, mixed_batch
from tests.support.replay import MsdReplay, draft_mismatches
from vllm_massv.testing import build_msd_drafter

pytestmark = pytest.mark.slow

K = 3
TEMPERATURE = 0.1


@pytest.fixture(scope="module")
def sampled_run(models, tmp_path_factory):
    from vllm import SamplingParams

    from vllm_massv.training.features import TargetHiddenStates
    from vllm_massv.drafters.msd.hf_model import MsdQwen2Drafter

    drafter = build_msd_drafter(models.target, tmp_path_factory.mktemp("msd") / "on")
    with engine(models.target, {"method": "eagle", "model": str(drafter),
                                "num_speculative_tokens": K}, env=recorders.ENV) as llm:
        llm.collective_rpc(recorders.install_recorder)
        # no per-request seed (see tests/massv/test_sanity_drafter.py::test_sampling_temperature)
        outputs = generate(llm, mixed_batch(models.target),
                           SamplingParams(temperature=TEMPERATURE, max_tokens=32))
        log = llm.collective_rpc(recorders.read_record)[0]["drafts"]
    features = TargetHiddenStates(models.target, cache_dir=tmp_path_factory.mktemp("features"))
    twin = MsdQwen2Drafter.from_pretrained(drafter).eval()
    return draft_mismatches(log, outputs, mixed_batch(models.target), features,
                            MsdReplay(twin, features))


def test_first_drafts_after_sampled_tokens_match_twin(sampled_run):
    """Every request's first draft position equals the twin's at every verify step. Later
    positions may disagree in at most 1% of drafts: observed 2 of ~465 (two_images step 2
    draft 2, gradient_long step 20 draft 1, both beyond a near-tie), not explained yet; at T = 0
    tests/msd/test_msd.py requires 0. The bound keeps that open question visible without hiding a
    systematic fault, which would break far more drafts."""
    for name, r in sampled_run.items():
        print(f"T={TEMPERATURE} {name}: {r}")
    assert all(r["steps"] >= 20 for r in sampled_run.values()), sampled_run
    assert all(r["mismatches"][0] == 0 for r in sampled_run.values()), sampled_run
    drafts = sum(r["steps"] * K for r in sampled_run.values())
    assert sum(sum(r["mismatches"]) for r in sampled_run.values()) <= drafts // 100, sampled_run
