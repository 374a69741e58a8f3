"""The plugin's vLLM patch surface against the signatures recorded per vLLM series.

The plugin's vLLM patch surface (`vllm_massv.patches.PATCH_SURFACE`) against the signatures
recorded per supported vLLM series (`vllm_massv/patch_surface.json`).

* the installed vLLM matches its series' record, symbol by symbol;
* the comparison names each kind of difference (changed signature, changed body, missing
  symbol, unrecorded symbol), on an edited copy of the installed source;
* (slow) vLLM 0.33.0's source, read from its wheel without installing it, matches the 0.33
  record. It downloads the CUDA wheel once (about 340 MB, 3 s at 260 MB/s here) into
  $MASSV_WHEEL_CACHE (default ~/.cache/vllm-massv/wheels); it skips only when the package
  registry cannot be reached.
"""

from __future__ import annotations

import pytest

from vllm_massv.patches import surface_check as ps
from vllm_massv.patches.surface import PATCH_SURFACE, SUPPORTED_VLLM_SERIES


def test_every_supported_series_records_every_symbol() -> None:
    record = ps.load_record()
    assert sorted(record) == sorted(s.rstrip(".") for s in SUPPORTED_VLLM_SERIES)
    for series, entry in record.items():
        assert list(entry["symbols"]) == list(PATCH_SURFACE), (
            f"series {series}: record out of date with PATCH_SURFACE; run "
            "`python -m vllm_massv.patches.surface_check record` (and `record --vllm X`)")
        missing = [s for s, d in entry["symbols"].items() if d["kind"] == "missing"]
        assert not missing, f"series {series} lacks {missing}"


def test_installed_vllm_matches_its_series() -> None:
    source = ps.VllmSource.installed()
    series, diffs = ps.check(source)
    assert not diffs, f"installed vLLM {source.version} vs recorded {series}:\n" + "\n".join(diffs)


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
def test_vllm_033_source_matches_record() -> None:
    try:
        wheel = ps.download_wheel("0.33.0")
    except RuntimeError as e:
        if any(s in str(e) for s in _UNREACHABLE):
            pytest.skip("package registry unreachable (no index lists vllm), vLLM 0.33.0 not "
                        f"checked: {str(e)[-300:]}")
        raise
    source = ps.VllmSource.wheel(wheel)
    assert source.version == "0.33.0"
    series, diffs = ps.check(source)
    assert series == "0.33"
    assert not diffs, "vLLM 0.33.0 source vs recorded 0.33:\n" + "\n".join(diffs)
