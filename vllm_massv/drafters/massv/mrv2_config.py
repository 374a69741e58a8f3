"""vLLM >= 0.34: the speculator config a MASSV drafter declares, so that vLLM itself builds the
MASSV speculator on Model Runner V2 (no routing patch).

vLLM 0.34 reads `speculator_config_class` from the draft model class
(`vllm/model_executor/models/interfaces.py::SpeculativeDraftModel`, recorded by the model
registry) and uses it when it subclasses the method's config
(`vllm/v1/worker/gpu/spec_decode/speculator_config.py::get_speculator_config_class`); users keep
`method: "draft_model"`. vLLM 0.32/0.33 have no such config class: :data:`MASSV_SPECULATOR_CONFIG`
is None there and `vllm_massv/patches/mrv2_speculator_routing.py` routes instead.

Like vLLM's own config modules this imports no speculator code (it is imported in every process,
the API server included). Read in the 0.34 wheel's source; never run (no vLLM 0.34 here).
"""

from __future__ import annotations

from typing import Any

try:
    from vllm.v1.worker.gpu.spec_decode.standalone_ar.config import (
        StandaloneARSpeculatorConfig,
    )
except ImportError:  # vLLM 0.32/0.33: no speculator configs
    StandaloneARSpeculatorConfig = None  # type: ignore[assignment,misc]

MASSV_SPECULATOR_CLASS = (
    "vllm_massv.drafters.massv.mrv2_speculator.MassvStandaloneARSpeculator")

MASSV_SPECULATOR_CONFIG: Any = None
if StandaloneARSpeculatorConfig is not None:

    class MassvSpeculatorConfig(StandaloneARSpeculatorConfig):
        """vLLM's `draft_model` speculator config with the MASSV speculator class."""

        speculator_class = MASSV_SPECULATOR_CLASS

    MASSV_SPECULATOR_CONFIG = MassvSpeculatorConfig
