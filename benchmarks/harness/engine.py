"""vLLM's offline engine for benchmarks: start and stop it (:func:`make_llm`, :func:`shutdown`),
run prompts with continuous batching while reading the spec-decode counters
(:func:`run_requests`), and time a model's decode step alone (:func:`itl_of`,
:func:`decode_itl`).

vLLM and ``vllm_massv`` (which loads vLLM) are imported inside the functions that use them, so
that argument parsing, ``--help`` and the report code load without them.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks.harness import metrics
from benchmarks.harness.prompts import PromptItem


def build_engine_args(items: list[str]) -> dict[str, Any]:
    """``vllm.LLM`` arguments: the CPU defaults (fp32, eager, block size 32) on a CPU platform,
    then ``--engine-arg KEY=VALUE`` items (VALUE parsed as JSON when it parses).

    Raises:
        SystemExit: an item without ``=``.
    """
    from vllm.platforms import current_platform

    out: dict[str, Any] = {}
    if current_platform.is_cpu():
        out.update(dtype="float32", enforce_eager=True, block_size=32)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--engine-arg {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def device_name() -> str:
    """The GPU's name, or ``CPU <processor>, <n> cores``."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def engine_env(env: dict[str, str]):
    """Set ``env`` for the block (an engine started inside inherits it), then restore it
    (`vllm_massv.testing.scoped_env`)."""
    from vllm_massv.testing import scoped_env

    return scoped_env(env)


def make_llm(target: str, spec: dict[str, Any] | None, *, max_num_seqs: int,
             engine_args: dict[str, Any]) -> Any:
    """A ``vllm.LLM`` for ``target`` with the benchmarks' settings (seed 0, stats on for the
    spec-decode counters, at most one image per prompt), then ``engine_args`` on top.

    Args:
        target: the target model (path or hub id).
        spec: vLLM's ``speculative_config`` (None: no speculation).
        max_num_seqs: requests the scheduler keeps in flight at most.
        engine_args: further ``vllm.LLM`` arguments (:func:`build_engine_args`).

    Returns:
        the engine; stop it with :func:`shutdown`.
    """
    from vllm import LLM

    kwargs = dict(model=target, max_model_len=2048, max_num_seqs=max_num_seqs, seed=0,
                  disable_log_stats=False, limit_mm_per_prompt={"image": 1, "video": 0},
                  speculative_config=spec)
    kwargs.update(engine_args)
    return LLM(**kwargs)


def shutdown(llm: Any) -> None:
    """Stop an offline engine's engine-core process now (not at interpreter exit), so that the
    next engine gets the memory and the cores."""
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def run_requests(llm: Any, items: list[PromptItem], *, batch_size: int, temperature: float,
                 max_tokens: int, seed: int = 0, per_request: bool = False) -> dict[str, Any]:
    """Run ``items`` keeping ``batch_size`` requests in flight (continuous batching).

    Returns ``{"seconds", "records": [{id, kind, token_ids, latency_s, delta?}], "delta"}`` where
    ``delta`` is the change of the speculative counters (:func:`metrics.delta`); with
    ``per_request`` (meaningful at batch size 1) each record also carries its own counter delta.
    """
    from vllm import SamplingParams

    engine = llm.llm_engine
    queue = list(enumerate(items))
    inflight: dict[str, tuple[int, float]] = {}
    records: dict[int, dict[str, Any]] = {}
    start_counters = last = metrics.offline_counters(llm)
    t0 = time.perf_counter()
    while queue or inflight:
        while queue and len(inflight) < batch_size:
            i, item = queue.pop(0)
            params = SamplingParams(temperature=temperature, max_tokens=max_tokens,
                                    seed=None if temperature == 0 else seed + i)
            # outputs carry the id we pass (vLLM adds a suffix only internally)
            rid = f"{i}-{uuid.uuid4().hex[:8]}"
            engine.add_request(rid, item.inputs, params)
            inflight[rid] = (i, time.perf_counter())
        for out in engine.step():
            if not out.finished or out.request_id not in inflight:
                continue
            i, t_in = inflight.pop(out.request_id)
            rec = {"id": items[i].id, "kind": items[i].kind, "has_image": items[i].has_image,
                   "token_ids": list(out.outputs[0].token_ids),
                   "latency_s": time.perf_counter() - t_in}
            if per_request:
                now = metrics.offline_counters(llm)
                rec["delta"] = metrics.delta(last, now)
                last = now
            records[i] = rec
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "records": [records[i] for i in range(len(items))],
            "delta": metrics.delta(start_counters, metrics.offline_counters(llm))}


def decode_itl(model: str, engine_args: dict[str, Any], prompt: str, tokens: int = 96,
               repeats: int = 3) -> float:
    """Inter-token latency (s) of ``model`` alone at batch 1 (:func:`itl_of` in its own
    engine)."""
    llm = make_llm(model, None, max_num_seqs=1, engine_args=engine_args)
    try:
        return itl_of(llm, prompt, tokens, repeats)
    finally:
        shutdown(llm)


def plain_lm(model: str, out: Path) -> str:
    """``model`` as a directory vLLM serves on its own. A drafter in the speculators format
    (``vllm_massv.speculators``: ``massv init``/``train`` write it) makes vLLM serve its verifier
    with the drafter as draft model instead (one-argument serving), so for such a directory
    ``config.json`` is written to ``out`` without the speculators keys and the other files are
    linked. Other models are returned unchanged."""
    from vllm_massv.speculators import SPECULATORS_KEYS

    src = Path(model)
    config_path = src / "config.json"
    if not config_path.is_file():
        return model
    config = json.loads(config_path.read_text())
    if not any(k in config for k in SPECULATORS_KEYS):
        return model
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    for k in SPECULATORS_KEYS:
        config.pop(k, None)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return str(out)


def itl_of(llm: Any, prompt: str, tokens: int = 96, repeats: int = 3) -> float:
    """Inter-token latency (s) of an engine at batch 1: (total - first token) / (n - 1),
    median of ``repeats`` runs of ``tokens`` tokens (``ignore_eos``) after one warm-up."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    first = SamplingParams(temperature=0.0, max_tokens=1)
    llm.generate([prompt], params, use_tqdm=False)
    itls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        llm.generate([prompt], first, use_tqdm=False)
        t1 = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        t2 = time.perf_counter()
        itls.append(((t2 - t1) - (t1 - t0)) / (tokens - 1))
    return statistics.median(itls)
