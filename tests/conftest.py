"""Session fixtures: the tiny local models (built once per session) and the target's reference
output; the engine settings come from the test profile (`tests/support/profile.py`).

The helper library the test modules import is `tests/support/`. Each test module starts at most
a few engines; an engine start costs 25-60 s on a 2-core CPU.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")

from tests.support.engine import engine, generate, mixed_batch, token_ids  # noqa: E402
from tests.support.models import TinyModels, build_tiny_models  # noqa: E402
from tests.support.profile import PROFILE, PROFILES, RUNNER  # noqa: E402
from vllm_massv import mrv2_cpu  # noqa: E402

mrv2_cpu.activate()  # no-op unless VLLM_MASSV_MRV2_CPU=1; before anything imports vLLM


def pytest_report_header(config) -> str:
    return f"massv test profile: {PROFILE} ({PROFILES[PROFILE]}), runner {RUNNER}"


def pytest_collection_modifyitems(config, items) -> None:
    """The runner decides which tests run: on Model Runner V2 (`VLLM_MASSV_MRV2_CPU=1`) only
    those marked `both_runners` or `mrv2`; on V1 every test but those marked `mrv2`."""
    def runs(item) -> bool:
        marks = {m.name for m in item.iter_markers()}
        if RUNNER == "mrv2":
            return bool(marks & {"both_runners", "mrv2"})
        return "mrv2" not in marks

    keep = [item for item in items if runs(item)]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if not runs(i)])
        items[:] = keep


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return build_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def reference(models: TinyModels) -> dict[str, list[int]]:
    """Greedy token ids of the target alone (no speculation) on the mixed batch."""
    with engine(models.target) as llm:
        return token_ids(generate(llm, mixed_batch(models.target)))
