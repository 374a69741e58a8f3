"""Model Runner V2 on vLLM 0.32/0.33: `StandaloneARSpeculator(...)` builds
`MassvStandaloneARSpeculator` for MASSV drafters.

MRV2's `init_speculator` (`vllm/v1/worker/gpu/spec_decode/__init__.py`) picks the speculator by
method name in these series, with no extension point, so routing happens in `__new__` (as for the
V1 proposers, `v1_proposer_routing.py`): the object is a subclass of the stock class and every
`isinstance` check holds. vLLM 0.34 builds the MASSV speculator itself from the drafter's
`speculator_config_class` (`vllm_massv/drafters/massv/mrv2_config.py`), and this patch is not
installed there.
"""

from __future__ import annotations

from vllm_massv import envs
from vllm_massv.patches.drafters import draft_is_massv
from vllm_massv.patches.hook import patches_class


@patches_class("StandaloneARSpeculator")
def route_standalone_ar_speculator(cls: type) -> None:
    """`vllm.v1.worker.gpu.spec_decode.standalone_ar.speculator.StandaloneARSpeculator`: MASSV
    drafters get `MassvStandaloneARSpeculator` (unless the `TEST_STOCK_PROPOSER` test switch
    is set)."""

    def __new__(klass, *args, **kwargs):
        if klass is cls:
            vllm_config = kwargs.get("vllm_config", args[0] if args else None)
            spec = getattr(vllm_config, "speculative_config", None)
            if draft_is_massv(spec) and not envs.test_stock_proposer():
                from vllm_massv.drafters.massv.mrv2_speculator import (
                    MassvStandaloneARSpeculator)

                klass = MassvStandaloneARSpeculator
        return object.__new__(klass)

    cls.__new__ = __new__
