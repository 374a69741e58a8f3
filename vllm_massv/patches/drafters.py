"""Which of this project's drafters a vLLM `SpeculativeConfig` serves. Every patch changes
behaviour only when one of these is true (plus the EAGLE position fix, `v1_eagle_positions.py`,
and the opt-ins listed in `patches/__init__.py`); every other config runs as stock vLLM.
"""

from __future__ import annotations

from typing import Any

from vllm_massv.drafters.massv.config import is_massv_hf_config
from vllm_massv.drafters.msd.config import is_msd_hf_config


def draft_is_msd(speculative_config: Any) -> bool:
    """True when a vLLM `SpeculativeConfig`'s draft checkpoint is an MSD drafter (any method:
    a wrong method is refused by the pre-serving checks)."""
    draft = getattr(speculative_config, "draft_model_config", None)
    return draft is not None and is_msd_hf_config(draft.hf_config)


def draft_is_massv(speculative_config: Any) -> bool:
    """True when a vLLM `SpeculativeConfig` uses a MASSV drafter (method `draft_model`)."""
    if speculative_config is None or getattr(speculative_config, "method", None) != "draft_model":
        return False
    draft = getattr(speculative_config, "draft_model_config", None)
    return draft is not None and is_massv_hf_config(draft.hf_config)
