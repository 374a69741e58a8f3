"""MASSV proposer for vLLM's V1 model runner: image-aware drafting with a standalone drafter.

`MassvDraftModelProposer` is vLLM's `DraftModelProposer` (`vllm/v1/spec_decode/draft_model.py`)
with four fixes for vision-language targets: 1-D positions and KV slots (the target's M-RoPE,
continued text-style, for `positions: mrope`), image embeddings gathered at shift 0 and moved to
the draft layout, no silent text-only fallback, and causal attention over image tokens.
`vllm_massv/patches/v1_proposer_routing.py` builds it for MASSV drafters. Design:
docs/design/massv.md.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.v1.spec_decode.draft_model import DraftModelProposer

from vllm_massv import envs
from vllm_massv.drafters.massv.config import MassvConfig
from vllm_massv.drafters.massv.draft_layout import shift_mask_to_draft_layout
from vllm_massv.patches.v1_cpu_sampler import fix_cpu_rejection_sampler

logger = init_logger("vllm.massv.proposer")


class MassvDraftModelProposer(DraftModelProposer):
    """`DraftModelProposer` for MASSV drafters (V1 model runner).

    Raises (at construction / model load):
        RuntimeError: no runner was passed, or image embeddings cannot reach a drafter that has
            a projector.
    """

    def __init__(self, vllm_config, device: torch.device, runner=None) -> None:
        super().__init__(vllm_config=vllm_config, device=device, runner=runner)
        if runner is None:
            raise RuntimeError("MassvDraftModelProposer needs the model runner (runner=...)")
        self.runner = runner
        self.massv_config = MassvConfig.from_hf_config(self.draft_model_config.hf_config)
        if self.uses_mrope:
            # The base class keeps only `mrope_positions` for an M-RoPE drafter, but the expand
            # kernel and the slot mappings need the 1-D stream in `self.positions`.
            self.positions = torch.zeros(self.max_positions, dtype=torch.int64, device=device)
            self._mrope_delta = torch.zeros(self.max_batch_size, dtype=torch.int64, device=device)
        self._target_mrope: torch.Tensor | None = None
        self._scheduler_output: Any = None
        # the runner's own gather of this step, redirected to shift 0 (_capture_scheduler_output)
        self._shift0_gather: tuple[list[torch.Tensor], torch.Tensor] | None = None
        self._corrupt_last_draft = envs.test_corrupt_last_draft()
        _capture_scheduler_output(runner, self)
        fix_cpu_rejection_sampler("MASSV")
        logger.info(
            "MASSV proposer active: projector=%s, drafter positions=%s, k=%d, target=%s",
            self.massv_config.projector, self.massv_config.positions,
            self.num_speculative_tokens, self.massv_config.target or "?")

    # --- vLLM hooks that would refuse or misdescribe a MASSV drafter -------------------------
    def _warn_if_multimodal(self) -> None:
        pass  # stock warns "text-only speculative decoding"; MASSV drafts with the images

    def _raise_if_mrope(self) -> None:
        cfg = MassvConfig.from_hf_config(self.draft_model_config.hf_config)
        if self.draft_model_config.uses_mrope and cfg.positions != "mrope":
            raise NotImplementedError(
                "MASSV drafter has an M-RoPE rope config but massv.positions != 'mrope'")

    def load_model(self, target_model: torch.nn.Module) -> None:
        super().load_model(target_model)
        if self.massv_config.uses_projector and not self.supports_mm_inputs:
            raise RuntimeError(
                "MASSV drafter has a projector but vLLM will not pass it the target's image "
                "embeddings (the target model does not take multimodal inputs). Refusing to "
                "draft text-only; serve a vision-language target or use `projector: none`.")

    # --- drafting --------------------------------------------------------------------------
    def propose(self, num_speculative_tokens, target_token_ids, target_positions,
                target_hidden_states, next_token_ids, token_indices_to_sample,
                common_attn_metadata, sampling_metadata, mm_embed_inputs=None,
                num_rejected_tokens_gpu=None, slot_mappings=None) -> torch.Tensor:
        """Same contract as `SpecDecodeBaseProposer.propose`; returns [batch, k] draft ids."""
        num_tokens = target_token_ids.shape[0]
        self._target_mrope = target_positions if target_positions.dim() == 2 else None
        positions_1d = self.runner.positions[:num_tokens]
        if self.supports_mm_inputs:
            mm_embed_inputs = self._draft_mm_embeddings(mm_embed_inputs, common_attn_metadata,
                                                        num_tokens)
        if common_attn_metadata.mm_req_doc_ranges is not None:
            common_attn_metadata = common_attn_metadata.replace(mm_req_doc_ranges=None)
        draft = super().propose(
            num_speculative_tokens, target_token_ids, positions_1d, target_hidden_states,
            next_token_ids, token_indices_to_sample, common_attn_metadata, sampling_metadata,
            mm_embed_inputs=mm_embed_inputs, num_rejected_tokens_gpu=num_rejected_tokens_gpu,
            slot_mappings=slot_mappings)
        if self._corrupt_last_draft and draft.shape[-1] > 0:
            draft[:, -1] = (draft[:, -1] + 1) % self.massv_config.orig_vocab_size
        return draft

    def _draft_mm_embeddings(self, mm_embed_inputs, cad, num_tokens: int):
        """Image embeddings for this step's draft prefill, with a mask in the draft layout.

        Uses the runner's gather of this step when it ran with shift 0 (the usual case: the
        runner's shift-1 call is redirected, see :func:`_capture_scheduler_output`), else
        gathers with shift 0 itself.

        Returns:
            None when no image embedding falls in this step's tokens (the drafter then embeds
            token ids only, as `MassvDrafterMixin.embed_input_ids` does for an empty list), else
            (embeds, is_mm) with embeds a list of [n_i, vision_feature_dim] tensors and is_mm a
            [num_tokens + batch] bool CPU tensor: True at draft index `i + r` for each target
            token `i` (of request `r`) that is an image position.
        Raises:
            RuntimeError: the scheduler output was not captured, or layouts disagree.
        """
        gathered, self._shift0_gather = self._shift0_gather, None
        if gathered is None or mm_embed_inputs is not gathered:
            so = self._scheduler_output
            if so is None:
                raise RuntimeError("MASSV proposer did not see this step's scheduler output; "
                                   "image embeddings cannot reach the drafter")
            gathered = self.runner._gather_mm_embeddings(so, shift_computed_tokens=0)
        embeds, is_mm = gathered
        if is_mm.shape[0] != num_tokens:
            raise RuntimeError(f"MASSV: image mask covers {is_mm.shape[0]} tokens but the "
                               f"drafter gets {num_tokens} target tokens")
        if not embeds:
            return None
        return embeds, shift_mask_to_draft_layout(is_mm, cad.query_start_loc_cpu)

    def set_inputs_first_pass(self, target_token_ids, next_token_ids, target_positions,
                              target_hidden_states, token_indices_to_sample, cad,
                              num_rejected_tokens_gpu):
        num_out, token_indices_to_sample, new_cad = super().set_inputs_first_pass(
            target_token_ids, next_token_ids, target_positions, target_hidden_states,
            token_indices_to_sample, cad, num_rejected_tokens_gpu)
        if self.uses_mrope:
            self._fill_mrope_first_pass(cad, target_positions, num_out, num_rejected_tokens_gpu)
        return num_out, token_indices_to_sample, new_cad

    def _fill_mrope_first_pass(self, cad, positions_1d, num_out, num_rejected) -> None:
        """M-RoPE positions of the expanded draft batch ([3, num_out] in `mrope_positions`).

        Target tokens keep the target's own M-RoPE columns; every other slot (bonus token,
        rejected padding) is text-style: `1-D index + delta[r]`, where delta[r] is the M-RoPE
        offset of request r's last accepted token (Qwen2-VL's `mrope_position_delta` for text
        after the last image). Clamped at 0: vLLM gives rejected slots 1-D position 0
        (`utils.py::copy_and_expand_eagle_inputs_kernel`), and a request's last rejected slot
        is not overwritten by a target column, so it would keep `delta[r]`, negative after an
        image. The slot is masked (output ignored), but a negative index into the rotary cache
        only works by wrap-around (and compiled kernels assert on it).
        """
        if self._target_mrope is None:
            raise RuntimeError("MASSV positions='mrope' needs an M-RoPE target")
        target_mrope = self._target_mrope
        n = positions_1d.shape[0]
        batch = cad.batch_size()
        qsl = cad.query_start_loc
        q_lens = qsl[1:] - qsl[:-1]
        arange = self.arange[:batch].long()
        last = (qsl[1:] - 1).long()
        if num_rejected is not None:
            last = last - num_rejected.long()
        delta = target_mrope[0, last] - positions_1d[last]
        self._mrope_delta[:batch] = delta
        req_out = torch.repeat_interleave(arange, q_lens + 1, output_size=num_out)
        self.mrope_positions[:, :num_out] = (self.positions[:num_out] + delta[req_out]).clamp_(
            min=0)
        req_in = torch.repeat_interleave(arange, q_lens, output_size=n)
        dst = torch.arange(n, device=positions_1d.device) + req_in
        self.mrope_positions[:, dst] = target_mrope

    def _update_positions_dependent_metadata(self, positions, common_attn_metadata,
                                             batch_size, input_batch_size, block_size):
        if not self.uses_mrope:
            return super()._update_positions_dependent_metadata(
                positions, common_attn_metadata, batch_size, input_batch_size, block_size)
        # The base class takes M-RoPE row 0 as the 1-D position for the slot mapping; give it
        # the 1-D index instead, then shift the (text-style) M-RoPE result back by delta.
        delta = self._mrope_delta[:batch_size]
        positions = super()._update_positions_dependent_metadata(
            positions - delta, common_attn_metadata, batch_size, input_batch_size, block_size)
        positions += delta
        return positions


def _capture_scheduler_output(runner, proposer: MassvDraftModelProposer) -> None:
    """Wrap `runner.propose_draft_token_ids` (instance attribute) to keep its scheduler output,
    and make the runner's image-embedding gather inside it use shift 0.

    The runner gathers with `shift_computed_tokens=1` for EAGLE
    (`gpu_model_runner.py::propose_draft_token_ids`) and passes the result to `propose`; a
    standalone drafter needs shift 0. While the draft step runs, `runner._gather_mm_embeddings`
    (instance attribute) gathers with shift 0 and hands the result to the proposer, so the step
    gathers once. The scheduler output lets the proposer gather itself if the runner did not.
    """
    original = runner.propose_draft_token_ids

    @functools.wraps(original)
    def propose_draft_token_ids(scheduler_output, *args, **kwargs):
        proposer._scheduler_output = scheduler_output
        proposer._shift0_gather = None
        previous = runner.__dict__.get("_gather_mm_embeddings")  # e.g. a profiler's wrapper
        gather = runner._gather_mm_embeddings

        def gather_shift0(scheduler_output, shift_computed_tokens=0):
            proposer._shift0_gather = gather(scheduler_output, shift_computed_tokens=0)
            return proposer._shift0_gather

        runner._gather_mm_embeddings = gather_shift0
        try:
            return original(scheduler_output, *args, **kwargs)
        finally:
            proposer._scheduler_output = None
            proposer._shift0_gather = None
            if previous is None:
                del runner._gather_mm_embeddings
            else:
                runner._gather_mm_embeddings = previous

    runner.propose_draft_token_ids = propose_draft_token_ids
