"""The draft layout both model runners give a standalone drafter's first pass: request r's target
tokens at `qsl[r] + r`, followed by one extra slot per request (the bonus/correction token).

V1: `vllm/v1/spec_decode/utils.py::copy_and_expand_eagle_inputs_kernel`; Model Runner V2:
`vllm/v1/worker/gpu/spec_decode/standalone_ar/speculator.py::_prepare_prefill_inputs_kernel`
("out_start = query_start_loc[i] + i").
"""

from __future__ import annotations

import torch


def shift_mask_to_draft_layout(is_mm: torch.Tensor, query_start_loc_cpu: torch.Tensor
                               ) -> torch.Tensor:
    """Move a target-layout token mask to vLLM's expanded draft layout.

    The draft first pass lays out request r's tokens at `qsl[r] + r`, i.e. target token i of
    request r sits at draft index `i + r`, followed by one bonus slot per request
    (`vllm/v1/spec_decode/utils.py::copy_and_expand_eagle_inputs_kernel`).

    Args:
        is_mm: [N] bool (CPU), target layout.
        query_start_loc_cpu: [batch + 1] int32 (CPU), cumulative query lengths, qsl[-1] == N.
    Returns:
        [N + batch] bool (CPU).
    """
    batch = query_start_loc_cpu.shape[0] - 1
    n = is_mm.shape[0]
    q_lens = (query_start_loc_cpu[1:] - query_start_loc_cpu[:-1]).long()
    req = torch.repeat_interleave(torch.arange(batch), q_lens, output_size=n)
    idx = torch.nonzero(is_mm, as_tuple=True)[0]
    out = torch.zeros(n + batch, dtype=torch.bool)
    out[idx + req[idx]] = True
    return out
