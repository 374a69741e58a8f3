"""One-argument serving, `vllm serve <drafter-dir>`, for drafters in the speculators format
(`vllm_massv.speculators`): vLLM's speculators registry
(`vllm/transformers_utils/configs/speculators/algos.py`, `register_speculator`) gets an entry per
speculators type of this project ("massv", "msd"), and
`SpeculatorsConfig.extract_vllm_speculative_config` (`.../speculators/base.py`, called by
`transformers_utils/config.py::maybe_override_with_speculators` from
`EngineArgs.create_engine_config`) maps them to their vLLM method at the checkpoint's k, after
checking the verifier. Other speculators types go to the stock code unchanged.
"""

from __future__ import annotations

from typing import Any

from vllm_massv.patches.hook import patches_class
from vllm_massv.speculators import SPECULATORS_TYPES, update_massv, vllm_speculative_config


def register_speculators(module: Any) -> None:
    """Post-import patch of `...speculators.algos`: register this project's speculators types."""
    for name in SPECULATORS_TYPES:
        module.register_speculator(name)(update_massv)


@patches_class("SpeculatorsConfig")
def map_speculators_config(cls: type) -> None:
    """`...speculators.base.SpeculatorsConfig.extract_vllm_speculative_config`: this project's
    types through :func:`vllm_massv.speculators.vllm_speculative_config`."""
    stock = cls.extract_vllm_speculative_config.__func__

    def extract_vllm_speculative_config(klass, config_dict: dict[str, Any]) -> dict[str, Any]:
        if config_dict.get("speculators_model_type") in SPECULATORS_TYPES:
            return vllm_speculative_config(config_dict)
        return stock(klass, config_dict)

    cls.extract_vllm_speculative_config = classmethod(extract_vllm_speculative_config)
