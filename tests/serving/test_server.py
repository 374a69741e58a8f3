"""The OpenAI server end to end with a MASSV drafter, under load and bad input.

OpenAI server end to end with a MASSV drafter (`--speculative-config massv.json`), under
load and bad input.

The offline greedy reference (target alone, no speculation, the same engine settings as the
servers) is computed first and its engine shut down. Then two servers run, one after the other
(`vllm_massv.testing.ApiServer`: `vllm serve TARGET --speculative-config massv.json` in its own
process group, stopped by PID with SIGTERM, SIGKILL after 30 s, no process of its group may
outlive it):

1. without speculation: it answers the load workload of `benchmarks/serve_load.py` (36 requests,
   text / one image / two images, streaming and not, greedy) at concurrency 8, then stops;
2. with the sanity MASSV drafter: one image chat request must give exactly the offline reference;
   the same load workload must give 0 errors and every answer identical to server 1's; bad
   requests get a clear 4xx and the next normal request is served; clients that disconnect
   mid-stream leave no running request behind.

Startup with a broken MASSV checkpoint (no weights file; a truncated one) must fail fast in the
server's main process, naming the problem, before the port ever answers.

The argument-parser and startup-failure tests at the top need no running server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.engine import engine, spec_config
from tests.support.models import TinyModels
from benchmarks.harness import load
from benchmarks.harness.metrics import parse_prometheus
from tests.support.profile import ENGINE_ARGS, cli_flags
from vllm_massv import testing as mt
from vllm_massv.testing import ApiServer, ServerStartError


pytestmark = pytest.mark.slow

QUESTION = "Describe this image."
MAX_TOKENS = 24
NUM_SPEC_TOKENS = 3
STARTUP_TIMEOUT_S = float(os.environ.get("MASSV_TEST_SERVER_TIMEOUT", "240"))
STOP_TIMEOUT_S = 30.0
LOAD_REQUESTS = 36
LOAD_CONCURRENCY = 8
LOAD_MAX_TOKENS = 16
SERVER_ARGS = [
    *cli_flags(),
    "--max-model-len", str(ENGINE_ARGS["max_model_len"]),
    "--max-num-seqs", str(ENGINE_ARGS["max_num_seqs"]),
    "--block-size", str(ENGINE_ARGS["block_size"]),
    "--max-num-batched-tokens", str(ENGINE_ARGS["max_num_batched_tokens"]),
    "--enable-prefix-caching", "--seed", str(ENGINE_ARGS["seed"]),
    "--limit-mm-per-prompt", json.dumps(ENGINE_ARGS["limit_mm_per_prompt"]),
]
SERVER_ENV = {"VLLM_USE_V2_MODEL_RUNNER": None}


# --- --speculative-config parsing (no server) -------------------------------------------------
@pytest.fixture(scope="module")
def serve_parser():
    import vllm_massv

    vllm_massv.register()
    try:  # vLLM 0.33 moved it (no shim at the old path)
        from vllm.entrypoints.common.cli_args import make_arg_parser
    except ImportError:  # vLLM 0.32
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


# --- startup with a broken MASSV checkpoint (no engine starts) ----------------------------------
def _remove_weights(draft: Path) -> str:
    (draft / "model.safetensors").unlink()
    return "has no *.safetensors weights"


def _truncate_weights(draft: Path) -> str:
    weights = draft / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    return "unreadable safetensors file"


@pytest.mark.parametrize("breakage", [_remove_weights, _truncate_weights],
                         ids=["missing_weights", "truncated_weights"])
def test_broken_checkpoint_fails_fast(models: TinyModels, tmp_path: Path, breakage) -> None:
    """The server exits non-zero within a minute, its log names the file and the problem, and
    the port never answers /health (nothing is served half-configured)."""
    draft = tmp_path / "broken"
    shutil.copytree(models.blind, draft)
    problem = breakage(draft)
    server = ApiServer(models.target, SERVER_ARGS, env=SERVER_ENV, log=tmp_path / "server.log",
                       speculative_config=spec_config(draft, NUM_SPEC_TOKENS))
    t0 = time.monotonic()
    server.start()
    answered = False
    try:
        while server.proc.poll() is None and time.monotonic() - t0 < 90:
            answered |= server.healthy(timeout=0.5)
            time.sleep(0.5)
        seconds = time.monotonic() - t0
    finally:
        rc = server.stop()
    log = server.log.read_text(errors="replace")
    print(f"{breakage.__name__}: server exited with {rc} after {seconds:.1f} s")
    assert rc not in (None, 0), server.log_tail()
    assert seconds < 60, f"took {seconds:.0f} s to fail\n{server.log_tail()}"
    assert not answered
    assert problem in log and str(draft) in log, server.log_tail()
    assert "re-export the drafter" in log, server.log_tail()
    assert "EngineCore" not in log  # refused while the config is built, before any engine


# --- offline reference ----------------------------------------------------------------------------
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
    return load.png_data_url(image)


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


# --- the servers ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _running(server: ApiServer):
    """Start `server`, wait until it answers /health (a clear test failure with its log tail
    otherwise), yield it, stop it."""
    server.start()
    try:
        seconds = server.wait_ready()
    except ServerStartError as e:
        server.stop()
        pytest.fail(str(e), pytrace=False)
    print(f"server ready after {seconds:.0f} s")
    try:
        yield server
    finally:
        server.stop()


def _massv_server(models: TinyModels, drafter: Path, tmp: Path) -> ApiServer:
    """`vllm serve TARGET --speculative-config massv.json` with `drafter` (not started)."""
    spec_file = tmp / "massv.json"
    spec_file.write_text(json.dumps(spec_config(drafter, NUM_SPEC_TOKENS)))
    return ApiServer(models.target, SERVER_ARGS, env=SERVER_ENV, speculative_config=spec_file,
                     log=tmp / "server.log", startup_timeout=STARTUP_TIMEOUT_S,
                     stop_timeout=STOP_TIMEOUT_S)


@pytest.fixture(scope="module")
def workload() -> list:
    return load.build_workload(LOAD_REQUESTS, max_tokens=LOAD_MAX_TOKENS)


def _load(server: ApiServer, workload: list):
    return load.run_load_sync(server.url, workload, model=server.model,
                                    concurrency=LOAD_CONCURRENCY, max_seconds=300,
                                    temperature=0.0, request_timeout=240)


@pytest.fixture(scope="module")
def baseline_run(models: TinyModels, reference, workload, tmp_path_factory):
    """The load workload on a server without speculation (stopped before the MASSV server
    starts, so that only one engine runs at a time)."""
    tmp = tmp_path_factory.mktemp("server_nospec")
    server = ApiServer(models.target, SERVER_ARGS, env=SERVER_ENV, log=tmp / "server.log",
                       startup_timeout=STARTUP_TIMEOUT_S, stop_timeout=STOP_TIMEOUT_S)
    with _running(server) as srv:
        return _load(srv, workload)


@pytest.fixture(scope="module")
def server(models: TinyModels, reference, baseline_run, tmp_path_factory):
    """The OpenAI server with the sanity MASSV drafter (started after the offline reference and
    the no-speculation server are gone)."""
    with _running(_massv_server(models, models.sanity,
                                tmp_path_factory.mktemp("server"))) as srv:
        yield srv


@pytest.fixture(scope="module")
def chat_response(server: ApiServer, image_url: str):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="x", timeout=120, max_retries=0)
    return client.chat.completions.create(
        model=server.model, messages=_messages(image_url), temperature=0.0,
        max_tokens=MAX_TOKENS, extra_body={"return_token_ids": True})


def test_chat_matches_offline_greedy(chat_response, reference) -> None:
    choice = chat_response.choices[0]
    assert choice.message.content == reference["text"]
    assert choice.finish_reason == reference["finish_reason"]
    assert getattr(choice, "token_ids", None) == reference["token_ids"]
    assert getattr(chat_response, "prompt_token_ids", None) == reference["prompt_token_ids"]
    assert chat_response.usage.prompt_tokens == len(reference["prompt_token_ids"])
    assert chat_response.usage.completion_tokens == len(reference["token_ids"])


def test_spec_decode_metrics(server: ApiServer, chat_response) -> None:
    import requests

    assert chat_response.choices  # the request ran before the metrics are read
    text = requests.get(server.url + "/metrics", timeout=10).text
    metrics = parse_prometheus(text)
    drafts = metrics.get("vllm:spec_decode_num_drafts_total")
    draft_tokens = metrics.get("vllm:spec_decode_num_draft_tokens_total")
    accepted = metrics.get("vllm:spec_decode_num_accepted_tokens_total")
    assert drafts is not None and accepted is not None, text[:3000]
    print(f"spec decode: drafts={drafts:.0f} draft_tokens={draft_tokens:.0f} "
          f"accepted={accepted:.0f}")
    assert drafts > 0
    assert accepted > 0
    assert draft_tokens == drafts * NUM_SPEC_TOKENS
    assert accepted <= draft_tokens


def test_server_log_shows_massv_drafting(server: ApiServer, chat_response) -> None:
    log = server.log.read_text(errors="replace")
    assert "MASSV proposer active" in log, server.log_tail()
    # vLLM's own draft-model path would fall back to text-only drafting for an image target.
    assert "text-only speculative decoding" not in log
    assert "using text-only draft inputs" not in log


# --- under load -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def massv_run(server: ApiServer, workload):
    return _load(server, workload)


def test_load_workload_is_mixed(workload) -> None:
    kinds = {(w.kind, w.stream) for w in workload}
    assert kinds == {(k, s) for k in ("text", "image1", "image2") for s in (False, True)}
    sizes = {img[:2] for w in workload for img in w.images}
    assert len(sizes) >= 4


def test_load_lossless_and_error_free(baseline_run, massv_run, workload) -> None:
    """36 requests at concurrency 8 (max_num_seqs 4: requests queue), greedy: no errors on
    either server, every MASSV answer token-identical to the no-speculation server's."""
    base, massv = load.summarize(baseline_run), load.summarize(massv_run)
    print("\n" + load.format_table({"no speculation": base, "MASSV": massv}))
    for s in (base, massv):
        assert s["errors"] == 0 and s["cancelled"] == 0 and s["not_sent"] == 0, s
        assert s["completed"] == len(workload)
    for r in baseline_run.results + massv_run.results:
        assert r.token_ids and len(r.token_ids) == r.output_tokens, r
    cmp = load.compare_answers(baseline_run, massv_run)
    assert cmp["compared"] == len(workload)
    assert cmp["identical"], cmp
    assert base["drafts"] == 0 and base["tau"] is None
    assert massv["drafts"] > 0
    # the sanity drafter under load (batched drafting and verification, queueing)
    assert massv["acceptance_rate"] >= 0.9, massv
    assert massv["tau"] > 1 + 0.9 * NUM_SPEC_TOKENS - 1e-9, massv
    assert massv["ttft_p50_s"] is not None and massv["itl_p50_s"] is not None


