"""Load on vLLM's OpenAI-compatible server: a deterministic mixed chat workload
(:func:`build_workload`: text-only, one image, two images; streaming and not; optionally some
streams that the client closes mid-answer), an async client that keeps a set number of requests in
flight (:func:`run_load`), and the run's figures (:func:`summarize`, :func:`format_table`,
:func:`compare_answers`).

Spec-decode figures come from ``/metrics`` deltas over the run
(:mod:`benchmarks.harness.metrics`).
``httpx``, numpy and PIL are imported inside the functions that use them.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from benchmarks.harness import metrics

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
    #: streaming only: the client closes the connection once this many chunks carrying tokens
    #: have arrived, unless the answer finished first (a client disconnect mid-stream); None:
    #: read the stream to its end.
    cancel_after: int | None = None

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


def build_workload(num_requests: int, max_tokens: int = 16, seed: int = 0, *,
                   cancel_every: int = 0, cancel_after: int = 2,
                   cancel_max_tokens: int | None = None) -> list[RequestSpec]:
    """`num_requests` requests cycling text-only / one image / two images and, every three
    requests, streaming / non-streaming (so any 6 consecutive requests hold all 6 combinations);
    questions and image sizes vary. Same arguments, same workload.

    With `cancel_every` = n > 0, every n-th streaming request (the n-th, 2n-th, ...) is one the
    client abandons: it closes the connection after `cancel_after` chunks with tokens
    (:attr:`RequestSpec.cancel_after`; its id ends in ``-cancel``) and asks for
    `cancel_max_tokens` tokens (default `max_tokens`; more makes sure the server is still
    generating when the client leaves). With n not a multiple of 3 the abandoned streams rotate
    through the three kinds.
    """
    if cancel_every < 0 or cancel_after < 1:
        raise ValueError("cancel_every must be >= 0 and cancel_after >= 1")
    specs = []
    streams = 0
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
        rid = f"r{i:04d}-{kind}-{'stream' if stream else 'full'}"
        cancel = None
        streams += stream
        if stream and cancel_every and streams % cancel_every == 0:
            cancel, rid = cancel_after, rid + "-cancel"
        tokens = max_tokens if cancel is None or cancel_max_tokens is None else cancel_max_tokens
        specs.append(RequestSpec(rid, kind, stream, text, images, tokens, cancel))
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
    #: the client closed the stream mid-answer as its spec asked (`RequestSpec.cancel_after`;
    #: neither ok nor an error): `token_ids` / `text` hold what had arrived by then.
    disconnected: bool = False
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
                token_chunks = 0
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
                        token_chunks += 1
                    if (spec.cancel_after is not None and token_chunks >= spec.cancel_after
                            and res.finish_reason is None):
                        res.disconnected = True
                        break  # leaving `client.stream` closes the connection mid-answer
                res.text = "".join(parts)
                if res.disconnected:
                    res.latency = time.perf_counter() - t0
                    return res
                if not res.output_tokens:
                    res.output_tokens = len(res.token_ids)
        res.latency = time.perf_counter() - t0
        res.ok = True
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
    except (ValueError, KeyError, IndexError) as e:  # a malformed response body
        res.error = f"bad response: {type(e).__name__}: {e}"
    return res


async def fetch_metrics(client: Any, base_url: str) -> dict[str, Any]:
    """The server's `/metrics` through an `httpx.AsyncClient`
    (:func:`benchmarks.harness.metrics.parse_prometheus`)."""
    resp = await client.get(base_url.rstrip("/") + "/metrics", timeout=30)
    resp.raise_for_status()
    return metrics.parse_prometheus(resp.text)


async def _settled_metrics(client: Any, base_url: str, wait_s: float = 3.0) -> dict[str, Any]:
    """`/metrics` once the spec-decode counters stop moving (the server records an engine step's
    stats right after it hands the outputs over)."""
    prev = await fetch_metrics(client, base_url)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        cur = await fetch_metrics(client, base_url)
        if all(cur.get(n) == prev.get(n) for n in metrics.PROMETHEUS_COUNTERS.values()) and \
                cur.get("vllm:num_requests_running", 0) == 0:
            return cur
        prev = cur
    return prev


async def discover_model(client: Any, base_url: str) -> str:
    """The model name the server answers to (the first of `/v1/models`)."""
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


def summarize(run: LoadRun) -> dict[str, Any]:
    """The run's figures (everything the CLI prints)."""
    ok = [r for r in run.results if r.ok]
    errors = [r for r in run.results if not r.ok and not r.cancelled and not r.disconnected]
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
        "disconnected": sum(r.disconnected for r in run.results),
        "http_5xx": sum(r.status is not None and r.status >= 500 for r in run.results),
        "not_sent": run.not_sent, "wall_s": run.wall_s,
        "requests_per_s": len(ok) / wall, "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / wall,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p90_s": percentile(ttft, 90),
        "itl_p50_s": percentile(itl, 50), "itl_p90_s": percentile(itl, 90),
        "tpot_p50_s": percentile(tpot, 50), "tpot_p90_s": percentile(tpot, 90),
        "latency_p50_s": percentile([r.latency for r in ok if r.latency is not None], 50),
        "latency_p90_s": percentile([r.latency for r in ok if r.latency is not None], 90),
        **metrics.prometheus_summary(run.metrics_before, run.metrics_after),
        "error_messages": sorted({r.error for r in errors if r.error}),
    }


def compare_answers(a: LoadRun, b: LoadRun) -> dict[str, Any]:
    """Request-by-request comparison of two runs of the same workload: token ids (text when a
    server returned none). A stream the client closed mid-answer (`disconnected`) in either run
    is compared on what both runs have: the shorter token-id list must be a prefix of the
    longer (`partial`, `partial_differ`). `identical` is True when every request either
    succeeded in both runs with equal answers or was such a consistent partial answer."""
    ra, rb = {r.id: r for r in a.results}, {r.id: r for r in b.results}
    both = [i for i in ra if i in rb and ra[i].ok and rb[i].ok]
    differ = [i for i in both if (ra[i].token_ids, ra[i].text) != (rb[i].token_ids, rb[i].text)]
    partial = [i for i in ra if i in rb and (ra[i].disconnected or rb[i].disconnected)
               and (ra[i].ok or ra[i].disconnected) and (rb[i].ok or rb[i].disconnected)]

    def _prefix_consistent(x: RequestResult, y: RequestResult) -> bool:
        n = min(len(x.token_ids), len(y.token_ids))
        return n > 0 and x.token_ids[:n] == y.token_ids[:n]

    partial_differ = [i for i in partial if not _prefix_consistent(ra[i], rb[i])]
    missing = sorted((set(ra) | set(rb)) - set(both) - set(partial))
    return {"compared": len(both), "differ": differ, "not_in_both": missing,
            "partial": len(partial), "partial_differ": partial_differ,
            "identical": bool(both) and not differ and not missing and not partial_differ}


def _fmt(value: Any, unit: str = "", scale: float = 1.0, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value * scale:.{digits}f}{unit}"
    return f"{value}{unit}"


ROWS = (("requests (ok / sent)", lambda s: f"{s['completed']} / {s['requests'] - s['not_sent']}"),
        ("errors", lambda s: _fmt(s["errors"])),
        ("cancelled / not sent", lambda s: f"{s['cancelled']} / {s['not_sent']}"),
        ("client disconnects", lambda s: _fmt(s.get("disconnected", 0))),
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

