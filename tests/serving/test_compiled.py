"""A compiled engine (torch.compile) with a MASSV drafter: lossless, the same tau as eager.

A compiled engine (`enforce_eager=False`: torch.compile of target and drafter; on CPU no CUDA
graphs) with a MASSV drafter. Every other test runs eager on CPU (the `cpu` test profile); this
one covers the compiled path the `gpu` profile and GPU users take.

Two engines, both compiled: the target alone, then with the M-RoPE sanity drafter (the target's
own LM, identity projector, the target's M-RoPE positions: it accepts almost every draft on image
prompts, so a wrong image embedding, position or KV slot shows), k = 3, on the mixed batch. The
MASSV engine must be lossless (the same tokens as the compiled target alone: compiled kernels may
flip a near-tie of the target's argmax against eager, seen once in 5 prompts), accept exactly
what the transformers replay accepts at every verify step -- what the eager engine accepts
(tests/massv/test_sanity_drafter.py), so tau is the same -- and accept >= 0.9 of its drafts on
the image prompts.
"""

from __future__ import annotations

import pytest

from tests.support.engine import engine, generate, mixed_batch, spec_config, token_ids
from tests.support.replay import check_engine_mode

pytestmark = pytest.mark.slow

K = 3


@pytest.fixture(scope="module")
def compiled_reference(models):
    """The target alone (no speculation) in the same mode."""
    with engine(models.target, enforce_eager=False) as llm:
        return token_ids(generate(llm, mixed_batch(models.target)))


@pytest.fixture(scope="module")
def compiled_outputs(models):
    with engine(models.target, spec_config(models.sanity, K), enforce_eager=False) as llm:
        cfg = llm.llm_engine.vllm_config
        assert cfg.model_config.enforce_eager is False
        assert cfg.compilation_config.mode != 0  # compiled (0 = no compilation)
        return generate(llm, mixed_batch(models.target))


def test_compiled_lossless_and_tau_equals_eager_tp1(models, compiled_outputs, compiled_reference,
                                                     reference):
    check_engine_mode("compiled", models, models.sanity, compiled_outputs, compiled_reference,
                      reference, image_floor=0.9)
