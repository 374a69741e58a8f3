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
from tests.support.profile import PROFILE, PROFILES  # noqa: E402


def pytest_report_header(config) -> str:
    return f"massv test profile: {PROFILE} ({PROFILES[PROFILE]})"


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return build_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def reference(models: TinyModels) -> dict[str, list[int]]:
    """Greedy token ids of the target alone (no speculation) on the mixed batch."""
    with engine(models.target) as llm:
        return token_ids(generate(llm, mixed_batch(models.target)))
