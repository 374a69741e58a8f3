"""V1 model runner: EAGLE-path drafters without M-RoPE on M-RoPE targets get 1-D absolute positions
for RoPE and draft KV slots (a stock-vLLM bug fix). Stock vLLM gives them the target's temporal
M-RoPE row, which after an image is smaller than the token index: the head sees positions it was
not trained with and writes its draft KV into earlier tokens' slots. `v1_proposer_routing.py`
builds :class:`EagleAbsolutePositionsProposer` for them (and its subclass for MSD drafters);
`VLLM_MASSV_EAGLE_POSITION_FIX=0` (`vllm_massv.envs`) turns it off for heads that are not this
project's drafters: vLLM then builds its own `EagleProposer`, exactly as without the plugin.
Design: docs/design/vllm-integration.md; upstream report: docs/notes/eagle-mrope-positions.md.
"""

from __future__ import annotations

import torch
from vllm.logger import init_logger
from vllm.v1.spec_decode.eagle import EagleProposer

from vllm_massv import envs
from vllm_massv.patches.v1_cpu_sampler import fix_cpu_rejection_sampler
from vllm_massv.patches.v1_proposer_routing import needs_absolute_positions  # noqa: F401
from vllm_massv.rope import absolute_positions

logger = init_logger("vllm.massv.eagle_positions")


class EagleAbsolutePositionsProposer(EagleProposer):
    """`EagleProposer` that gives a non-M-RoPE drafter absolute 1-D positions on an M-RoPE
    target (see the module docstring). Also applies the CPU rejection-sampler fix in its
    worker: these engines draft on image prompts at temperature > 0 too."""

    #: the drafter kind named in the CPU sampler fix's log line (subclasses), or None
    drafter_name: str | None = None

    def __init__(self, vllm_config, device: torch.device, runner=None) -> None:
        super().__init__(vllm_config, device, runner=runner)
        self._stock_positions = envs.test_stock_eagle_positions()
        opt_out = ("" if self.drafter_name is not None else
                   f"; {envs.EAGLE_POSITION_FIX}=0 serves this head with vLLM's stock proposer")
        logger.info("EAGLE proposer on an M-RoPE target (%s): draft positions = %s%s",
                    type(self).__name__,
                    f"stock vLLM (temporal M-RoPE row; {envs.TEST_STOCK_EAGLE_POSITIONS}=1)"
                    if self._stock_positions else "1-D absolute", opt_out)
        fix_cpu_rejection_sampler(self.drafter_name)

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
