"""A 1-D drafter's proposals inside vLLM match a reference computed with transformers.

The drafter is the target's language model with 1-D positions and an identity projector (so it
sees the real image features). For every verify step vLLM reports how many drafts were
accepted; we replay greedy speculative decoding along the target's output with the transformers
drafter (`vllm_massv.drafters.massv.hf_model`) and image features from the transformers vision tower, and require the
same accepted count at every step. Any off-by-one in positions, slots or the image-embedding
mask changes these counts. The tests marked `both_runners` also run on Model Runner V2.
"""

from __future__ import annotations

import pytest

from tests.support import recorders
from tests.support.engine import (IMAGE_PROMPTS, engine, first_draft_acceptance, generate,
                                  greedy, mixed_batch, spec_config, token_ids)
from tests.support.replay import assert_replay_equal, prompt_logprobs_vs_transformers

K = 3


@pytest.fixture(scope="module")
def llm(models):
    with engine(models.target, spec_config(models.sanity_1d, K), env=recorders.ENV,
                max_logprobs=-1) as llm:
        yield llm


@pytest.fixture(scope="module")
def vllm_outputs(llm, models):
    return generate(llm, mixed_batch(models.target))


@pytest.fixture(scope="module")
def encoder(models):
    from vllm_massv.training.features import TargetImageEncoder

    return TargetImageEncoder(models.target)


@pytest.mark.both_runners
def test_training_image_features_match_vllm(llm, models, encoder, vllm_outputs):
    """What training feeds the projector == what vLLM caches and hands the drafter (read from
    the worker's encoder cache right after a request with that image). Runs after the mixed
    batch (`vllm_outputs`) so its prefix-cache entries cannot affect that batch."""
    from vllm_massv import testing as mt

    images = mt.sample_images()
    for name in ("astronaut", "chelsea", "red", "noise", "gradient"):
        # text before the image: no prefix-cache hit can skip the encoder for this image
        prompt = mt.image_prompt(models.target, f"Probe {name} now.", image_first=False)
        generate(llm, {name: {"prompt": prompt, "multi_modal_data": {"image": images[name]}}},
                 greedy(1))
        cached = llm.collective_rpc(recorders.vllm_encoder_cache)[0].values()
        trained = encoder.encode([images[name]])
        errs = [(c - trained).abs().max().item() for c in cached if c.shape == trained.shape]
        assert errs, f"{name}: no cached embedding of shape {tuple(trained.shape)}"
        print(f"{name}: max |vLLM - transformers| = {min(errs):.2e} "
              f"(scale {trained.abs().max().item():.1f})")
        assert min(errs) < 1e-4, name


@pytest.mark.both_runners
def test_lossless(vllm_outputs, reference):
    assert token_ids(vllm_outputs) == reference


@pytest.mark.both_runners
def test_proposals_match_transformers(models, vllm_outputs):
    steps, accepted = assert_replay_equal(models.target, models.sanity_1d, vllm_outputs,
                                          mixed_batch(models.target))
    print(f"1-D drafter: {accepted} accepted over {steps} steps (tau {1 + accepted / steps:.3f}), "
          "all equal to the transformers replay")
    assert accepted > 0


@pytest.mark.both_runners
def test_prefix_cache_rerun(llm, models, vllm_outputs, reference):
    """The image prompts again on the same engine: their prompts hit the prefix cache (at least
    one 32-token KV block), the drafter's KV for the cached blocks is reused, and outputs and
    every step's accepted count still equal the target alone and the replay."""
    prompts = {n: p for n, p in mixed_batch(models.target).items() if n in IMAGE_PROMPTS}
    rerun = generate(llm, prompts)
    for name, out in rerun.items():
        assert out.num_cached_tokens and out.num_cached_tokens >= 32, name
    assert token_ids(rerun) == {n: reference[n] for n in prompts}
    steps, accepted = assert_replay_equal(models.target, models.sanity_1d, rerun, prompts)
    print(f"prefix-cache rerun: {accepted} accepted over {steps} steps, equal to the replay")


@pytest.mark.both_runners
@pytest.mark.parametrize("temperature", [0.3, 1.0])
def test_sampling_temperature_on_text(llm, models, temperature):
    """T > 0 on text prompts, where the 1-D drafter is the target itself (text M-RoPE positions
    are 1-D): its first draft is the target's argmax, accepted with probability p_T(argmax), so
    the share of accepted first drafts must match the mean p_T(argmax) (`first_draft_acceptance`)
    within 4 binomial standard deviations plus 0.02 (a sum of independent Bernoulli trials with
    varying p has at most the variance of n trials at the mean p: the bound is conservative,
    false-alarm rate below 1e-4). On V1 this holds through the plugin's CPU sampler fix; on
    Model Runner V2 through its own rejection sampler
    (`vllm/v1/worker/gpu/spec_decode/rejection_sampler.py`), which needs no fix. At T = 1 the
    random target is nearly flat (p ~ 0.02-0.05): a verifier using wrong temperatures accepts far
    more or less."""
    from vllm import SamplingParams

    from vllm_massv import testing as mt

    questions = ["Count from one to ten, please.", "Name the colours of the rainbow.",
                 "List five animals that live in the sea.", "Describe a red circle.",
                 "Spell the word banana backwards.", "What comes after Monday?"]
    prompts = {f"q{i}": {"prompt": mt.text_prompt(models.target, q)}
               for i, q in enumerate(questions)}
    outs = generate(llm, prompts, SamplingParams(temperature=temperature, max_tokens=32,
                                                 logprobs=-1))
    rate, p, steps = first_draft_acceptance(outs, temperature, max_tokens=32, vocab=2112)
    bound = 4 * (p * (1 - p) / steps) ** 0.5 + 0.02
    print(f"1-D drafter at temperature {temperature} on text: first draft accepted in "
          f"{rate:.3f} of {steps} steps; target p(argmax) there {p:.3f} (bound {bound:.3f})")
    assert steps >= 30 and abs(rate - p) < bound


def test_drafter_logits_match_transformers(models):
    """The vLLM drafter class and the transformers drafter compute the same next-token
    distribution (fp32) for the same token ids: the MASSV drafter served as a plain text model
    with prompt logprobs, against `vllm_massv.drafters.massv.hf_model.MassvQwen2ForCausalLM`. (With image features the
    two are compared through per-step proposals above.)"""
    from vllm_massv import testing as mt

    prompt = mt.text_prompt(models.target, "Count the red circles and the blue squares, please.")
    out, worst = prompt_logprobs_vs_transformers(models.blind, prompt)
    ids = list(out.prompt_token_ids)
    assert all(ids[i] in out.prompt_logprobs[i] for i in range(1, len(ids)))
    print(f"max |vLLM - transformers| drafter logprob over {len(ids) - 1} positions: {worst:.2e}")
    assert worst < 1e-4
    assert all(t < 2048 for pos in out.prompt_logprobs[1:] for t in pos)  # padded rows: never
