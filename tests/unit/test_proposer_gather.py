"""The MASSV proposer's image-embedding gather on a hand-built runner (no engine).

The MASSV proposer's image-embedding gather on a hand-built runner (no engine): the runner's
one gather per draft step runs with shift 0 and is reused by the proposer, the mask moves to
vLLM's expanded draft layout (target token i of request r at draft index i + r), and steps
without image embeddings pass no mask at all."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_massv.drafters.massv.draft_layout import shift_mask_to_draft_layout
from vllm_massv.drafters.massv.v1_proposer import (MassvDraftModelProposer,
                                                   _capture_scheduler_output)


class FakeRunner:
    """`propose_draft_token_ids` gathers with shift 1 and hands the result to the drafter, as
    vLLM's `GPUModelRunner.propose_draft_token_ids` does."""

    def __init__(self, embeds, is_mm):
        self.calls: list[int] = []
        self.result = (embeds, is_mm)
        self.drafter = None

    def _gather_mm_embeddings(self, scheduler_output, shift_computed_tokens=0):
        self.calls.append(shift_computed_tokens)
        return self.result

    def propose_draft_token_ids(self, scheduler_output):
        mm = self._gather_mm_embeddings(scheduler_output, shift_computed_tokens=1)
        return self.drafter(mm)


def _proposer(runner):
    fake = SimpleNamespace(runner=runner, _scheduler_output=None, _shift0_gather=None)
    _capture_scheduler_output(runner, fake)
    return fake


# request 0: 3 target tokens, the middle one an image position; request 1: 2 text tokens
QSL = torch.tensor([0, 3, 5], dtype=torch.int32)
CAD = SimpleNamespace(query_start_loc_cpu=QSL)
IMAGE = ([torch.ones(1, 4)], torch.tensor([False, True, False, False, False]))


def test_runner_gather_is_shift0_and_reused() -> None:
    runner = FakeRunner(*IMAGE)
    proposer = _proposer(runner)
    seen = {}

    def drafter(mm):
        seen["out"] = MassvDraftModelProposer._draft_mm_embeddings(proposer, mm, CAD, 5)
        return "drafts"

    runner.drafter = drafter
    assert runner.propose_draft_token_ids(object()) == "drafts"
    assert runner.calls == [0]                     # one gather, with shift 0
    embeds, mask = seen["out"]
    assert embeds is IMAGE[0]
    assert mask.tolist() == [False, True, False, False, False, False, False]
    assert "_gather_mm_embeddings" not in vars(runner)   # the redirect ends with the step
    assert proposer._scheduler_output is None and proposer._shift0_gather is None


def test_text_only_step_passes_no_mask() -> None:
    runner = FakeRunner([], torch.zeros(5, dtype=torch.bool))
    proposer = _proposer(runner)
    seen = {}
    runner.drafter = lambda mm: seen.setdefault(
        "out", MassvDraftModelProposer._draft_mm_embeddings(proposer, mm, CAD, 5))
    runner.propose_draft_token_ids(object())
    assert seen["out"] is None and runner.calls == [0]


def test_gathers_itself_when_the_runner_did_not() -> None:
    runner = FakeRunner(*IMAGE)
    proposer = _proposer(runner)
    seen = {}
    runner.drafter = lambda mm: seen.setdefault(
        "out", MassvDraftModelProposer._draft_mm_embeddings(proposer, None, CAD, 5))
    runner.propose_draft_token_ids(object())
    assert runner.calls == [0, 0]
    assert seen["out"][1].tolist() == [False, True, False, False, False, False, False]
    with pytest.raises(RuntimeError, match="scheduler output"):
        MassvDraftModelProposer._draft_mm_embeddings(proposer, None, CAD, 5)


def test_mask_layout_mismatch_raises() -> None:
    runner = FakeRunner(*IMAGE)
    proposer = _proposer(runner)
    runner.drafter = lambda mm: MassvDraftModelProposer._draft_mm_embeddings(
        proposer, mm, CAD, 6)
    with pytest.raises(RuntimeError, match="image mask covers 5 tokens"):
        runner.propose_draft_token_ids(object())


def test_shift_mask_to_draft_layout() -> None:
    is_mm = torch.tensor([True, False, True, True, False, True])
    qsl = torch.tensor([0, 2, 2, 6], dtype=torch.int32)   # an empty request in the middle
    out = shift_mask_to_draft_layout(is_mm, qsl)
    assert out.nonzero().flatten().tolist() == [0, 4, 5, 7]
    assert out.shape == (9,)
