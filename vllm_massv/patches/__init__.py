"""Everything that changes stock vLLM, one file per concern. `surface.PATCH_SURFACE` lists every
private vLLM symbol the plugin (this package, the proposers, the vLLM drafter models) relies on,
and a test checks it against each supported vLLM series.

Every change is gated on a drafter of this project (`drafters.py`), except the
`--speculative-config FILE` parser (`cli_args.py`) and the EAGLE position fix
(`v1_eagle_positions.py`, a stock bug). Files named `v1_*` attach to vLLM's V1 model runner.
The design, symbol by symbol: docs/design/vllm-integration.md.

The modules are patched right after they are first imported (`hook.py`), so the API-server
process never imports vLLM's worker modules just for the plugin.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vllm_massv.patches import (cli_args, engine_config, one_arg_serving, v1_cpu_sampler,
                                v1_proposer_routing)
from vllm_massv.patches.hook import install_hook
from vllm_massv.patches.surface import check_vllm_version

#: vLLM module -> the patch run right after it is imported.
PATCHES: dict[str, Callable[[Any], None]] = {
    "vllm.engine.arg_utils": cli_args.accept_json_file,
    "vllm.v1.spec_decode.draft_model": v1_proposer_routing.route_draft_model_proposer,
    "vllm.v1.spec_decode.eagle": v1_proposer_routing.route_eagle_proposer,
    "vllm.config.vllm": engine_config.apply_engine_policy,
    "vllm.config.speculative": engine_config.check_pairing,
    "vllm.v1.sample.rejection_sampler": v1_cpu_sampler.fix_if_asked,
    "vllm.transformers_utils.configs.speculators.algos": one_arg_serving.register_speculators,
    "vllm.transformers_utils.configs.speculators.base": one_arg_serving.map_speculators_config,
}


def install() -> None:
    """Install all patches (idempotent; safe to call in every vLLM process).

    Raises:
        UnsupportedVllmVersionError: vLLM is missing or not a supported series.
    """
    check_vllm_version()
    install_hook(PATCHES)
