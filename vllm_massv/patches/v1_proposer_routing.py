"""V1 model runner: which proposer class vLLM builds. `DraftModelProposer(...)` builds
`MassvDraftModelProposer` for MASSV drafters; `EagleProposer(...)` builds `MsdEagleProposer` for
MSD drafters and `EagleAbsolutePositionsProposer` for other EAGLE-path drafters without M-RoPE on
M-RoPE targets. Routing happens in `__new__`, so the objects are subclasses of the stock classes and
the runner's `isinstance` checks keep holding (`vllm/v1/worker/gpu_model_runner.py` builds them).

The proposer modules are imported inside `__new__`: they import vLLM worker code, which the API
server never loads.
"""

from __future__ import annotations

from typing import Any

from vllm_massv import envs
from vllm_massv.patches.drafters import draft_is_massv, draft_is_msd
from vllm_massv.patches.hook import patches_class


def _vllm_config(args: tuple, kwargs: dict) -> Any:
    return kwargs.get("vllm_config", args[0] if args else None)


@patches_class("DraftModelProposer")
def route_draft_model_proposer(cls: type) -> None:
    """`vllm.v1.spec_decode.draft_model.DraftModelProposer`: MASSV drafters get
    `MassvDraftModelProposer` (unless the `TEST_STOCK_PROPOSER` test switch is set)."""

    def __new__(klass, *args, **kwargs):
        if klass is cls:
            spec = getattr(_vllm_config(args, kwargs), "speculative_config", None)
            if draft_is_massv(spec) and not envs.test_stock_proposer():
                from vllm_massv.drafters.massv.v1_proposer import MassvDraftModelProposer

                klass = MassvDraftModelProposer
        return object.__new__(klass)

    cls.__new__ = __new__


@patches_class("EagleProposer")
def route_eagle_proposer(cls: type) -> None:
    """`vllm.v1.spec_decode.eagle.EagleProposer`: MSD drafters get `MsdEagleProposer`; other
    `eagle`/`eagle3` drafters without M-RoPE on M-RoPE targets get
    `EagleAbsolutePositionsProposer` (the stock-bug fix of `v1_eagle_positions.py`)."""

    def __new__(klass, *args, **kwargs):
        if klass is cls:
            vllm_config = _vllm_config(args, kwargs)
            if draft_is_msd(getattr(vllm_config, "speculative_config", None)):
                from vllm_massv.drafters.msd.v1_proposer import MsdEagleProposer

                klass = MsdEagleProposer
            else:
                from vllm_massv.patches.v1_eagle_positions import (
                    EagleAbsolutePositionsProposer, needs_absolute_positions)

                if needs_absolute_positions(vllm_config):
                    klass = EagleAbsolutePositionsProposer
        return object.__new__(klass)

    cls.__new__ = __new__
