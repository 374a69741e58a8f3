"""The package layout's promises: one registry of methods that resolves, a transformers side that
imports without vLLM, module-level imports that form a DAG, environment variables read in one
module."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_massv import methods
from vllm_massv.checkpoint import DrafterBlock

ROOT = Path(__file__).resolve().parents[2]
#: installed module name -> source folder (`training/` is installed as `vllm_massv.training`)
SOURCES = {"vllm_massv": ROOT / "vllm_massv", "vllm_massv.training": ROOT / "training"}


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_every_registered_method_resolves(name: str) -> None:
    m = methods.get(name)
    assert m.name == name and callable(methods.resolve(m.init))
    assert callable(methods.resolve(m.train_setup))
    if m.config_block is not None:
        block = methods.resolve(m.config_block)
        assert issubclass(block, DrafterBlock)
        assert (m.speculators_type is None) or m.speculators_type == block.block_key
    for arch, ref in m.vllm_architectures.items():
        assert methods.resolve(ref).__name__ == arch


def test_cli_choices_come_from_the_registry() -> None:
    from vllm_massv.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for command in ("init", "train"):
        method = next(a for a in sub.choices[command]._actions if a.dest == "method")
        assert list(method.choices) == list(methods.METHODS)
    with pytest.raises(ValueError, match="unknown drafter method 'nope'"):
        methods.get("nope")


def test_transformers_side_imports_without_vllm() -> None:
    """`massv train`, the hf twins, the config blocks and the CLI work on a machine without a
    supported vLLM: importing them must not import vLLM."""
    modules = ["vllm_massv", "vllm_massv.cli", "vllm_massv.speculators", "vllm_massv.patches",
               "vllm_massv.hf", "vllm_massv.training.loop", "vllm_massv.training.cli",
               "vllm_massv.training.features"]
    for m in methods.METHODS.values():
        modules += [m.init.partition(":")[0], m.train_setup.partition(":")[0]]
    script = (
        "import importlib, sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'vllm' or name.startswith('vllm.'):\n"
        "            raise ImportError('vllm is blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "from vllm_massv.cli import build_parser; build_parser()\n"
        "print('OK')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def _module_level_imports() -> dict[str, set[str]]:
    """Project module -> project modules it imports at module level (function bodies and
    `if TYPE_CHECKING:` blocks excluded; importing `a.b.c` imports `a` and `a.b` too)."""
    files = {}
    for pkg, folder in SOURCES.items():
        for f in folder.rglob("*.py"):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([pkg, *parts])] = f

    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in files}

    def visit(module: str, nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue  # class bodies hold no project imports here; functions are lazy
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            names = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                target = known(name)
                while target and target != module and not module.startswith(target + "."):
                    graph[module].add(target)
                    target = known(target.rpartition(".")[0])
            for field in ("body", "orelse", "handlers", "finalbody"):
                visit(module, getattr(node, field, []) or [])

    for module, f in files.items():
        visit(module, ast.parse(f.read_text()).body)
    return graph


def test_module_level_imports_form_a_dag() -> None:
    graph = _module_level_imports()
    assert "vllm_massv.drafters.massv.config" in graph["vllm_massv.drafters.massv.projector"]
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def cycle_from(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return path + [m, t]
            if t not in state and (found := cycle_from(t, path + [m])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            assert (found := cycle_from(m, [])) is None, " -> ".join(found)


def test_environment_variables_are_read_in_envs_only() -> None:
    """Every `VLLM_MASSV_*` / `MASSV_*` variable is named in `vllm_massv/envs.py` and nowhere else
    in the product."""
    pattern = re.compile(r"""["'](VLLM_MASSV_[A-Z_]+|MASSV_[A-Z_]+)["']""")
    envs_file = ROOT / "vllm_massv" / "envs.py"
    declared = set(pattern.findall(envs_file.read_text()))
    assert {"VLLM_MASSV_FIX_CPU_SAMPLER", "VLLM_MASSV_TEST_STOCK_PROPOSER",
            "VLLM_MASSV_TEST_CORRUPT_LAST_DRAFT", "VLLM_MASSV_TEST_STOCK_EAGLE_POSITIONS",
            "MASSV_WHEEL_CACHE"} <= declared
    elsewhere = [f"{f.relative_to(ROOT)}: {name}" for folder in SOURCES.values()
                 for f in folder.rglob("*.py") if f != envs_file
                 for name in pattern.findall(f.read_text())]
    assert not elsewhere, elsewhere
