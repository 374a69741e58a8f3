"""Other drafters through the MASSV proposer, and ablations that must collapse acceptance.

Other drafters through the MASSV proposer: a small text LM with a different KV head shape
(k=1, lossless), and the ablations that must collapse acceptance while staying lossless
(garbage weights, zeroed image features, a forced wrong last draft), and a drafter without a
projector (also on Model Runner V2)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.support.engine import (IMAGE_PROMPTS, acceptance, engine, generate, mixed_batch,
                                  spec_config, spec_counters, token_ids)


def test_blind_text_lm_k1_lossless(models, reference):
    """Text LM (head_dim 32 vs the target's 64: shared KV pool, different shapes) + random
    mlp2x_gelu projector, 1-D positions, k=1."""
    with engine(models.target, spec_config(models.blind, 1)) as llm:
        outs = generate(llm, mixed_batch(models.target))
    assert token_ids(outs) == reference
    assert sum(sum(o.outputs[0].spec_decode_metrics.per_step_drafted)
               for o in outs.values()) > 0


@pytest.mark.both_runners
def test_projector_none_lossless(models, reference, tmp_path):
    """`massv init --projector none` (a text LM with the target's vocabulary, no projector): the
    image placeholders keep their token embeddings, by design. Lossless, drafting (k = 2), on
    both runners; on Model Runner V2 the MASSV speculator serves it."""
    from vllm_massv.drafters.massv.init import init_drafter

    draft = init_drafter(models.target, models.text_lm, tmp_path / "none",
                         projector="none").out_dir
    with engine(models.target, spec_config(draft, 2)) as llm:
        outs = generate(llm, mixed_batch(models.target))
    assert token_ids(outs) == reference
    drafted = sum(sum(o.outputs[0].spec_decode_metrics.per_step_drafted) for o in outs.values())
    print(f"projector none: acceptance {acceptance(outs):.3f} over {drafted} draft tokens")
    assert drafted > 0


def test_garbage_drafter_weights_lossless(models, reference, tmp_path):
    """Every weight of the drafter (projector and LM: embeddings, attention, MLP, norms, head)
    replaced by torch.randn * 0.5: answers stay identical to no speculation, only acceptance
    drops."""
    draft = tmp_path / "garbage"
    shutil.copytree(models.blind, draft)
    state = load_file(draft / "model.safetensors")
    gen = torch.Generator().manual_seed(1234)
    assert any(k.startswith("mm_projector.") for k in state)
    garbage = {k: (torch.randn(v.shape, generator=gen) * 0.5).to(v.dtype)
               for k, v in state.items()}
    save_file(garbage, draft / "model.safetensors", metadata={"format": "pt"})
    with engine(models.target, spec_config(draft, 3)) as llm:
        outs = generate(llm, mixed_batch(models.target))
    assert token_ids(outs) == reference
    drafted = sum(sum(o.outputs[0].spec_decode_metrics.per_step_drafted) for o in outs.values())
    rate = acceptance(outs)
    print(f"garbage drafter: {drafted} draft tokens, acceptance {rate:.4f}")
    assert drafted > 0
    assert rate < 0.2          # the sanity drafter: >= 0.99


def test_zeroed_image_features_accept_clearly_less(models, reference):
    """Same LM and positions as the sanity drafter, but the projector outputs zeros."""
    with engine(models.target, spec_config(models.sanity_zeroed, 3)) as llm:
        outs = generate(llm, mixed_batch(models.target))
    assert token_ids(outs) == reference
    rate = acceptance(outs, IMAGE_PROMPTS)
    print(f"zeroed image features: acceptance on image prompts {rate:.4f}")
    assert rate < 0.5          # the sanity drafter with real features: >= 0.99
    assert acceptance(outs, ["text"]) >= 0.99


def test_rejection_path_per_position_counts(models, reference):
    """Sanity drafter whose last draft token is forced wrong: each step must accept exactly
    k-1 tokens, i.e. per-position accepted counts N/N/0. Any drift of draft KV, positions or
    slots after a rejection would show up as lost acceptance at positions 0 and 1."""
    k = 3
    env = {"VLLM_MASSV_TEST_CORRUPT_LAST_DRAFT": "1"}
    with engine(models.target, spec_config(models.sanity, k), env=env) as llm:
        before = spec_counters(llm)
        outs = generate(llm, mixed_batch(models.target))
        after = spec_counters(llm)
    assert token_ids(outs) == reference
    per_pos = [a - b for a, b in zip(after["vllm:spec_decode_num_accepted_tokens_per_pos"],
                                     before.get("vllm:spec_decode_num_accepted_tokens_per_pos",
                                                [0] * k))]
    drafts = after["vllm:spec_decode_num_drafts"] - before.get("vllm:spec_decode_num_drafts", 0)
    print(f"per-position accepted counts {per_pos} of {drafts} drafts")
    assert drafts > 0
    assert per_pos == [drafts, drafts, 0]
