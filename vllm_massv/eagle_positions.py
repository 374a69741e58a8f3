"""EAGLE-path drafters on M-RoPE targets: 1-D absolute positions for RoPE and draft KV slots.

Stock vLLM 0.32 (`v1/spec_decode/llm_base_proposer.py`), for a drafter without M-RoPE (EAGLE-1,
EAGLE-3 heads, MSD) serving an M-RoPE target (Qwen2-VL / Qwen2.5-VL):

- first pass: `_set_positions` stores the target's *temporal* M-RoPE row as the drafter's 1-D
  positions (RoPE input). For text after an image that row is smaller than the token index
  (an image of N placeholders advances it by max(t, h, w) only), so the head sees positions it
  was not trained with (EAGLE/EAGLE-3/MSD heads are trained with 1-D `arange` positions);
- draft steps 2..k: `_update_positions_dependent_metadata` -> `eagle_step_update_slot_mapping_
  and_metadata` (`v1/spec_decode/utils.py`) computes the KV slot of draft token j from that
  temporal row + 1, so after an image the draft KV is written into the slots of *earlier*
  tokens (overwriting the drafter's cached KV there) while attention reads the token's real slot
  (stale). The first pass uses the runner's slot mapping, which is right.

:class:`EagleAbsolutePositionsProposer` feeds the proposer the absolute token index instead
(computed from the attention metadata: request r's query tokens are the positions
`seq_lens[r] - query_len[r] ... seq_lens[r] - 1`, in every runner layout: prefill, padded and
unpadded drafter batches). `vllm_massv.patches` (patch 6) constructs it in place of
`EagleProposer` only for `eagle`/`eagle3` drafters without M-RoPE on M-RoPE targets (and MSD
drafters); every other config is stock. Upstream report: docs/notes/eagle-mrope-positions.md.
It also installs the CPU rejection-sampler fix (patch 5) in its worker, as the MASSV and MSD
proposers do.
"""

from __future__ import annotations

import torch
from vllm.logger import init_logger
from vllm.v1.spec_decode.eagle import EagleProposer

logger = init_logger("vllm.massv.eagle_positions")

#: Testing aid: keep stock vLLM's temporal-row positions (to measure the defect). Never set in
#: production.
STOCK_POSITIONS_ENV = "VLLM_MASSV_TEST_STOCK_EAGLE_POSITIONS"


def needs_absolute_positions(vllm_config) -> bool:
    """True for an `eagle`/`eagle3` drafter without M-RoPE serving an M-RoPE target."""
    spec = vllm_config.speculative_config
    if spec is None or spec.method not in ("eagle", "eagle3") or spec.draft_model_config is None:
        return False
    return bool(vllm_config.model_config.uses_mrope) and not spec.draft_model_config.uses_mrope


def absolute_positions(query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                       num_tokens: int) -> torch.Tensor:
    """1-D absolute positions of a flattened query batch.

    Args:
        query_start_loc: [batch + 1] int32, cumulative query lengths (device).
        seq_lens: [batch] int32, tokens per request including this query (device).
        num_tokens: total query tokens (query_start_loc[-1]).
    Returns:
        [num_tokens] int64: token i of request r at `seq_lens[r] - q_len[r] + (i - qsl[r])`.
    """
    qsl = query_start_loc.long()
    q_lens = qsl[1:] - qsl[:-1]
    batch = q_lens.shape[0]
    req = torch.repeat_interleave(torch.arange(batch, device=qsl.device), q_lens,
                                  output_size=num_tokens)
    start = seq_lens[:batch].long() - q_lens
    return torch.arange(num_tokens, device=qsl.device) - qsl[req] + start[req]


class EagleAbsolutePositionsProposer(EagleProposer):
    """`EagleProposer` that gives a non-M-RoPE drafter absolute 1-D positions on an M-RoPE
    target (see the module docstring)."""

    def __init__(self, vllm_config, device: torch.device, runner=None) -> None:
        super().__init__(vllm_config, device, runner=runner)
        import os

        from vllm_massv.patches import fix_cpu_rejection_sampler

        self._stock_positions = os.environ.get(STOCK_POSITIONS_ENV, "0") == "1"
        logger.info("EAGLE proposer on an M-RoPE target (%s): draft positions = %s",
                    type(self).__name__,
                    f"stock vLLM (temporal M-RoPE row; {STOCK_POSITIONS_ENV}=1)"
                    if self._stock_positions else "1-D absolute (patch 6)")
        # patch 5: these engines draft images-and-text on CPU at temperature > 0 too (EAGLE-3
        # heads trained by massv; issue 12)
        fix_cpu_rejection_sampler()

    def propose(self, num_speculative_tokens, target_token_ids, target_positions,
                target_hidden_states, next_token_ids, token_indices_to_sample,
                common_attn_metadata, sampling_metadata, mm_embed_inputs=None,
                num_rejected_tokens_gpu=None, slot_mappings=None) -> torch.Tensor:
        """Same contract as `SpecDecodeBaseProposer.propose`; returns [batch, k] draft ids."""
        if target_positions.dim() == 2 and not self.uses_mrope and not self._stock_positions:
            target_positions = absolute_positions(
                common_attn_metadata.query_start_loc, common_attn_metadata.seq_lens,
                target_token_ids.shape[0])
        return super().propose(
            num_speculative_tokens, target_token_ids, target_positions, target_hidden_states,
            next_token_ids, token_indices_to_sample, common_attn_metadata, sampling_metadata,
            mm_embed_inputs=mm_embed_inputs, num_rejected_tokens_gpu=num_rejected_tokens_gpu,
            slot_mappings=slot_mappings)

    def _set_positions(self, num_tokens: int, positions: torch.Tensor) -> None:
        if positions.dim() == 1 and not self.uses_mrope:
            self.positions[:num_tokens] = positions   # already 1-D: no temporal-row pick
            return
        super()._set_positions(num_tokens, positions)
