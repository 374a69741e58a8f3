"""Committed benchmark results name no local paths, and the writers keep it so
(`benchmarks/harness/paths.py::portable`, applied by throughput.py, proposer_cost.py and
serve_load.py before they write)."""

from __future__ import annotations

import re
from pathlib import Path

from benchmarks.harness.paths import REPO_ROOT, portable

#: absolute paths of a developer machine or CI runner (POSIX home / scratch / mount roots)
LOCAL_PATH = re.compile(r"(?<![\w.~])/(?:home|Users|work|tmp|root|mnt|private)/[\w.-]+")


def test_committed_results_have_no_local_paths() -> None:
    found = []
    for f in sorted((REPO_ROOT / "benchmarks" / "results").glob("*")):
        if f.suffix in (".md", ".json"):
            found += [f"{f.name}: {m.group(0)}" for m in LOCAL_PATH.finditer(f.read_text())]
    assert not found, found


def test_portable_rewrites_paths_under_root_and_home(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    home = str(Path.home())
    meta = {"target": str(root / ".cache" / "testbed" / "target-pad56"),
            "methods": [{"model": str(root / "benchmarks/testbed/models/drafter-massv")}],
            "command": f"python throughput.py --testbed {root}/benchmarks/testbed --out {root}",
            "cache": f"{home}/.cache/vllm-massv", "k": 4, "ratio": 0.5, "none": None,
            "pair": (str(root), "x")}
    out = portable(meta, root)
    assert out == {"target": ".cache/testbed/target-pad56",
                   "methods": [{"model": "benchmarks/testbed/models/drafter-massv"}],
                   "command": "python throughput.py --testbed benchmarks/testbed --out .",
                   "cache": "~/.cache/vllm-massv", "k": 4, "ratio": 0.5, "none": None,
                   "pair": [".", "x"]}
    assert meta["target"].startswith(str(root))  # the input is left as it was
    assert portable("/opt/models/Qwen2.5-VL-7B", root) == "/opt/models/Qwen2.5-VL-7B"
