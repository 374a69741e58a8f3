"""One-argument serving: a MASSV or MSD drafter's `config.json` in the speculators format, a
top-level `speculators_model_type` ("massv" or "msd") and a `speculators_config` block (k, the
verifier) next to the drafter's own block. `massv init` and `massv train` write it
(:func:`speculators_fields`); the plugin maps it to vLLM's speculative config
(:func:`vllm_speculative_config`, via `vllm_massv/patches/one_arg_serving.py`). Format and flow:
docs/design/vllm-integration.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vllm_massv import methods
from vllm_massv.checkpoint import DrafterBlock
from vllm_massv.drafters.massv.config import MassvConfigError

#: speculators_model_type -> (the drafter's block key, its pydantic class, vLLM's method), for
#: every method of `vllm_massv.methods` whose one-argument checkpoints the plugin serves.
SPECULATORS_TYPES: dict[str, tuple[str, type[DrafterBlock], str]] = {
    m.speculators_type: (block.block_key, block, m.vllm_method)
    for m in methods.METHODS.values() if m.speculators_type
    for block in [methods.resolve(m.config_block)]
}
DEFAULT_NUM_SPECULATIVE_TOKENS = 4
#: The top-level config.json keys of the speculators format (drop them to serve a drafter as a
#: plain model: vLLM turns a config with them into "serve the verifier with this drafter").
SPECULATORS_KEYS = ("speculators_model_type", "speculators_config", "speculators_version")


def serve_hint(out_dir: Any, target: str, method: str, k: int) -> str:
    """The two ways to serve a freshly built drafter (one argument; target + speculative
    config), as `massv init` prints them."""
    return (f"Serve: vllm serve {out_dir}   (serves {target}, method {method}, k = {k})\n"
            f"   or: vllm serve {target} --speculative-config '{{\"method\": \"{method}\", "
            f"\"model\": \"{out_dir}\", \"num_speculative_tokens\": {k}}}'")


def _type_of(block: DrafterBlock) -> str:
    return next(t for t, (_, cls, _) in SPECULATORS_TYPES.items() if isinstance(block, cls))


def speculators_fields(block: DrafterBlock, num_speculative_tokens: int,
                       verifier: str | None = None) -> dict[str, Any]:
    """The top-level `config.json` keys that make a MASSV or MSD drafter servable with one
    argument (`speculators_model_type` "massv" or "msd", from the block's type).

    Args:
        block: the drafter's `massv` or `msd` block; its `target` / `target_architecture` name
            the verifier unless `verifier` is given.
        num_speculative_tokens: k the checkpoint is served with (>= 1).
        verifier: name or path of the target (default: `block.target`).
    Raises:
        MassvConfigError: k < 1, or no verifier name.
    """
    model_type = _type_of(block)
    key = SPECULATORS_TYPES[model_type][0]
    if num_speculative_tokens < 1:
        raise MassvConfigError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
    name = verifier if verifier is not None else block.target
    if not name:
        raise MassvConfigError(f"the drafter names no target ({key}.target is empty); "
                               "pass the target's name or path")
    return {
        "speculators_model_type": model_type,
        "speculators_config": {
            "algorithm": model_type,
            "proposal_methods": [{"proposal_type": "greedy",
                                  "speculative_tokens": int(num_speculative_tokens)}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": str(name),
                         "architectures": [a for a in [block.target_architecture] if a]},
        },
    }


def checkpoint_num_speculative_tokens(config_dict: dict[str, Any]) -> int | None:
    """k of a drafter `config.json` dict with a speculators block, else None."""
    try:
        return int(config_dict["speculators_config"]["proposal_methods"][0]["speculative_tokens"])
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _verifier_config(name_or_path: str) -> dict[str, Any]:
    """The verifier's `config.json` as a dict (local directory or hub name).

    Raises:
        MassvConfigError: it cannot be found or read.
    """
    import huggingface_hub
    from transformers import PretrainedConfig

    try:
        config_dict, _ = PretrainedConfig.get_config_dict(
            name_or_path, local_files_only=huggingface_hub.constants.HF_HUB_OFFLINE)
    except (OSError, ValueError) as e:
        where = (f"{Path(name_or_path).resolve()} (relative paths are read from the current "
                 "directory)" if not os.path.isabs(name_or_path) else name_or_path)
        raise MassvConfigError(
            f"the verifier (target) named by this drafter, {name_or_path!r} "
            f"(speculators_config.verifier.name_or_path), cannot be found: no config.json at "
            f"{where} and no such hub model ({type(e).__name__}). Run `vllm serve` from the "
            "directory the path is relative to, fix the path in the drafter's config.json (and "
            "massv.target or msd.target), or serve with two arguments: `vllm serve TARGET "
            "--speculative-config SPEC.json`.") from e
    return config_dict


def vllm_speculative_config(config_dict: dict[str, Any]) -> dict[str, Any]:
    """vLLM's speculative config for a MASSV or MSD drafter `config.json` in the speculators
    format.

    The drop-in for `SpeculatorsConfig.extract_vllm_speculative_config`
    (`vllm/transformers_utils/configs/speculators/base.py`) when `speculators_model_type` is
    "massv" or "msd". Checks that the drafter's block (`massv` / `msd`) is valid, that the
    verifier is the block's `target` (same name, or the same directory) with the architecture
    recorded in its `target_architecture`, and that the verifier's `config.json` can be read and
    names that architecture. The full pairing checks (`drafters/massv/config.py::validate_pair`,
    `drafters/msd/config.py::validate`) run later, while vLLM builds the speculative config.

    Returns:
        `{"method": "draft_model" (MASSV) or "eagle" (MSD), "num_speculative_tokens": k}`;
        vLLM adds `model` (the drafter directory) and the user's `--speculative-config` fields.
    Raises:
        MassvConfigError: a malformed block, a verifier that cannot be found, or one that does
            not match the block's `target`. (An invalid `msd` block raises `MsdConfigError`;
            both are `ValueError`s.)
        KeyError: `speculators_model_type` is not "massv" or "msd".
    """
    key, block_cls, method = SPECULATORS_TYPES[config_dict["speculators_model_type"]]
    block = block_cls.from_hf_config(config_dict)
    spec = config_dict.get("speculators_config")
    k = checkpoint_num_speculative_tokens(config_dict)
    try:
        verifier = spec["verifier"]
        name = verifier["name_or_path"]
        archs = list(verifier.get("architectures") or [])
    except (KeyError, TypeError) as e:
        raise MassvConfigError(
            "invalid speculators_config in the drafter's config.json: it needs "
            "verifier.name_or_path (rewrite it with `massv init` or `massv train`)") from e
    target = f"{key}.target"
    if k is None or k < 1:
        raise MassvConfigError(
            "invalid speculators_config in the drafter's config.json: proposal_methods[0]."
            "speculative_tokens must be an integer >= 1")
    if not isinstance(name, str) or not name:
        raise MassvConfigError("speculators_config.verifier.name_or_path is empty; set it to "
                               "the target the drafter was trained for")
    if block.target and not _same_model(name, block.target):
        raise MassvConfigError(
            f"the drafter's verifier {name!r} (speculators_config.verifier.name_or_path) is not "
            f"the target it was built for, {target}={block.target!r}. Edit both to the "
            "target's current location if it moved; a different target needs its own drafter.")
    if block.target_architecture and archs and block.target_architecture not in archs:
        raise MassvConfigError(
            f"speculators_config.verifier.architectures={archs} does not include "
            f"{key}.target_architecture={block.target_architecture!r}")
    found = list(_verifier_config(name).get("architectures") or [])
    expected = archs or [a for a in [block.target_architecture] if a]
    if expected and found and not set(expected) & set(found):
        raise MassvConfigError(
            f"the verifier {name!r} is a {','.join(found)} model; this drafter was built for "
            f"{','.join(expected)} ({block.target}).")
    return {"method": method, "num_speculative_tokens": k}


def update_massv(config_dict: dict[str, Any], pre_trained_config: dict[str, Any]) -> None:
    """The MASSV and MSD entry of vLLM's speculators registry (`register_speculator("massv")`
    and `("msd")`, `vllm/transformers_utils/configs/speculators/algos.py`).

    vLLM calls it to build the drafter's transformers config when a `config.json` has
    `speculators_config` but no `model_type`; a MASSV (MSD) drafter's config is the LM's
    (the Qwen2 decoder layer's) own config,
    so every non-speculators key is kept as is (a `transformer_layer_config`, if present, wins).
    """
    for key, value in config_dict.items():
        if key not in SPECULATORS_KEYS and key != "transformer_layer_config":
            pre_trained_config.setdefault(key, value)
