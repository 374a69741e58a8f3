"""The MASSV proposer's M-RoPE first-pass positions on a hand-built batch (no engine).

`MassvDraftModelProposer._fill_mrope_first_pass` on a hand-built batch (no engine): the
M-RoPE positions of vLLM's expanded draft layout (request r's target token i at draft index
i + r, then its bonus slot; rejected slots get 1-D position 0 from vLLM's expand kernel)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from vllm_massv.drafters.massv.v1_proposer import MassvDraftModelProposer


def test_mrope_fill_keeps_target_columns_and_no_negative_position() -> None:
    # request 0: 4 target tokens at 1-D 10..13, M-RoPE 4..7 (an image earlier compressed the
    # positions: delta -6), its last token rejected; request 1: 2 text tokens, delta 0.
    target_1d = torch.tensor([10, 11, 12, 13, 20, 21])
    target_mrope = torch.tensor([4, 5, 6, 7, 20, 21]).expand(3, -1).clone()
    # the expand kernel's 1-D output: start + j, rejected slots 0
    expanded = torch.tensor([10, 11, 12, 13, 0, 20, 21, 22])
    fake = SimpleNamespace(
        positions=expanded.clone(), mrope_positions=torch.full((3, 8), -99),
        arange=torch.arange(8, dtype=torch.int32), _mrope_delta=torch.zeros(4, dtype=torch.long),
        _target_mrope=target_mrope)
    cad = SimpleNamespace(batch_size=lambda: 2, query_start_loc=torch.tensor([0, 4, 6]))
    MassvDraftModelProposer._fill_mrope_first_pass(
        fake, cad, target_1d, 8, torch.tensor([1, 0]))
    assert fake._mrope_delta[:2].tolist() == [-6, 0]
    # target columns at i + r; request 0's bonus slot (index 3) holds its first rejected token's
    # target column (7 == 13 - 6, the text-style value); its last rejected slot is clamped to 0
    # (it was -6 before the clamp); request 1's bonus slot is text-style 22 + 0.
    assert fake.mrope_positions.tolist() == [[4, 5, 6, 7, 0, 20, 21, 22]] * 3
