"""Everything that changes stock vLLM, one file per concern. `surface.PATCH_SURFACE` lists every
private vLLM symbol the plugin (this package, the proposers, the vLLM drafter models) relies on,
and a test checks it against each supported vLLM series.

Every change is gated on a drafter of this project (`drafters.py`), except the
`--speculative-config FILE` parser (`cli_args.py`), the EAGLE position fix
(`v1_eagle_positions.py`, a stock bug; opt-out `VLLM_MASSV_EAGLE_POSITION_FIX=0`) and the
opt-in CPU sampler fix for every engine (`VLLM_MASSV_FIX_CPU_SAMPLER=1`). The full list, tested
per config: README ("Which configs it changes, exactly"), `tests/unit/test_stock_scope.py`. Files named `v1_*` attach to vLLM's V1 model runner and
are installed only on the series that have it (0.32, 0.33); `mrv2_*` to Model Runner V2.
The design, symbol by symbol: docs/design/vllm-integration.md.

The modules are patched right after they are first imported (`hook.py`), so the API-server
process never imports vLLM's worker modules just for the plugin.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vllm_massv.patches import (cli_args, engine_config, mrv2_speculator_routing,
                                one_arg_serving, v1_cpu_sampler, v1_proposer_routing)
from vllm_massv.patches.hook import install_hook
from vllm_massv.patches.surface import check_vllm_version

#: vLLM module -> the patch run right after it is imported: every series, both runners.
COMMON_PATCHES: dict[str, Callable[[Any], None]] = {
    "vllm.engine.arg_utils": cli_args.accept_json_file,
    "vllm.config.vllm": engine_config.apply_engine_policy,
    "vllm.config.speculative": engine_config.check_pairing,
    "vllm.transformers_utils.configs.speculators.algos": one_arg_serving.register_speculators,
    "vllm.transformers_utils.configs.speculators.base": one_arg_serving.map_speculators_config,
}
#: The V1 model runner's proposers and sampler (vLLM 0.32/0.33; 0.34 deleted them).
V1_PATCHES: dict[str, Callable[[Any], None]] = {
    "vllm.v1.spec_decode.draft_model": v1_proposer_routing.route_draft_model_proposer,
    "vllm.v1.spec_decode.eagle": v1_proposer_routing.route_eagle_proposer,
    "vllm.v1.sample.rejection_sampler": v1_cpu_sampler.fix_if_asked,
}
#: Model Runner V2 on vLLM 0.32/0.33, which has no speculator extension point (0.34 builds the
#: MASSV speculator from the drafter's `speculator_config_class`, no patch).
MRV2_ROUTING_PATCHES: dict[str, Callable[[Any], None]] = {
    "vllm.v1.worker.gpu.spec_decode.standalone_ar.speculator":
        mrv2_speculator_routing.route_standalone_ar_speculator,
}


def patches_for(version: str) -> dict[str, Callable[[Any], None]]:
    """The patch table for a vLLM version (a supported one: see `check_vllm_version`)."""
    if version.startswith(("0.32.", "0.33.")):
        return {**COMMON_PATCHES, **V1_PATCHES, **MRV2_ROUTING_PATCHES}
    return dict(COMMON_PATCHES)


def install() -> None:
    """Install the patches of the installed vLLM's series (idempotent; safe to call in every
    vLLM process).

    Raises:
        UnsupportedVllmVersionError: vLLM is missing or not a supported series.
    """
    install_hook(patches_for(check_vllm_version()))
