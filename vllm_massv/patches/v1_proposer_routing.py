"""V1 model runner: which proposer class vLLM builds. `DraftModelProposer(...)` builds
`MassvDraftModelProposer` for MASSV drafters; `EagleProposer(...)` builds `MsdEagleProposer` for
MSD drafters and `EagleAbsolutePositionsProposer` for other EAGLE-path drafters without M-RoPE on
M-RoPE targets (unless the user opts out: `VLLM_MASSV_EAGLE_POSITION_FIX=0`). Every other config
gets vLLM's own class. The decisions are the functions `draft_model_proposer_kind` and
`eagle_proposer_kind` (engine-free, unit-tested). Routing happens in `__new__`, so the objects are subclasses of the stock classes and
the runner's `isinstance` checks keep holding (`vllm/v1/worker/gpu_model_runner.py` builds them).

The proposer modules are imported inside `__new__`: they import vLLM worker code, which the API
server never loads.
"""

from __future__ import annotations

from typing import Any, Literal

from vllm_massv import envs
from vllm_massv.patches.drafters import draft_is_massv, draft_is_msd
from vllm_massv.patches.hook import patches_class


def _vllm_config(args: tuple, kwargs: dict) -> Any:
    return kwargs.get("vllm_config", args[0] if args else None)


def needs_absolute_positions(vllm_config: Any) -> bool:
    """True for an `eagle`/`eagle3` drafter without M-RoPE serving an M-RoPE target (the
    configs stock vLLM's V1 EAGLE proposer gives wrong positions; `v1_eagle_positions.py`)."""
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is None or spec.method not in ("eagle", "eagle3") or spec.draft_model_config is None:
        return False
    return bool(vllm_config.model_config.uses_mrope) and not spec.draft_model_config.uses_mrope


def draft_model_proposer_kind(vllm_config: Any) -> Literal["massv"] | None:
    """What `DraftModelProposer(vllm_config, ...)` builds: "massv" (`MassvDraftModelProposer`)
    for a MASSV drafter, None (vLLM's own class) otherwise or with the test switch
    `VLLM_MASSV_TEST_STOCK_PROPOSER=1`."""
    spec = getattr(vllm_config, "speculative_config", None)
    return "massv" if draft_is_massv(spec) and not envs.test_stock_proposer() else None


def eagle_proposer_kind(vllm_config: Any) -> Literal["msd", "absolute_positions"] | None:
    """What `EagleProposer(vllm_config, ...)` builds: "msd" (`MsdEagleProposer`) for an MSD
    drafter; "absolute_positions" (`EagleAbsolutePositionsProposer`: the position fix and the
    CPU sampler fix) for another `eagle`/`eagle3` drafter without M-RoPE on an M-RoPE target,
    unless `VLLM_MASSV_EAGLE_POSITION_FIX=0`; None (vLLM's own class) otherwise."""
    if draft_is_msd(getattr(vllm_config, "speculative_config", None)):
        return "msd"
    if envs.eagle_position_fix() and needs_absolute_positions(vllm_config):
        return "absolute_positions"
    return None


@patches_class("DraftModelProposer")
def route_draft_model_proposer(cls: type) -> None:
    """`vllm.v1.spec_decode.draft_model.DraftModelProposer`: MASSV drafters get
    `MassvDraftModelProposer` (unless the `TEST_STOCK_PROPOSER` test switch is set)."""

    def __new__(klass, *args, **kwargs):
        if klass is cls:
            if draft_model_proposer_kind(_vllm_config(args, kwargs)) == "massv":
                from vllm_massv.drafters.massv.v1_proposer import MassvDraftModelProposer

                klass = MassvDraftModelProposer
        return object.__new__(klass)

    cls.__new__ = __new__


@patches_class("EagleProposer")
def route_eagle_proposer(cls: type) -> None:
    """`vllm.v1.spec_decode.eagle.EagleProposer`: MSD drafters get `MsdEagleProposer`; other
    `eagle`/`eagle3` drafters without M-RoPE on M-RoPE targets get
    `EagleAbsolutePositionsProposer` (the stock-bug fix of `v1_eagle_positions.py`; off with
    `VLLM_MASSV_EAGLE_POSITION_FIX=0`)."""

    def __new__(klass, *args, **kwargs):
        if klass is cls:
            kind = eagle_proposer_kind(_vllm_config(args, kwargs))
            if kind == "msd":
                from vllm_massv.drafters.msd.v1_proposer import MsdEagleProposer

                klass = MsdEagleProposer
            elif kind == "absolute_positions":
                from vllm_massv.patches.v1_eagle_positions import EagleAbsolutePositionsProposer

                klass = EagleAbsolutePositionsProposer
        return object.__new__(klass)

    cls.__new__ = __new__
