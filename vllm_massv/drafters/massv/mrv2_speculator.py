"""MASSV speculator for vLLM's Model Runner V2 (MRV2): image-aware drafting with a standalone
drafter.

`MassvStandaloneARSpeculator` is MRV2's `StandaloneARSpeculator` (the `draft_model` method,
`vllm/v1/worker/gpu/spec_decode/standalone_ar/speculator.py`), which takes the runner's
`mm_inputs` and drops them: a MASSV drafter there drafts text-only, silently. This class gives the
drafter the same inputs as the V1 proposer (`v1_proposer.py`):

* the target's cached image embeddings (no second vision pass), gathered at shift 0 -- what the
  target itself consumed this step; the runner's own gather reads one token ahead for
  EAGLE-style drafters (`gpu/model_runner.py::sample_tokens`, `draft_lookahead=1`) -- and moved
  to the expanded draft layout (`draft_layout.py`: target token i of request r at i + r);
* 1-D positions: MRV2's `input_batch.positions` is already the absolute 1-D index (M-RoPE lives in
  `model_state.rope_state` and feeds the target only), so nothing is remapped; and
* causal draft attention: MRV2 builds draft metadata without multimodal document ranges.

How the embeddings reach the model: before the draft pass the speculator stages them on the
drafter (`MassvDrafterMixin.stage_multimodal`); the drafter's `forward` always embeds itself
(with `inputs_embeds`, one compiled signature for prefill and decode) and consumes the staged
embeddings in the first forward, the expanded prefill. Decode steps draft after the prompt, where
no image positions occur. This leaves vLLM's `_prefill` / `_run_model` untouched, whose
signatures differ between vLLM 0.32/0.33 and 0.34 (0.34 moved drafting into the shared
`AutoRegressiveSpeculator`, with CUDA graphs). A step whose draft prefill holds image positions
is dispatched eager (`is_profile=True`: 0.34's `StandaloneARSpeculator.propose` reads it only as
`need_eager`; 0.32/0.33 ignore it), so no captured graph can skip the drafter's forward -- read
in 0.34's source, not run.

How vLLM builds this class: on 0.34 through the drafter's `speculator_config_class`
(`mrv2_config.py`, vLLM's own extension point); on 0.32/0.33 by routing
`StandaloneARSpeculator(...)` (`vllm_massv/patches/mrv2_speculator_routing.py`). Design:
docs/design/massv.md.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.logger import init_logger
from vllm.v1.worker.gpu.spec_decode.standalone_ar.speculator import StandaloneARSpeculator

from vllm_massv import envs
from vllm_massv.drafters.massv.config import MRV2_MROPE_REFUSAL, MassvConfig
from vllm_massv.drafters.massv.draft_layout import shift_mask_to_draft_layout

logger = init_logger("vllm.massv.speculator")


class MassvStandaloneARSpeculator(StandaloneARSpeculator):
    """`StandaloneARSpeculator` for MASSV drafters (Model Runner V2).

    Raises:
        NotImplementedError (construction): a `positions: mrope` drafter (refused before serving
            by `vllm_massv/patches/engine_config.py`; this is the backstop).
        RuntimeError (model load): the drafter has a projector but vLLM will not hand it image
            embeddings (a text-only target).
    """

    def __init__(self, vllm_config: Any, device: torch.device) -> None:
        super().__init__(vllm_config, device)
        self.massv_config = MassvConfig.from_hf_config(self.draft_model_config.hf_config)
        if self.massv_config.positions != "1d":
            raise NotImplementedError(MRV2_MROPE_REFUSAL)
        self._corrupt_last_draft = envs.test_corrupt_last_draft()
        logger.info(
            "MASSV speculator active (Model Runner V2): projector=%s, k=%d, target=%s",
            self.massv_config.projector, self.num_speculative_steps,
            self.massv_config.target or "?")

    def load_model(self, target_model: torch.nn.Module) -> None:
        super().load_model(target_model)  # sets supports_mm_inputs (target and drafter both MM)
        if self.massv_config.uses_projector and not self.supports_mm_inputs:
            raise RuntimeError(
                "MASSV drafter has a projector but vLLM will not pass it the target's image "
                "embeddings (the target model does not take multimodal inputs). Refusing to "
                "draft text-only; serve a vision-language target or use `projector: none`.")
        self.model.embed_in_forward = True

    @torch.inference_mode()
    def propose(self, input_batch: Any, *args: Any, dummy_run: bool = False,
                **kwargs: Any) -> torch.Tensor:
        """`BaseSpeculator.propose` (`vllm/v1/worker/gpu/spec_decode/speculator.py`); returns
        [num_reqs, k] int64 draft ids. The runner's `mm_inputs` (gathered one token ahead) are
        not used: :meth:`draft_mm_inputs` gathers what the target consumed."""
        staged = None if dummy_run else self.draft_mm_inputs(input_batch)
        if staged is not None:
            # The drafter's Python forward must run to take the embeddings: no graph replay for
            # this step (vLLM 0.34 reads `is_profile` as "dispatch eager", and can otherwise
            # replay a FULL prefill graph for one-token prompt chunks; 0.32/0.33 ignore it).
            kwargs["is_profile"] = True
        self.model.stage_multimodal(staged)
        try:
            draft = super().propose(input_batch, *args, dummy_run=dummy_run, **kwargs)
        finally:
            self.model.stage_multimodal(None)
        if self._corrupt_last_draft and draft.shape[-1] > 0 and not dummy_run:
            draft[:, -1] = (draft[:, -1] + 1) % self.massv_config.orig_vocab_size
        return draft

    def draft_mm_inputs(self, input_batch: Any
                        ) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """The target's image embeddings of this step's tokens, with a mask in the draft layout.

        Gathered with `draft_lookahead=0` from the runner's encoder cache
        (`ModelState.gather_mm_embeddings`, `vllm/v1/worker/gpu/model_states/interface.py`); it
        reads the step's numpy snapshots in `input_batch`, which the runner's
        `postprocess_sampled` leaves alone, and the cache, freed only at the next schedule.

        Returns:
            None when the drafter takes no image embeddings or none fall in this step's tokens,
            else (embeds, is_mm): embeds a list of [n_i, vision_feature_dim] tensors (target
            dtype), is_mm a [num_tokens + num_reqs] bool CPU tensor, True at draft index i + r
            for each image position i of request r.
        Raises:
            RuntimeError: the gathered mask does not cover this step's tokens.
        """
        if not (self.supports_mm_inputs and self.model_state.supports_mm_inputs):
            return None
        embeds, is_mm = self.model_state.gather_mm_embeddings(input_batch, draft_lookahead=0)
        if not embeds:
            return None
        num_reqs, num_tokens = input_batch.num_reqs, input_batch.num_tokens
        if is_mm.shape[0] != num_tokens:
            raise RuntimeError(f"MASSV: image mask covers {is_mm.shape[0]} tokens but the "
                               f"drafter gets {num_tokens} target tokens")
        qsl = torch.from_numpy(input_batch.query_start_loc_np[:num_reqs + 1]).to(torch.int64)
        return embeds, shift_mask_to_draft_layout(is_mm, qsl)

