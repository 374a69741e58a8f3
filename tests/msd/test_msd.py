"""MSD served by vLLM: lossless, and vLLM's drafts equal the transformers twin's.

Engines (tiny random Qwen2.5-VL target, CPU, fp32, eager, chunked prefill of 64 tokens, prefix
caching; `tests.support.profile.ENGINE_ARGS`; the tests marked `both_runners` also on Model
Runner V2): the MSD drafter with decoupled visual tokens,
and the ablation without them, both `{"method": "eagle", k=3}`, on the mixed batch (text-only, one image, two
images, image mid-prompt, a long chunked prompt; run concurrently).

The drafters are untrained (seeded random weights, `vllm_massv.testing.build_msd_drafter`),
so acceptance is ~0; the checks therefore compare *every* draft vLLM proposes (recorded inside
the worker) with the transformers twin (`vllm_massv.drafters.msd.hf_model.MsdQwen2Drafter`) fed the same
target hidden states and image embeddings (`training.features.TargetHiddenStates`, a
transformers forward of the target with its images), 1-D absolute positions. Any error in the
token shift, the image-row mask, decoupling, positions or draft KV slots changes drafts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.engine import IMAGE_PROMPTS, mixed_batch, prompt_images, token_ids
from tests.support.replay import (MsdReplay, draft_mismatches, emitted_accepted, greedy_acceptance,
                                  run_msd)
from vllm_massv.testing import build_msd_drafter

#: Largest |vLLM draft logit - twin logit| taken for fp32 noise (the tiny untrained drafters'
#: logits span about +-100; observed <= 7e-4 on V1 and Model Runner V2).
LOGIT_TOL = 1e-2


@pytest.fixture(scope="module")
def drafters(models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("msd")
    return {"on": build_msd_drafter(models.target, root / "on"),
            "off": build_msd_drafter(models.target, root / "off", decouple=False)}


@pytest.fixture(scope="module")
def features(models, tmp_path_factory):
    from vllm_massv.training.features import TargetHiddenStates

    return TargetHiddenStates(models.target, cache_dir=tmp_path_factory.mktemp("features"))


@pytest.fixture(scope="module")
def twin(drafters):
    from vllm_massv.drafters.msd.hf_model import MsdQwen2Drafter

    return {k: MsdQwen2Drafter.from_pretrained(d).eval() for k, d in drafters.items()}


@pytest.fixture(scope="module")
def msd_on(models, drafters):
    return run_msd(models.target, drafters["on"], rerun=True)


@pytest.fixture(scope="module")
def msd_off(models, drafters):
    return run_msd(models.target, drafters["off"])


def _compare(run, models, features, drafter, decouple: bool | None = None):
    replays = {name: MsdReplay(drafter, features, decouple, run["rows"][name])
               for name in run["outputs"]}
    result = draft_mismatches(run["log"], run["outputs"], mixed_batch(models.target), features,
                              replays, logit_log=run["logits"])
    for name, r in result.items():
        print(f"{name}: {r['steps']} steps, mismatches per draft position {r['mismatches']}, "
              f"ties {r['ties']}, largest |vLLM - twin| logit {r['logit_diff']:.1e}")
    return result


def _assert_twin_equal(result: dict) -> None:
    """Every draft equal to the twin's, and every draft logit row equal to the twin's within
    fp32 noise (observed <= 7e-4 on both runners): the replay models every row vLLM computed,
    partial-prefill rows and prefix-cache hits included."""
    assert all(sum(r["mismatches"]) == 0 for r in result.values()), result
    assert max(r["logit_diff"] for r in result.values()) < LOGIT_TOL, result


@pytest.mark.both_runners
def test_lossless_decoupled(msd_on, reference):
    assert token_ids(msd_on["outputs"]) == reference


@pytest.mark.both_runners
def test_lossless_ablation(msd_off, reference):
    assert token_ids(msd_off["outputs"]) == reference


def test_msd_engine_proposer_and_cpu_sampler_fix(msd_on):
    """V1: the plugin's proposer serves MSD, and the CPU rejection-sampler fix is installed in
    the worker (as for MASSV engines)."""
    assert msd_on["proposer"] == "MsdEagleProposer"
    assert msd_on["cpu_sampler_fix"] is True


@pytest.mark.mrv2
def test_msd_served_by_vllms_eagle_speculator_on_mrv2(msd_on):
    """Model Runner V2: vLLM's own EAGLE speculator serves MSD (it hands drafters that take
    multimodal embeddings the target's image embeddings, one token ahead, at 1-D positions);
    the V1 proposer, its position fix and the CPU sampler fix are not involved."""
    assert msd_on["proposer"] == "EagleSpeculator"
    assert msd_on["cpu_sampler_fix"] is False


@pytest.mark.both_runners
def test_drafts_match_transformers_twin(msd_on, models, features, twin):
    result = _compare(msd_on, models, features, twin["on"])
    assert all(r["steps"] >= 20 for r in result.values())
    _assert_twin_equal(result)
    assert sum(r["ties"] for r in result.values()) <= 3  # near-equal logits (< 0.01 apart)


@pytest.mark.both_runners
def test_prefix_cache_rerun(msd_on, models, features, twin, reference):
    """The image prompts again in the same engine: prompt blocks come from the prefix cache
    (target and draft KV), output lossless, drafts still equal the twin's."""
    rerun = msd_on["rerun"]
    for name, out in rerun["outputs"].items():
        assert out.num_cached_tokens and out.num_cached_tokens >= 32, name  # >= one KV block
    assert token_ids(rerun["outputs"]) == {n: reference[n] for n in IMAGE_PROMPTS}
    result = _compare(rerun, models, features, twin["on"])
    _assert_twin_equal(result)


@pytest.mark.both_runners
def test_image_rows_bypass_fc(msd_on, models, features, twin):
    """Fails if image rows receive the fc mix while decoupling is on: the same vLLM drafts,
    compared with the twin forced to the fc mix at every row, disagree on every image prompt
    (and agree on the text-only one)."""
    result = _compare(msd_on, models, features, twin["on"], decouple=False)
    assert sum(result["text"]["mismatches"]) == 0
    for name in ("astronaut", "two_images", "mid_prompt", "gradient_long"):
        assert sum(result[name]["mismatches"]) >= result[name]["steps"] // 2, name


@pytest.mark.both_runners
def test_ablation_drafts_match_transformers_twin(msd_off, models, features, twin):
    result = _compare(msd_off, models, features, twin["off"])
    _assert_twin_equal(result)


@pytest.mark.both_runners
def test_accepted_counts_equal_replay(msd_on, models, features, twin):
    """vLLM's per-step accepted counts equal a greedy replay with the twin's own drafts."""
    batch = mixed_batch(models.target)
    for name, out in msd_on["outputs"].items():
        images = prompt_images(batch[name])
        prompt, tokens = list(out.prompt_token_ids), list(out.outputs[0].token_ids)
        seq = prompt + tokens
        (hidden, image_embeds), = features([seq], [images], [len(prompt)])
        metrics = out.outputs[0].spec_decode_metrics
        replay = MsdReplay(twin["on"], features, row_tokens=msd_on["rows"][name])
        expected = greedy_acceptance(
            tokens, metrics.per_step_drafted,
            lambda m, drafted: replay(seq, hidden, image_embeds if images else None, len(prompt),
                                      len(prompt) + m, drafted)[0])
        assert emitted_accepted(metrics.per_step_accepted, len(tokens)) == expected, name
