"""V1 model runner: the EAGLE proposer for MSD drafters.

`MsdEagleProposer` is vLLM's `EagleProposer` (`vllm/v1/spec_decode/eagle.py`) with the 1-D
absolute positions and CPU sampler fix of `vllm_massv/patches/v1_eagle_positions.py` (MSD is
trained with 1-D positions), and no silent text-only fallback: loading fails if vLLM would not
hand the drafter the target's image embeddings. `vllm_massv/patches/v1_proposer_routing.py`
builds it for MSD drafters. Design: docs/design/msd.md.
"""

from __future__ import annotations

import torch
from vllm.logger import init_logger

from vllm_massv.drafters.msd.config import MsdConfig
from vllm_massv.patches.v1_eagle_positions import EagleAbsolutePositionsProposer

logger = init_logger("vllm.massv.msd")


class MsdEagleProposer(EagleAbsolutePositionsProposer):
    """`EagleProposer` for MSD drafters.

    Raises (at model load):
        RuntimeError: the drafter class cannot receive the target's image embeddings.
    """

    drafter_name = "MSD"

    def __init__(self, vllm_config, device: torch.device, runner=None) -> None:
        super().__init__(vllm_config, device, runner=runner)
        self.msd_config = MsdConfig.from_hf_config(self.draft_model_config.hf_config)
        logger.info("MSD proposer active: decoupled visual tokens=%s, k=%d, target=%s, "
                    "positions=%s", self.msd_config.decouple_visual_tokens,
                    self.num_speculative_tokens, self.msd_config.target or "?",
                    "stock (temporal M-RoPE row)" if self._stock_positions else "1-D absolute")

    def load_model(self, target_model: torch.nn.Module) -> None:
        super().load_model(target_model)
        if self.vllm_config.model_config.supports_multimodal_inputs and not \
                self.supports_mm_inputs:
            raise RuntimeError(
                f"MSD drafter {type(self.model).__name__}: vLLM will not pass it the target's "
                "image embeddings; refusing to draft text-only on a multimodal target.")