def test_load_time_budget_stops_the_run(server: ApiServer) -> None:
    """`max_seconds` bounds a run: long requests in flight are cut off (counted as cancelled, not
    as errors), the rest are not sent, and the server aborts what was cut off."""
    import requests

    long_work = load.build_workload(12, max_tokens=1000)
    t0 = time.monotonic()
    run = load.run_load_sync(server.url, long_work, model=server.model, concurrency=4,
                                   max_seconds=1.5, ignore_eos=True)
    seconds = time.monotonic() - t0
    s = load.summarize(run)
    print(f"time budget 1.5 s: returned after {seconds:.1f} s; completed {s['completed']}, "
          f"cancelled {s['cancelled']}, not sent {s['not_sent']}, errors {s['errors']}")
    assert seconds < 15
    assert s["cancelled"] == 4 and s["not_sent"] == 8 and s["errors"] == 0, s
    deadline = time.monotonic() + 5
    while (running := parse_prometheus(requests.get(server.url + "/metrics").text)
           ["vllm:num_requests_running"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running == 0


# --- bad input ------------------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _solid_png(width: int, height: int) -> str:
    from PIL import Image

    return load.png_data_url(Image.new("RGB", (width, height), (0, 128, 255)))


# name -> (image URLs of one request, a fragment the error message must hold)
BAD_INPUTS: dict[str, tuple[Any, str]] = {
    "malformed_base64": (lambda: ["data:image/png;base64,!!!not-base64!!!"], "base64"),
    "data_url_without_comma": (lambda: ["data:image/png;base64"], "invalid data url"),
    "text_as_png": (lambda: ["data:image/png;base64," + _b64(b"this is not an image\n" * 4)],
                    "failed to load image"),
    "empty_png": (lambda: ["data:image/png;base64,"], "failed to load image"),
    "too_many_images": (lambda: [_solid_png(64, 64)] * 3, "at most 2 image"),
    "extreme_aspect_ratio": (lambda: [_solid_png(1, 400)], "qwen2_5_vlprocessor"),
}


def _chat_body(model: str, image_urls: list[str], stream: bool = False,
               max_tokens: int = 8) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": u}} for u in image_urls]
    content.append({"type": "text", "text": QUESTION})
    return {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0.0, "stream": stream}


def _post(server: ApiServer, body: dict[str, Any], timeout: float = 120):
    import requests

    return requests.post(server.url + "/v1/chat/completions", json=body, timeout=timeout)


def _assert_serves(server: ApiServer, image_url: str) -> None:
    resp = _post(server, _chat_body(server.model, [image_url]))
    assert resp.status_code == 200, resp.text[:1000]
    assert resp.json()["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("stream", [False, True], ids=["full", "stream"])
@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_request_is_4xx_and_server_keeps_serving(server: ApiServer, image_url: str,
                                                     name: str, stream: bool) -> None:
    urls, fragment = BAD_INPUTS[name]
    resp = _post(server, _chat_body(server.model, urls(), stream=stream))
    print(f"{name} ({'stream' if stream else 'full'}): HTTP {resp.status_code} {resp.text[:300]}")
    assert 400 <= resp.status_code < 500, resp.text[:1000]
    message = resp.json()["error"]["message"]
    assert fragment in message.lower(), message
    _assert_serves(server, image_url)


def test_huge_image_resized_or_refused(server: ApiServer, image_url: str,
                                       record_property) -> None:
    """4000x3000 (12 MP; the processor's maximum is 224x224 = 50 kP here): served after the
    processor's resize, or refused with a 4xx; never a 5xx or a crash."""
    import numpy as np
    from PIL import Image

    ys, xs = np.mgrid[0:3000, 0:4000]
    pixels = np.stack([xs * 255 // 3999, ys * 255 // 2999, (xs + ys) % 256], axis=-1)
    huge = load.png_data_url(Image.fromarray(pixels.astype(np.uint8), "RGB"))
    resp = _post(server, _chat_body(server.model, [huge]), timeout=300)
    outcome = ("served" if resp.status_code == 200 else "refused") + f" (HTTP {resp.status_code})"
    if resp.status_code == 200:
        usage = resp.json()["usage"]
        outcome += f", prompt_tokens={usage['prompt_tokens']}"
        assert usage["completion_tokens"] > 0
    else:
        outcome += f": {resp.json()['error']['message'][:300]}"
        assert 400 <= resp.status_code < 500, resp.text[:1000]
    print(f"4000x3000 image, {len(huge) / 1e6:.1f} MB data URL: {outcome}")
    record_property("huge_image_outcome", outcome)
    _assert_serves(server, image_url)


# --- client disconnects ---------------------------------------------------------------------------
def test_disconnect_mid_stream_leaves_nothing_running(server: ApiServer, workload) -> None:
    """Three long streams (text, one image, two images; 1500 tokens each) are closed after a
    few chunks: the server aborts them (running requests back to 0 within 5 s, far fewer tokens
    generated than asked) and the next request completes."""
    import httpx

    specs = load.build_workload(3, max_tokens=1500)

    async def run() -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=120) as client:
            before = await load.fetch_metrics(client, server.url)

            async def read_a_few_chunks(spec) -> float:
                body = load.chat_payload(spec, server.model, ignore_eos=True)
                body.pop("stream_options", None)
                async with client.stream("POST", server.url + "/v1/chat/completions",
                                         json=body) as resp:
                    assert resp.status_code == 200
                    chunks = 0
                    async for line in resp.aiter_lines():
                        chunks += line.startswith("data:")
                        if chunks >= 4:
                            break
                    metrics = await load.fetch_metrics(client, server.url)
                return metrics["vllm:num_requests_running"]

            running_while_open = await asyncio.gather(*map(read_a_few_chunks, specs))
            t0 = time.monotonic()
            while True:
                metrics = await load.fetch_metrics(client, server.url)
                if metrics["vllm:num_requests_running"] == 0 or time.monotonic() - t0 > 5:
                    break
                await asyncio.sleep(0.2)
            drained_after = time.monotonic() - t0
            follow_up = await load.send_request(client, server.url, server.model,
                                                      workload[1])
            after = await load.fetch_metrics(client, server.url)
        return {"running_while_open": running_while_open, "drained_after": drained_after,
                "metrics": metrics, "follow_up": follow_up, "before": before, "after": after}

    out = asyncio.run(run())
    generated = (out["after"]["vllm:generation_tokens_total"]
                 - out["before"]["vllm:generation_tokens_total"])
    print(f"running while the streams were open: {out['running_while_open']}; 0 running "
          f"{out['drained_after']:.2f} s after they closed; {generated:.0f} tokens generated "
          f"in all (asked: {3 * 1500} + {workload[1].max_tokens})")
    assert max(out["running_while_open"]) > 0
    assert out["metrics"]["vllm:num_requests_running"] == 0, out["metrics"]
    assert out["metrics"]["vllm:num_requests_waiting"] == 0, out["metrics"]
    assert out["follow_up"].ok, out["follow_up"]
    assert out["follow_up"].output_tokens > 0
    assert generated < 1500, "disconnected requests kept generating"
    assert server.healthy()


# --- last: stop ------------------------------------------------------------------------------------
def test_server_stops_cleanly(server: ApiServer, chat_response) -> None:
    """SIGTERM to the server's PID stops it and every process it started (no orphans); exit
    status 0 also shows that nothing above broke the engine."""
    proc = server.proc
    assert proc.poll() is None, server.log_tail()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server did not exit within {STOP_TIMEOUT_S:.0f} s of SIGTERM\n"
                    f"{server.log_tail()}")
    left = mt.wait_group_gone(proc.pid, 15)
    assert not left, f"processes left in the server's group after it exited: {left}"
    assert rc == 0, server.log_tail()


# --- Model Runner V2 (the VLLM_MASSV_MRV2_CPU=1 session of `make test`) ---------------------------
@pytest.fixture(scope="module")
def mrv2_server(models: TinyModels, reference, tmp_path_factory):
    """The server on Model Runner V2 (every server process inherits VLLM_MASSV_MRV2_CPU=1) with
    the 1-D sanity drafter: MRV2 refuses `positions: mrope` drafters."""
    with _running(_massv_server(models, models.sanity_1d,
                                tmp_path_factory.mktemp("server_mrv2"))) as srv:
        yield srv


@pytest.mark.mrv2
def test_mrv2_chat_lossless_with_massv_speculator(mrv2_server: ApiServer, image_url: str,
                                                  reference) -> None:
    """One image chat request through the OpenAI server on MRV2: the offline greedy reference
    (target alone, MRV2), drafts made and accepted, by the MASSV speculator."""
    import requests
    from openai import OpenAI

    client = OpenAI(base_url=mrv2_server.url + "/v1", api_key="x", timeout=240, max_retries=0)
    response = client.chat.completions.create(
        model=mrv2_server.model, messages=_messages(image_url), temperature=0.0,
        max_tokens=MAX_TOKENS, extra_body={"return_token_ids": True})
    choice = response.choices[0]
    assert getattr(choice, "token_ids", None) == reference["token_ids"]
    assert choice.message.content == reference["text"]
    metrics = parse_prometheus(requests.get(mrv2_server.url + "/metrics", timeout=10).text)
    drafts = metrics.get("vllm:spec_decode_num_drafts_total")
    accepted = metrics.get("vllm:spec_decode_num_accepted_tokens_total")
    print(f"MRV2 server: drafts={drafts} accepted={accepted}")
    assert drafts and drafts > 0 and accepted is not None
    log = mrv2_server.log.read_text(errors="replace")
    assert "Using V2 Model Runner" in log, mrv2_server.log_tail()
    assert "MASSV speculator active (Model Runner V2)" in log, mrv2_server.log_tail()
    assert "using text-only draft inputs" not in log
