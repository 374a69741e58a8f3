"""Paths in written results: repository-relative, never this machine's absolute paths.

Result files (`benchmarks/results/`) are committed and read on other machines; a path like
`/home/me/vllm-massv/.cache/testbed/target-pad56` says nothing there and leaks the local layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: The repository root (benchmarks/harness/paths.py -> two levels up).
REPO_ROOT = Path(__file__).resolve().parents[2]


def portable(obj: Any, root: Path = REPO_ROOT) -> Any:
    """`obj` with every string that names a path under `root` (or the user's home) rewritten:
    `root/x/y` -> `x/y`, `~/x` for the home directory; also inside longer strings (command
    lines). Dicts, lists and tuples are rewritten recursively (tuples become lists, as in JSON);
    other values are returned unchanged.

    Args:
        obj: a JSON-like value (dict / list / tuple / str / number / None / bool).
        root: the directory paths are made relative to (default: the repository root).
    Returns:
        The rewritten value (a new container; `obj` is not modified).
    """
    if isinstance(obj, dict):
        return {k: portable(v, root) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v, root) for v in obj]
    if isinstance(obj, Path):
        obj = str(obj)
    if not isinstance(obj, str):
        return obj
    out = obj
    for base, repl in ((str(root.resolve()), ""), (str(root), ""), (str(Path.home()), "~")):
        if len(base) > 1:
            out = out.replace(base + "/", repl + "/" if repl else "").replace(base, repl or ".")
    return out
