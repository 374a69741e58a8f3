"""The one registry of drafter methods. The plugin's `register()`, the `massv` CLI, the trainer,
the speculators mapping and the benchmarks read it; adding a method means adding its folder under
`vllm_massv/drafters/` and one entry here.

A leaf module: entries name their code as "module:attribute" strings, resolved on use
(:func:`resolve`), so reading the table imports neither vLLM nor torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DrafterMethod:
    """One drafter method and where its pieces live."""

    #: `massv init/train --method` value and the folder name under `vllm_massv/drafters/`.
    name: str
    #: vLLM's speculative-decoding method that serves it (`--speculative-config` "method").
    vllm_method: str
    #: "module:Class" of its pydantic `config.json` block (`DrafterBlock`), or None when the
    #: checkpoint follows a stock vLLM format (EAGLE-3: speculators `eagle3`).
    config_block: str | None
    #: `speculators_model_type` of its one-argument checkpoints that the plugin serves, or None
    #: when vLLM serves the type natively.
    speculators_type: str | None
    #: vLLM drafter architectures the plugin registers: name -> "module:Class".
    vllm_architectures: dict[str, str] = field(default_factory=dict)
    #: "module:function" that builds an untrained drafter from `massv init`'s arguments and
    #: returns the text the CLI prints.
    init: str = ""
    #: "module:function" that builds the method's training setup (`vllm_massv.training`).
    train_setup: str = ""


_D = "vllm_massv.drafters"

METHODS: dict[str, DrafterMethod] = {m.name: m for m in (
    DrafterMethod(
        name="massv", vllm_method="draft_model",
        config_block=f"{_D}.massv.config:MassvConfig", speculators_type="massv",
        vllm_architectures={
            "MassvQwen2ForCausalLM": f"{_D}.massv.vllm_model:MassvQwen2ForCausalLM",
            "MassvGemma3ForCausalLM": f"{_D}.massv.vllm_model:MassvGemma3ForCausalLM",
            "MassvQwen3ForCausalLM": f"{_D}.massv.vllm_model:MassvQwen3ForCausalLM",
        },
        init=f"{_D}.massv.init:init_from_args", train_setup=f"{_D}.massv.train:setup"),
    DrafterMethod(
        name="msd", vllm_method="eagle",
        config_block=f"{_D}.msd.config:MsdConfig", speculators_type="msd",
        vllm_architectures={
            "EagleMsdQwen2ForCausalLM": f"{_D}.msd.vllm_model:EagleMsdQwen2ForCausalLM",
        },
        init=f"{_D}.msd.init:init_from_args", train_setup=f"{_D}.msd.train:setup"),
    DrafterMethod(
        name="eagle3", vllm_method="eagle3", config_block=None, speculators_type=None,
        init=f"{_D}.eagle3.init:init_from_args", train_setup=f"{_D}.eagle3.train:setup"),
)}


def get(name: str) -> DrafterMethod:
    """The method called `name`.

    Raises:
        ValueError: no such method (the message lists them).
    """
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown drafter method {name!r}; one of {', '.join(METHODS)}") from None


def resolve(ref: str) -> Any:
    """The object a "module:attribute" string names (imports the module)."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def vllm_architectures() -> dict[str, str]:
    """Every vLLM drafter architecture the plugin registers: name -> "module:Class"."""
    return {a: ref for m in METHODS.values() for a, ref in m.vllm_architectures.items()}
