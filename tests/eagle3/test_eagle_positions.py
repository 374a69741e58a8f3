"""EAGLE-path drafters on M-RoPE targets: stock vLLM's positions measured, and the plugin's fix.

Stock vLLM 0.32's positions/KV slots, measured, and the plugin's fix
(`vllm_massv.patches.v1_eagle_positions`); stock configs elsewhere are untouched.

The engine test serves the (untrained) MSD drafter with the fix switched off
(`VLLM_MASSV_TEST_STOCK_EAGLE_POSITIONS=1`: stock vLLM's proposer positions) and compares every
draft with the transformers twin (1-D absolute positions, as EAGLE/EAGLE-3/MSD heads are
trained). `tests/msd/test_msd.py::test_drafts_match_transformers_twin` is the same comparison
with the fix.
Report: docs/notes/eagle-mrope-positions.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.support.engine import mixed_batch, token_ids
from tests.support.profile import ENGINE_ARGS
from tests.support.replay import MsdReplay, draft_mismatches, run_msd
from vllm_massv.envs import EAGLE_POSITION_FIX, TEST_STOCK_EAGLE_POSITIONS
from vllm_massv.rope import absolute_positions
from vllm_massv.testing import build_msd_drafter


def test_absolute_positions_layouts():
    """Request r's query tokens are positions seq_len[r] - q_len[r] ... seq_len[r] - 1: a
    prefill chunk, a padded verify batch (rejected tokens included) and a decode token."""
    qsl = torch.tensor([0, 5, 9, 10], dtype=torch.int32)
    seq_lens = torch.tensor([5, 104, 31], dtype=torch.int32)
    got = absolute_positions(qsl, seq_lens, 10).tolist()
    assert got == [0, 1, 2, 3, 4, 100, 101, 102, 103, 30]


def _llama_eagle_head(path: Path, hidden: int, vocab: int) -> Path:
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                architectures=["LlamaForCausalLM"]).save_pretrained(path)
    return path


def _proposer_class(target: Path, draft: Path, method: str):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.spec_decode.eagle import EagleProposer

    cfg = EngineArgs(model=str(target), speculative_config={
        "method": method, "model": str(draft), "num_speculative_tokens": 3},
        **ENGINE_ARGS).create_engine_config()
    return type(EagleProposer.__new__(EagleProposer, vllm_config=cfg, device="cpu")).__name__


def test_stock_eagle_dispatch(models, tmp_path, monkeypatch):
    """Which proposer vLLM builds with the plugin: stock `EagleProposer` for an EAGLE head on a
    1-D-RoPE target; the absolute-positions fix only on an M-RoPE target, and not there either
    with the user's opt-out `VLLM_MASSV_EAGLE_POSITION_FIX=0` (stock vLLM exactly: no plugin
    proposer, so no position fix and no CPU sampler fix). MSD drafters keep their proposer."""
    from transformers import AutoConfig

    monkeypatch.delenv(EAGLE_POSITION_FIX, raising=False)
    lm = AutoConfig.from_pretrained(models.text_lm)
    on_text = _llama_eagle_head(tmp_path / "text_head", lm.hidden_size, lm.vocab_size)
    on_vl = _llama_eagle_head(tmp_path / "vl_head", 256, 2112)
    msd = build_msd_drafter(models.target, tmp_path / "msd")
    assert _proposer_class(models.text_lm, on_text, "eagle") == "EagleProposer"
    assert _proposer_class(models.target, on_vl, "eagle") == "EagleAbsolutePositionsProposer"
    assert _proposer_class(models.target, msd, "eagle") == "MsdEagleProposer"
    monkeypatch.setenv(EAGLE_POSITION_FIX, "0")
    assert _proposer_class(models.target, on_vl, "eagle") == "EagleProposer"
    assert _proposer_class(models.target, msd, "eagle") == "MsdEagleProposer"


@pytest.fixture(scope="module")
def stock_run(models, tmp_path_factory):
    drafter = build_msd_drafter(models.target, tmp_path_factory.mktemp("msd") / "on")
    return drafter, run_msd(models.target, drafter, env={TEST_STOCK_EAGLE_POSITIONS: "1"})


@pytest.mark.slow
def test_stock_positions_shift_drafts_after_images(models, stock_run, reference,
                                                   tmp_path_factory):
    """With stock positions, vLLM's drafts disagree with the
    twin on image prompts (and agree on the text-only prompt, where the temporal M-RoPE row is
    the token index); the output stays lossless (verification). A twin given stock's own RoPE
    positions (the temporal row) still disagrees on every image prompt: draft steps 2..k write
    KV into wrong slots (the KV-slot part of the defect, apart from the RoPE-position part). Where
    the first disagreement falls depends on the schedule: chained draft steps also run after
    prefill chunks, so on an image mid-prompt even step 0's first draft can see overwritten KV
    (seen in a full-suite run; in isolation the first mismatch was at draft position >= 2)."""
    from vllm_massv.training.features import TargetHiddenStates
    from vllm_massv.drafters.msd.hf_model import MsdQwen2Drafter

    drafter_dir, run = stock_run
    assert token_ids(run["outputs"]) == reference
    features = TargetHiddenStates(models.target, cache_dir=tmp_path_factory.mktemp("features"))
    twin = MsdQwen2Drafter.from_pretrained(drafter_dir).eval()
    batch = mixed_batch(models.target)
    replay = MsdReplay(twin, features)
    absolute = draft_mismatches(run["log"], run["outputs"], batch, features, replay)
    temporal = draft_mismatches(run["log"], run["outputs"], batch, features, replay,
                                temporal_positions=True)
    print("stock positions vs twin (absolute | temporal RoPE positions):")
    print(json.dumps({n: [absolute[n], temporal[n]] for n in absolute}))
    assert sum(absolute["text"]["mismatches"]) == 0
    assert sum(temporal["text"]["mismatches"]) == 0
    for name in ("astronaut", "two_images", "mid_prompt", "gradient_long"):
        assert sum(absolute[name]["mismatches"]) >= absolute[name]["steps"] // 2, name
        # the KV-slot part: a twin given stock's own RoPE positions still disagrees
        assert temporal[name]["first"] is not None, name
