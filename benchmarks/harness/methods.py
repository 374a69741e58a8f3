"""Ways of decoding a benchmark compares: :class:`Method` (``LABEL=SPEC`` on the command line),
vLLM's batch-size schedule for k (:func:`parse_schedule`) and the testbed's methods.

A method's :meth:`Method.speculative_config` is the ``speculative_config`` vLLM gets; its
:meth:`Method.engine_env` the environment its engine must start with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_massv import envs, methods

#: Label suffix of a ``--k-by-batch`` method.
SCHEDULE_SUFFIX = " (k by batch size)"
#: Method kinds (:meth:`Method.parse`): no speculation, vLLM's n-gram and stock draft model, every
#: drafter method of `vllm_massv.methods`, and an EAGLE-3 head with stock vLLM's positions.
KINDS = ("none", "ngram", "draft_model", *methods.METHODS, "eagle3-stock")


@dataclass(frozen=True)
class Method:
    """One way of decoding: ``kind`` is one of :data:`KINDS`."""

    label: str
    kind: str
    model: str | None = None
    #: vLLM's ``num_speculative_tokens_per_batch_size``: (first batch size, last, k) ranges
    schedule: tuple[tuple[int, int, int], ...] | None = None

    def k_at(self, batch_size: int, k: int) -> int:
        """The k this method drafts at ``batch_size`` (``k`` without a schedule)."""
        if self.schedule is None:
            return k
        return next((kk for lo, hi, kk in self.schedule if lo <= batch_size <= hi),
                    self.schedule[-1][2])

    @classmethod
    def parse(cls, text: str) -> Method:
        """``LABEL=none``, ``LABEL=ngram``, ``LABEL=draft_model:PATH``, ``LABEL=massv:PATH``,
        ``LABEL=msd:PATH``, ``LABEL=eagle3:PATH`` or ``LABEL=eagle3-stock:PATH``.

        Raises:
            ValueError: malformed text or unknown kind.
        """
        label, sep, spec = text.partition("=")
        if not sep or not label:
            raise ValueError(f"--method {text!r}: expected LABEL=SPEC")
        kind, _, model = spec.partition(":")
        if kind in ("none", "ngram"):
            if model:
                raise ValueError(f"--method {text!r}: {kind} takes no model")
            return cls(label, kind)
        if kind in KINDS:
            if not model:
                raise ValueError(f"--method {text!r}: {kind} needs a model path")
            return cls(label, kind, model)
        raise ValueError(f"--method {text!r}: kind must be one of {', '.join(KINDS)}")

    def speculative_config(self, k: int) -> dict[str, Any] | None:
        """vLLM's ``speculative_config`` for ``k`` speculative tokens (None: no speculation);
        with a schedule, k is its largest k and the schedule is added.

        Raises:
            ValueError: the model folder is not of the method's kind (massv/msd block, EAGLE-3
                config).
        """
        spec = self._speculative_config(k)
        if spec is not None and self.schedule is not None:
            spec["num_speculative_tokens"] = max(kk for _, _, kk in self.schedule)
            spec["num_speculative_tokens_per_batch_size"] = [list(e) for e in self.schedule]
        return spec

    def _speculative_config(self, k: int) -> dict[str, Any] | None:
        if self.kind == "none":
            return None
        if self.kind == "ngram":
            return {"method": "ngram", "num_speculative_tokens": k,
                    "prompt_lookup_min": 2, "prompt_lookup_max": 5}
        if self.kind == "draft_model":  # a stock draft model goes through vLLM unchanged
            return {"method": "draft_model", "model": self.model, "num_speculative_tokens": k}
        method = methods.get("eagle3" if self.kind == "eagle3-stock" else self.kind)
        # the plugin recognises its drafters by their config block; check it is there
        if method.config_block is not None:
            block = methods.resolve(method.config_block)
            _require_block(self.model, block.block_key, block.drafter_kind)
        else:
            _require_eagle3(self.model)
        return {"method": method.vllm_method, "model": self.model, "num_speculative_tokens": k}

    def engine_env(self) -> dict[str, str]:
        """Environment variables the engine of this method must start with (read by the
        proposer's ``__init__`` in the engine-core process): EAGLE-path methods set the
        stock-positions test switch (`vllm_massv.envs.TEST_STOCK_EAGLE_POSITIONS`) explicitly,
        on for ``eagle3-stock`` and off otherwise, and keep the plugin's EAGLE proposer on
        (`vllm_massv.envs.EAGLE_POSITION_FIX`), so a variable left in the shell cannot relabel
        them."""
        if self.kind in ("msd", "eagle3", "eagle3-stock"):
            return {envs.TEST_STOCK_EAGLE_POSITIONS: "1" if self.kind == "eagle3-stock" else "0",
                    envs.EAGLE_POSITION_FIX: "1"}
        return {}


def parse_schedule(text: str) -> tuple[tuple[int, int, int], ...]:
    """``"1-1:6,2-8:4,9-256:3"`` -> ((1, 1, 6), (2, 8, 4), (9, 256, 3)): batch sizes 1 to 1 draft
    6 tokens, 2 to 8 draft 4, and so on (vLLM's ``num_speculative_tokens_per_batch_size``; k = 0
    turns speculation off for that range).

    Raises:
        ValueError: malformed text, or a schedule vLLM would refuse (ranges must start at 1,
            not overlap, k >= 0; the rule of ``vllm/v1/spec_decode/dynamic/utils.py``), checked
            here so a bad schedule fails before any engine starts.
    """
    entries = []
    for part in text.split(","):
        rng, sep, k = part.strip().partition(":")
        lo, dash, hi = rng.partition("-")
        try:
            if not sep or not dash:
                raise ValueError
            entries.append((int(lo), int(hi), int(k)))
        except ValueError:
            raise ValueError(f"k schedule {text!r}: expected FIRST-LAST:K[,FIRST-LAST:K...], "
                             "e.g. 1-1:6,2-8:4,9-256:3") from None
    entries.sort()
    if entries[0][0] != 1:
        raise ValueError(f"k schedule {text!r}: the first range must start at batch size 1")
    prev_end = 0
    for lo, hi, k in entries:
        if lo > hi or lo <= prev_end or k < 0:
            raise ValueError(f"k schedule {text!r}: ranges must be increasing, not overlap, "
                             f"and k >= 0 (got {lo}-{hi}:{k})")
        prev_end = hi
    if max(k for _, _, k in entries) < 1:
        raise ValueError(f"k schedule {text!r}: some range must draft (k >= 1)")
    return tuple(entries)


def _require_block(model: str | None, key: str, what: str) -> None:
    config = Path(str(model)) / "config.json"
    if config.is_file() and key not in json.loads(config.read_text()):
        raise ValueError(f"{model} has no `{key}` block in config.json: not {what} "
                         "(use draft_model:PATH for a stock draft model)")


def _require_eagle3(model: str | None) -> None:
    """A local ``model`` folder must hold an EAGLE-3 head: ``speculators_model_type: "eagle3"``
    (speculators format, what ``massv init --method eagle3`` writes) or an ``Eagle3*``
    architecture (vLLM's native layout, e.g. ``Eagle3LlamaForCausalLM``). Hub ids pass through.

    Raises:
        ValueError: a local folder without config.json, or whose config is not EAGLE-3.
    """
    path = Path(str(model))
    if not path.exists():
        return
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"{model} has no config.json: not an EAGLE-3 head")
    cfg = json.loads(config.read_text())
    if cfg.get("speculators_model_type") == "eagle3" or any(
            "eagle3" in a.lower() for a in cfg.get("architectures") or []):
        return
    raise ValueError(f"{model} is not an EAGLE-3 head: config.json has speculators_model_type "
                     f"{cfg.get('speculators_model_type')!r} and architectures "
                     f"{cfg.get('architectures')} (expected speculators_model_type 'eagle3', "
                     "e.g. from `massv init --method eagle3`)")


def testbed_methods(paths: dict[str, Path]) -> list[Method]:
    """The testbed's methods (:func:`benchmarks.testbed.assets.ensure` paths)."""
    models = paths["models"]
    methods = [Method("none", "none"), Method("ngram", "ngram"),
               Method("blind (stock draft_model)", "draft_model", str(paths["blind-stock"])),
               Method("blind (projector none)", "massv", str(paths["drafter-blind"])),
               Method("blind distilled (no image)", "massv", str(models / "drafter-distilled"))]
    if (models / "drafter-phase1").is_dir():
        methods.append(Method("MASSV phase 1", "massv", str(models / "drafter-phase1")))
    methods.append(Method("MASSV", "massv", str(models / "drafter-massv")))
    if (models / "drafter-massv-main").is_dir():   # the Qwen3-VL testbed's other projector input
        methods.append(Method("MASSV (main embedding only)", "massv",
                              str(models / "drafter-massv-main")))
    if (models / "drafter-massv-mrope").is_dir():
        methods.append(Method("MASSV (M-RoPE positions)", "massv",
                              str(models / "drafter-massv-mrope")))
    if (models / "drafter-msd").is_dir():
        methods.append(Method("MSD", "msd", str(models / "drafter-msd")))
    if (models / "drafter-eagle3").is_dir():
        methods += [Method("EAGLE-3", "eagle3", str(models / "drafter-eagle3")),
                    Method("EAGLE-3 (stock vLLM positions)", "eagle3-stock",
                           str(models / "drafter-eagle3"))]
    return methods
