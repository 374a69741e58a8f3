"""Load test for vLLM's OpenAI-compatible server, with and without MASSV speculative decoding.

Drives `/v1/chat/completions` with a bounded, deterministic mixed workload: text-only requests,
requests with one and with two images (base64 PNG data URLs of different sizes), streaming and
non-streaming, at a set concurrency. Stops by itself after `--num-requests` requests or
`--max-seconds` seconds, whichever comes first. Reports:

* requests/s and output tokens/s (over the measured wall time),
* TTFT and inter-token latency p50/p90 from the streaming requests (ITL per token: a chunk that
  carries n tokens, as speculative decoding produces, counts as n gaps of 1/n of its delay;
  chunks the server flushes together count as 0 ms gaps) and TPOT p50/p90 (per streaming
  request: (last token - first token) / (tokens - 1)),
* τ (mean acceptance length, 1 + Δaccepted / Δdrafts), acceptance rate (Δaccepted /
  Δdraft tokens) and per-position acceptance, from `/metrics` deltas over the run,
* errors (failed requests, with their messages), and requests the time budget cut off.

Servers:

    # an already running server
    python benchmarks/serve_load.py --base-url http://127.0.0.1:8000
    # start one (`vllm serve`), run, stop it; server flags after --
    python benchmarks/serve_load.py --model TARGET --speculative-config massv.json -- --dtype bfloat16
    # no speculation vs MASSV, one server after the other, side by side + greedy answers compared
    python benchmarks/serve_load.py --compare --model TARGET --speculative-config massv.json
    # the same on the tiny CPU testbed (built once into .cache/serve_load)
    python benchmarks/serve_load.py --tiny --compare --num-requests 32 --concurrency 8

`--json FILE` writes every figure and each request's result. The workload functions
(`build_workload`, `run_load`, `summarize`, `compare_answers`) are used by tests/test_server.py.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import io
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TINY_CACHE = ROOT / ".cache" / "serve_load"
# Server flags for the tiny CPU testbed (the test suite's engine settings).
TINY_SERVER_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
                    "--max-num-seqs", "4", "--block-size", "32", "--max-num-batched-tokens", "64",
                    "--enable-prefix-caching", "--seed", "0",
                    "--limit-mm-per-prompt", '{"image": 2, "video": 0}']
SPEC_METRICS = {
    "drafts": "vllm:spec_decode_num_drafts_total",
    "draft_tokens": "vllm:spec_decode_num_draft_tokens_total",
    "accepted": "vllm:spec_decode_num_accepted_tokens_total",
}
PER_POS_METRIC = "vllm:spec_decode_num_accepted_tokens_per_pos_total"

# --- the workload ---------------------------------------------------------------------------------
QUESTIONS = (
    "Describe this image.",
    "What colours and shapes can you see?",
    "How many objects are there, and where are they?",
    "Write one sentence about the picture.",
    "What is in the top left corner?",
)
TWO_IMAGE_QUESTIONS = (
    "Compare the two images.",
    "What is different between the first and the second picture?",
    "Which image is brighter?",
)
TEXT_QUESTIONS = (
    "Count from one to ten, please.",
    "Name five animals and their colours.",
    "Write a short sentence about a red circle on a table.",
    "What is seven plus five? Explain step by step.",
    "List three shapes with four corners.",
)
# (width, height): small, square at the processor's max, landscape, portrait, a photo-like size.
IMAGE_SIZES = ((64, 64), (224, 224), (320, 240), (150, 250), (451, 300), (96, 160))
KINDS = ("text", "image1", "image2")


@dataclass(frozen=True)
class RequestSpec:
    """One chat request of the workload (deterministic; `id` is unique within a workload)."""
    id: str
    kind: str                                     # text | image1 | image2
    stream: bool
    text: str
    images: tuple[tuple[int, int, int], ...] = ()  # (width, height, pattern seed)
    max_tokens: int = 16

    def messages(self) -> list[dict[str, Any]]:
        if not self.images:
            return [{"role": "user", "content": self.text}]
        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": image_data_url(w, h, s)}}
            for w, h, s in self.images]
        content.append({"type": "text", "text": self.text})
        return [{"role": "user", "content": content}]


@functools.lru_cache(maxsize=64)
def image_data_url(width: int, height: int, seed: int = 0) -> str:
    """A deterministic RGB test image (a colour gradient with shapes and some noise) as a base64
    PNG data URL."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    phase = rng.uniform(0, 2 * math.pi, size=3)
    rgb = np.stack([127.5 * (1 + np.sin(xs / max(width, 1) * 2 * math.pi + phase[c]
                                        + ys / max(height, 1) * math.pi * c))
                    for c in range(3)], axis=-1)
    rgb += rng.normal(0, 12, size=rgb.shape)
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, max(width - 8, 1))), int(rng.integers(0, max(height - 8, 1)))
        x1 = min(width - 1, x0 + int(rng.integers(4, max(width // 3, 5))))
        y1 = min(height - 1, y0 + int(rng.integers(4, max(height // 3, 5))))
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return png_data_url(image)


def png_data_url(image: Any) -> str:
    """A PIL image as a `data:image/png;base64,...` URL."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def build_workload(num_requests: int, max_tokens: int = 16, seed: int = 0) -> list[RequestSpec]:
    """`num_requests` requests cycling text-only / one image / two images and, every three
    requests, streaming / non-streaming (so any 6 consecutive requests hold all 6 combinations);
    questions and image sizes vary. Same arguments, same workload."""
    specs = []
    for i in range(num_requests):
        kind = KINDS[i % 3]
        stream = (i // 3) % 2 == 0
        j = i + seed
        if kind == "text":
            text, images = TEXT_QUESTIONS[j % len(TEXT_QUESTIONS)], ()
        elif kind == "image1":
            w, h = IMAGE_SIZES[j % len(IMAGE_SIZES)]
            text, images = QUESTIONS[j % len(QUESTIONS)], ((w, h, j),)
        else:
            (w1, h1), (w2, h2) = IMAGE_SIZES[j % len(IMAGE_SIZES)], \
                IMAGE_SIZES[(j + 2) % len(IMAGE_SIZES)]
            text = TWO_IMAGE_QUESTIONS[j % len(TWO_IMAGE_QUESTIONS)]
            images = ((w1, h1, j), (w2, h2, j + 1000))
        specs.append(RequestSpec(f"r{i:04d}-{kind}-{'stream' if stream else 'full'}", kind,
                                 stream, text, images, max_tokens))
    return specs


def chat_payload(spec: RequestSpec, model: str, *, temperature: float = 0.0,
                 ignore_eos: bool = False, seed: int | None = 0) -> dict[str, Any]:
    """The `/v1/chat/completions` body of a request (token ids returned, usage in streams)."""
    body: dict[str, Any] = {"model": model, "messages": spec.messages(),
                            "max_tokens": spec.max_tokens, "temperature": temperature,
                            "stream": spec.stream, "return_token_ids": True,
                            "ignore_eos": ignore_eos}
    if seed is not None:
        body["seed"] = seed
    if spec.stream:
        body["stream_options"] = {"include_usage": True}
    return body


# --- running it -----------------------------------------------------------------------------------
@dataclass
class RequestResult:
    id: str
    kind: str
    stream: bool
    ok: bool = False
    status: int | None = None        # HTTP status (None: no response)
    error: str | None = None
    cancelled: bool = False          # cut off by the run's time budget (not an error)
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int = 0
    finish_reason: str | None = None
    latency: float | None = None     # seconds, request sent -> last byte
    ttft: float | None = None        # streaming only: seconds to the first token
    itl: list[float] = field(default_factory=list)  # streaming only: per-token gaps (s)


@dataclass
class LoadRun:
    base_url: str
    model: str
    concurrency: int
    wall_s: float
    results: list[RequestResult]
    metrics_before: dict[str, Any]
    metrics_after: dict[str, Any]
    not_sent: int = 0                # requests never started (time budget)


def _error_message(status: int, body: bytes) -> str:
    try:
        err = json.loads(body)
        msg = err.get("error", err)
        msg = msg.get("message", msg) if isinstance(msg, dict) else msg
    except (ValueError, AttributeError):
        msg = body.decode("utf-8", "replace")
    return f"HTTP {status}: {str(msg)[:500]}"


async def send_request(client: Any, base_url: str, model: str, spec: RequestSpec, *,
                       temperature: float = 0.0, ignore_eos: bool = False,
                       seed: int | None = 0, timeout: float = 300.0) -> RequestResult:
    """Send one request with an `httpx.AsyncClient`; never raises for a failed request (the
    result says what went wrong), except `asyncio.CancelledError`."""
    import httpx

    res = RequestResult(spec.id, spec.kind, spec.stream)
    body = chat_payload(spec, model, temperature=temperature, ignore_eos=ignore_eos, seed=seed)
    url = base_url.rstrip("/") + "/v1/chat/completions"
    t0 = time.perf_counter()
    try:
        if not spec.stream:
            resp = await client.post(url, json=body, timeout=timeout)
            res.status = resp.status_code
            if resp.status_code != 200:
                res.error = _error_message(resp.status_code, resp.content)
                return res
            data = resp.json()
            choice = data["choices"][0]
            res.text = choice["message"].get("content") or ""
            res.token_ids = list(choice.get("token_ids") or [])
            res.finish_reason = choice.get("finish_reason")
            usage = data.get("usage") or {}
            res.prompt_tokens = usage.get("prompt_tokens")
            res.output_tokens = usage.get("completion_tokens") or len(res.token_ids)
        else:
            async with client.stream("POST", url, json=body, timeout=timeout) as resp:
                res.status = resp.status_code
                if resp.status_code != 200:
                    res.error = _error_message(resp.status_code, await resp.aread())
                    return res
                last = None
                parts: list[str] = []
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        res.error = f"in-stream error: {json.dumps(chunk['error'])[:500]}"
                        return res
                    if chunk.get("usage"):
                        res.prompt_tokens = chunk["usage"].get("prompt_tokens")
                        res.output_tokens = chunk["usage"].get("completion_tokens") or 0
                    for choice in chunk.get("choices") or []:
                        ids = list(choice.get("token_ids") or [])
                        content = (choice.get("delta") or {}).get("content") or ""
                        n = len(ids) or (1 if content else 0)
                        if choice.get("finish_reason"):
                            res.finish_reason = choice["finish_reason"]
                        if not n:
                            continue
                        now = time.perf_counter()
                        if last is None:
                            res.ttft = now - t0
                        else:
                            res.itl.extend([(now - last) / n] * n)
                        last = now
                        res.token_ids.extend(ids)
                        parts.append(content)
                res.text = "".join(parts)
                if not res.output_tokens:
                    res.output_tokens = len(res.token_ids)
        res.latency = time.perf_counter() - t0
        res.ok = True
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
    except (ValueError, KeyError, IndexError) as e:  # a malformed response body
        res.error = f"bad response: {type(e).__name__}: {e}"
    return res


def parse_metrics(text: str) -> dict[str, Any]:
    """Prometheus text -> {metric name: value summed over label sets}; the per-position
    accepted counts as a list under `PER_POS_METRIC`."""
    out: dict[str, Any] = {}
    per_pos: dict[int, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if name == PER_POS_METRIC:
            pos = re.search(r'position="(\d+)"', labels)
            if pos:
                per_pos[int(pos.group(1))] = per_pos.get(int(pos.group(1)), 0.0) + value
            continue
        out[name] = out.get(name, 0.0) + value
    if per_pos:
        out[PER_POS_METRIC] = [per_pos[i] for i in sorted(per_pos)]
    return out


async def fetch_metrics(client: Any, base_url: str) -> dict[str, Any]:
    resp = await client.get(base_url.rstrip("/") + "/metrics", timeout=30)
    resp.raise_for_status()
    return parse_metrics(resp.text)


async def _settled_metrics(client: Any, base_url: str, wait_s: float = 3.0) -> dict[str, Any]:
    """`/metrics` once the spec-decode counters stop moving (the server records an engine step's
    stats right after it hands the outputs over)."""
    prev = await fetch_metrics(client, base_url)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        cur = await fetch_metrics(client, base_url)
        if all(cur.get(n) == prev.get(n) for n in SPEC_METRICS.values()) and \
                cur.get("vllm:num_requests_running", 0) == 0:
            return cur
        prev = cur
    return prev


async def discover_model(client: Any, base_url: str) -> str:
    resp = await client.get(base_url.rstrip("/") + "/v1/models", timeout=30)
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


async def run_load(base_url: str, workload: list[RequestSpec], *, model: str | None = None,
                   concurrency: int = 8, max_seconds: float = 600.0, temperature: float = 0.0,
                   ignore_eos: bool = False, seed: int | None = 0,
                   warmup: list[RequestSpec] | tuple[RequestSpec, ...] = (),
                   request_timeout: float = 300.0) -> LoadRun:
    """Run `workload` against a server with `concurrency` requests in flight; stop after the
    last request or `max_seconds` (requests then in flight are cancelled, later ones not sent).

    The `warmup` requests run first, one at a time, and count in nothing.
    """
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=request_timeout) as client:
        model = model or await discover_model(client, base_url)
        kw = dict(temperature=temperature, ignore_eos=ignore_eos, seed=seed,
                  timeout=request_timeout)
        for spec in warmup:
            await send_request(client, base_url, model, spec, **kw)
        before = await _settled_metrics(client, base_url)
        results: list[RequestResult | None] = [None] * len(workload)
        queue = iter(enumerate(workload))
        t0 = time.perf_counter()
        deadline = t0 + max_seconds

        async def worker() -> None:
            for i, spec in queue:
                left = deadline - time.perf_counter()
                if left <= 0:
                    return
                try:
                    results[i] = await asyncio.wait_for(
                        send_request(client, base_url, model, spec, **kw), left)
                except asyncio.TimeoutError:
                    results[i] = RequestResult(spec.id, spec.kind, spec.stream, cancelled=True,
                                               error=f"cut off by --max-seconds {max_seconds:g}")
                    return

        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
        wall = time.perf_counter() - t0
        after = await _settled_metrics(client, base_url)
    done = [r for r in results if r is not None]
    return LoadRun(base_url, model, concurrency, wall, done, before, after,
                   not_sent=len(workload) - len(done))


def run_load_sync(base_url: str, workload: list[RequestSpec], **kwargs: Any) -> LoadRun:
    """`run_load` from synchronous code."""
    return asyncio.run(run_load(base_url, workload, **kwargs))


# --- figures --------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def spec_decode_deltas(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """τ, acceptance rate and per-position acceptance from two `/metrics` snapshots (None when
    the server drafted nothing, e.g. without speculation)."""
    d = {k: after.get(n, 0.0) - before.get(n, 0.0) for k, n in SPEC_METRICS.items()}
    pos_after = after.get(PER_POS_METRIC) or []
    pos_before = before.get(PER_POS_METRIC) or [0.0] * len(pos_after)
    per_pos = [a - b for a, b in zip(pos_after, pos_before)]
    drafts = d["drafts"]
    return {
        "drafts": int(drafts), "draft_tokens": int(d["draft_tokens"]),
        "accepted_tokens": int(d["accepted"]),
        "tau": 1 + d["accepted"] / drafts if drafts else None,
        "acceptance_rate": d["accepted"] / d["draft_tokens"] if d["draft_tokens"] else None,
        "per_position_acceptance": [p / drafts for p in per_pos] if drafts else None,
    }


def summarize(run: LoadRun) -> dict[str, Any]:
    """The run's figures (everything the CLI prints)."""
    ok = [r for r in run.results if r.ok]
    errors = [r for r in run.results if not r.ok and not r.cancelled]
    streamed = [r for r in ok if r.stream]
    ttft = [r.ttft for r in streamed if r.ttft is not None]
    itl = [x for r in streamed for x in r.itl]
    tpot = [sum(r.itl) / len(r.itl) for r in streamed if r.itl]
    out_tokens = sum(r.output_tokens for r in ok)
    wall = run.wall_s or float("nan")
    return {
        "base_url": run.base_url, "model": run.model, "concurrency": run.concurrency,
        "requests": len(run.results) + run.not_sent, "completed": len(ok),
        "errors": len(errors), "cancelled": sum(r.cancelled for r in run.results),
        "not_sent": run.not_sent, "wall_s": run.wall_s,
        "requests_per_s": len(ok) / wall, "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / wall,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p90_s": percentile(ttft, 90),
        "itl_p50_s": percentile(itl, 50), "itl_p90_s": percentile(itl, 90),
        "tpot_p50_s": percentile(tpot, 50), "tpot_p90_s": percentile(tpot, 90),
        "latency_p50_s": percentile([r.latency for r in ok if r.latency is not None], 50),
        "latency_p90_s": percentile([r.latency for r in ok if r.latency is not None], 90),
        **spec_decode_deltas(run.metrics_before, run.metrics_after),
        "error_messages": sorted({r.error for r in errors if r.error}),
    }


def compare_answers(a: LoadRun, b: LoadRun) -> dict[str, Any]:
    """Request-by-request comparison of two runs of the same workload: token ids (text when a
    server returned none). `identical` is True when every request succeeded in both and all
    answers are equal."""
    ra, rb = {r.id: r for r in a.results}, {r.id: r for r in b.results}
    both = [i for i in ra if i in rb and ra[i].ok and rb[i].ok]
    differ = [i for i in both if (ra[i].token_ids, ra[i].text) != (rb[i].token_ids, rb[i].text)]
    missing = sorted((set(ra) | set(rb)) - set(both))
    return {"compared": len(both), "differ": differ, "not_in_both": missing,
            "identical": bool(both) and not differ and not missing}


def _fmt(value: Any, unit: str = "", scale: float = 1.0, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value * scale:.{digits}f}{unit}"
    return f"{value}{unit}"


ROWS = (("requests (ok / sent)", lambda s: f"{s['completed']} / {s['requests'] - s['not_sent']}"),
        ("errors", lambda s: _fmt(s["errors"])),
        ("cancelled / not sent", lambda s: f"{s['cancelled']} / {s['not_sent']}"),
        ("wall time", lambda s: _fmt(s["wall_s"], " s", digits=1)),
        ("requests/s", lambda s: _fmt(s["requests_per_s"])),
        ("output tokens/s", lambda s: _fmt(s["output_tokens_per_s"], digits=1)),
        ("TTFT p50 / p90", lambda s: f"{_fmt(s['ttft_p50_s'], ' ms', 1e3, 0)} / "
                                     f"{_fmt(s['ttft_p90_s'], ' ms', 1e3, 0)}"),
        ("ITL p50 / p90", lambda s: f"{_fmt(s['itl_p50_s'], ' ms', 1e3, 1)} / "
                                    f"{_fmt(s['itl_p90_s'], ' ms', 1e3, 1)}"),
        ("TPOT p50 / p90", lambda s: f"{_fmt(s['tpot_p50_s'], ' ms', 1e3, 1)} / "
                                     f"{_fmt(s['tpot_p90_s'], ' ms', 1e3, 1)}"),
        ("latency p50 / p90", lambda s: f"{_fmt(s['latency_p50_s'], ' s')} / "
                                        f"{_fmt(s['latency_p90_s'], ' s')}"),
        ("tau (mean accept. length)", lambda s: _fmt(s["tau"])),
        ("acceptance rate", lambda s: _fmt(s["acceptance_rate"], "%", 100, 1)),
        ("per-position acceptance", lambda s: " ".join(
            f"{p:.2f}" for p in s["per_position_acceptance"])
            if s["per_position_acceptance"] else "-"))


def format_table(summaries: dict[str, dict[str, Any]]) -> str:
    labels = list(summaries)
    width = max(24, *(len(label) + 2 for label in labels))
    lines = [f"{'':28s}" + "".join(f"{label:>{width}s}" for label in labels)]
    for name, fmt in ROWS:
        lines.append(f"{name:28s}" + "".join(f"{fmt(summaries[k]):>{width}s}" for k in labels))
    for label, s in summaries.items():
        for msg in s["error_messages"][:5]:
            lines.append(f"  [{label}] error: {msg}")
    return "\n".join(lines)


# --- CLI ------------------------------------------------------------------------------------------
def build_tiny_testbed(cache: Path = TINY_CACHE) -> tuple[Path, Path]:
    """The tiny CPU testbed: a random Qwen2.5-VL target and its MASSV sanity drafter."""
    from vllm_massv import testing as mt

    paths = mt.build_tiny_testbed(cache)
    return paths["target"], paths["sanity"]


def _run_on_server(label: str, args: argparse.Namespace, workload: list[RequestSpec],
                   base_url: str | None, spec: str | None, server_args: list[str]) -> LoadRun:
    kw = dict(model=args.served_model_name, concurrency=args.concurrency,
              max_seconds=args.max_seconds, temperature=args.temperature,
              ignore_eos=args.ignore_eos, warmup=build_workload(args.warmup, args.max_tokens,
                                                                seed=args.seed + 1),
              request_timeout=args.request_timeout)
    if base_url:
        return run_load_sync(base_url, workload, **kw)
    from vllm_massv.testing import ApiServer

    log = Path(args.log_dir) / f"server-{label}.log" if args.log_dir else None
    server = ApiServer(args.model, server_args, speculative_config=spec, log=log,
                       startup_timeout=args.startup_timeout)
    print(f"[{label}] starting server: {' '.join(server.cmd)}", file=sys.stderr)
    with server:
        print(f"[{label}] ready at {server.url} (log {server.log}); running "
              f"{len(workload)} requests at concurrency {args.concurrency}", file=sys.stderr)
        return run_load_sync(server.url, workload, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="serve_load.py", description=__doc__.split("\n\n")[0],
        epilog="Flags after a lone `--` go to the server(s) the script starts.")
    p.add_argument("--base-url", help="an already running server, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", help="start a server for this model (stopped at the end)")
    p.add_argument("--speculative-config",
                   help="speculative config (inline JSON or a JSON file) of the started server; "
                        "with --compare, the MASSV server's")
    p.add_argument("--compare", action="store_true",
                   help="run against a no-speculation server, then a --speculative-config server")
    p.add_argument("--tiny", action="store_true",
                   help="use the tiny CPU testbed (random Qwen2.5-VL + MASSV sanity drafter, k=3)")
    p.add_argument("--served-model-name", help="model name in requests (default: /v1/models)")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-seconds", type=float, default=600.0,
                   help="time budget of one run; in-flight requests are then cancelled")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests before the run")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.add_argument("--log-dir", help="where started servers write their logs")
    p.add_argument("--json", help="write figures and per-request results to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    server_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, server_args = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tiny:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        target, drafter = build_tiny_testbed()
        args.model = args.model or str(target)
        args.speculative_config = args.speculative_config or json.dumps(
            {"method": "draft_model", "model": str(drafter), "num_speculative_tokens": 3})
        server_args = server_args or TINY_SERVER_ARGS
    if args.base_url and (args.model or args.compare):
        parser.error("--base-url drives a running server; --model / --compare start servers")
    if not args.base_url and not args.model:
        parser.error("give --base-url (a running server) or --model (start one)")
    if args.compare and not args.speculative_config:
        parser.error("--compare needs --speculative-config (the MASSV server's)")

    workload = build_workload(args.num_requests, args.max_tokens, args.seed)
    import httpx

    from vllm_massv.testing import ServerStartError

    runs: dict[str, LoadRun] = {}
    try:
        if args.compare:
            runs["no speculation"] = _run_on_server("no-spec", args, workload, None, None,
                                                    server_args)
            runs["MASSV"] = _run_on_server("massv", args, workload, None,
                                           args.speculative_config, server_args)
        else:
            label = "server" if args.base_url else ("speculative" if args.speculative_config
                                                     else "no speculation")
            runs[label] = _run_on_server("server", args, workload, args.base_url,
                                         args.speculative_config, server_args)
    except ServerStartError as e:
        print(f"serve_load.py: error: {e}", file=sys.stderr)
        return 2
    except httpx.HTTPError as e:
        print(f"serve_load.py: error: cannot query the server ({type(e).__name__}: {e})",
              file=sys.stderr)
        return 2
    summaries = {label: summarize(run) for label, run in runs.items()}
    print()
    print(f"workload: {args.num_requests} requests (text / 1 image / 2 images, streaming and "
          f"not), concurrency {args.concurrency}, max_tokens {args.max_tokens}, "
          f"temperature {args.temperature:g}")
    print(format_table(summaries))
    report: dict[str, Any] = {"args": {k: v for k, v in vars(args).items()},
                              "server_args": server_args, "summaries": summaries}
    status = 0 if all(s["errors"] == 0 for s in summaries.values()) else 1
    if args.compare:
        cmp = compare_answers(runs["no speculation"], runs["MASSV"])
        report["answers"] = cmp
        greedy = "greedy " if args.temperature == 0 else ""
        verdict = "all identical" if cmp["identical"] else (
            f"{len(cmp['differ'])} differ, {len(cmp['not_in_both'])} not comparable")
        print(f"\n{greedy}answers, MASSV vs no speculation: {cmp['compared']} compared, {verdict}")
        if args.temperature == 0 and not cmp["identical"]:
            status = 1
    if args.json:
        report["results"] = {label: [asdict(r) for r in run.results]
                             for label, run in runs.items()}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
