"""Benchmark results: one :class:`RunResult` per method, k, batch size and temperature
(:func:`summarize`), the comparisons between runs (:func:`fill_comparisons`), the k schedule a
k sweep suggests (:func:`schedule_from_sweep`) and the Markdown report (:func:`markdown`).
The plots are in :mod:`benchmarks.harness.plots`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from benchmarks.harness import metrics
from benchmarks.harness.methods import SCHEDULE_SUFFIX
from benchmarks.harness.prompts import PromptItem


@dataclass
class RunResult:
    """The figures of one run: ``method`` at ``k``, ``batch_size`` and ``temperature`` (the
    columns of ``results.json``; the comparisons are filled by :func:`fill_comparisons`)."""

    method: str
    k: int
    batch_size: int
    temperature: float
    seconds: float
    output_tokens: int
    tokens_per_s: float
    latency_p50_s: float
    latency_p90_s: float
    tau: float | None
    acceptance_rate: float | None
    acceptance_per_position: list[float] | None
    tau_per_kind: dict[str, float] = field(default_factory=dict)
    speedup_vs_none: float | None = None
    speedup_vs_reference: float | None = None
    analytic_bound: float | None = None
    num_drafts: int = 0
    draft_ms_in_loop: float | None = None
    c_in_loop: float | None = None
    greedy_equal: bool | None = None
    greedy_mismatches: list[str] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in 0..1."""
    s = sorted(values)
    idx = min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))
    return s[idx]


def tau_of_records(records: list[dict[str, Any]]) -> float | None:
    """τ over the requests of ``records`` that carry their own counter delta
    (:func:`benchmarks.harness.engine.run_requests` with ``per_request``); None without drafts."""
    recs = [r for r in records if "delta" in r]
    return metrics.tau({"drafts": sum(r["delta"]["drafts"] for r in recs),
                        "accepted": sum(r["delta"]["accepted"] for r in recs)})


def summarize(method: str, k: int, batch_size: int, temperature: float,
              run: dict[str, Any]) -> RunResult:
    """The :class:`RunResult` of one :func:`benchmarks.harness.engine.run_requests` run.

    Args:
        method: the method's label.
        k: the k this row reports (a schedule's k at ``batch_size``): per-position acceptance
            keeps the first ``k`` positions (a schedule's engine counts up to its largest k).
        batch_size: requests in flight.
        temperature: sampling temperature.
        run: the run (τ per prompt kind when its records carry their own deltas).
    """
    recs = run["records"]
    n_tokens = sum(len(r["token_ids"]) for r in recs)
    lat = [r["latency_s"] for r in recs]
    delta = run["delta"]
    per_kind: dict[str, float] = {}
    if recs and "delta" in recs[0]:
        groups = {kind: [r for r in recs if r["kind"] == kind]
                  for kind in sorted({r["kind"] for r in recs})}
        groups["all image prompts"] = [r for r in recs if r["has_image"]]
        for kind, group in groups.items():
            tau = tau_of_records(group)
            if tau is not None:
                per_kind[kind] = tau
    return RunResult(
        method=method, k=k, batch_size=batch_size, temperature=temperature,
        seconds=run["seconds"], output_tokens=n_tokens, tokens_per_s=n_tokens / run["seconds"],
        latency_p50_s=percentile(lat, 0.5), latency_p90_s=percentile(lat, 0.9),
        tau=metrics.tau(delta), acceptance_rate=metrics.acceptance_rate(delta),
        acceptance_per_position=metrics.per_position_acceptance(delta, k), tau_per_kind=per_kind,
        num_drafts=int(delta["drafts"]))


def fill_comparisons(results: list[RunResult],
                     outputs: dict[tuple[str, int, int], list[list[int]]],
                     items: list[PromptItem], meta: dict[str, Any],
                     reference: str | None) -> None:
    """Fill speedups, analytic bounds, in-loop draft cost and greedy-equality verdicts in place.

    Args:
        results: every run (the ``none`` rows are the speedup baseline).
        outputs: ``(method, k, batch size) -> token ids per prompt`` of the temperature-0 runs.
        items: the prompts (for the ids of greedy mismatches).
        meta: the run's meta (``c``, ``target_itl_ms``).
        reference: the label speedups are also measured against.
    """
    base = {(r.batch_size, r.temperature): r for r in results if r.method == "none"}
    ref = {(r.k, r.batch_size, r.temperature): r for r in results if r.method == reference}
    c = meta.get("c")
    for r in results:
        b = base.get((r.batch_size, r.temperature))
        if b is not None and r.method != "none":
            r.speedup_vs_none = r.tokens_per_s / b.tokens_per_s
        rr = ref.get((r.k, r.batch_size, r.temperature))
        if rr is not None and r.method != reference:
            r.speedup_vs_reference = r.tokens_per_s / rr.tokens_per_s
        if c is not None and r.tau is not None:
            r.analytic_bound = r.tau / (1 + r.k * c)
        t_itl = meta.get("target_itl_ms")
        if r.batch_size == 1 and r.num_drafts and t_itl and r.k:
            # One request at a time: each verification step costs one target step (k+1 tokens
            # cost about one decode step here) plus k draft passes; the rest is the draft cost.
            step_ms = r.seconds * 1e3 / r.num_drafts
            r.draft_ms_in_loop = (step_ms - t_itl) / r.k
            r.c_in_loop = r.draft_ms_in_loop / t_itl
        if r.temperature == 0 and r.method != "none":
            mine = outputs.get((r.method, r.k, r.batch_size))
            theirs = outputs.get(("none", 0, r.batch_size))
            if mine is not None and theirs is not None:
                bad = [items[i].id for i, (a, o) in enumerate(zip(mine, theirs)) if a != o]
                r.greedy_equal = not bad
                r.greedy_mismatches = bad


def _f(x: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if x is None else f"{x:.{digits}f}{suffix}"


#: Target ITL change between the start and the end of a run above which the report warns.
DRIFT_WARN = 0.10


def drift_lines(meta: dict[str, Any]) -> list[str]:
    """The target's ITL measured first and last in the run (``target_itl_end_ms``): the baseline
    (no speculation) runs first, so a machine that speeds up or slows down during the run skews
    every speedup by about that ratio."""
    start, end = meta.get("target_itl_ms"), meta.get("target_itl_end_ms")
    if not start or not end:
        return []
    drift = end / start - 1
    line = (f"Target ITL at the start / end of the run: {start:.2f} / {end:.2f} ms "
            f"({drift:+.0%}).")
    if abs(drift) > DRIFT_WARN:
        line += (" **The machine's speed drifted by more than "
                 f"{DRIFT_WARN:.0%} during the run: speedups against the baseline (measured "
                 "first) are off by about that much; compare τ, and methods that ran close "
                 "together.**")
    return [line, ""]


def interpreter_lines(meta: dict[str, Any]) -> list[str]:
    """The warning a run on Model Runner V2 through Triton's interpreter carries
    (`VLLM_MASSV_MRV2_CPU=1`, `vllm_massv/mrv2_cpu.py`): its timings are not speeds."""
    if not meta.get("mrv2_cpu"):
        return []
    return ["**Model Runner V2 through Triton's interpreter (`VLLM_MASSV_MRV2_CPU=1`): the tok/s, "
            "latency, speedup, bound and c columns time interpreted Python kernels and are not "
            "speeds.** τ, acceptance and greedy equality are meaningful.", ""]


def markdown(results: list[RunResult], meta: dict[str, Any]) -> str:
    """``results.md``: the header (target, prompts, c, drift), one table row per run, the best-k
    tables of the k sweep and τ per prompt kind."""
    lines = [f"# Speculative decoding throughput ({meta['device']})", "",
             f"Target `{meta['target']}`; {meta['num_prompts']} prompts "
             f"({meta['num_image_prompts']} with an image), max {meta['max_tokens']} new tokens; "
             f"c = {_f(meta.get('c'), 3)} (drafter ITL {_f(meta.get('drafter_itl_ms'), 2)} ms / "
             f"target ITL {_f(meta.get('target_itl_ms'), 2)} ms, batch 1).", "",
             *drift_lines(meta), *interpreter_lines(meta),
             "| method | k | batch | temp | tok/s | p50 s | p90 s | τ | accept | per position "
             "| speedup vs none | vs reference | bound τ/(1+kc) | c in loop | greedy = none |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        pos = " ".join(f"{p:.2f}" for p in r.acceptance_per_position or []) or "-"
        eq = "-" if r.greedy_equal is None else ("yes" if r.greedy_equal else "**NO**")
        lines.append(
            f"| {r.method} | {r.k if r.tau is not None or r.method != 'none' else '-'} | "
            f"{r.batch_size} | {r.temperature:g} | {r.tokens_per_s:.1f} | "
            f"{r.latency_p50_s:.2f} | {r.latency_p90_s:.2f} | {_f(r.tau)} | "
            f"{_f(r.acceptance_rate)} | {pos} | {_f(r.speedup_vs_none, 2, '×')} | "
            f"{_f(r.speedup_vs_reference, 2, '×')} | {_f(r.analytic_bound, 2, '×')} | "
            f"{_f(r.c_in_loop, 3)} | {eq} |")
    lines += best_k_table(results, meta.get("sweep_methods") or [])
    kinds = sorted({k for r in results for k in r.tau_per_kind})
    if kinds:
        lines += ["", "τ per prompt kind (batch 1):", "",
                  "| method | k | temp | " + " | ".join(kinds) + " |",
                  "|---|---|---|" + "---|" * len(kinds)]
        for r in results:
            if r.tau_per_kind:
                lines.append(f"| {r.method} | {r.k} | {r.temperature:g} | " + " | ".join(
                    _f(r.tau_per_kind.get(k)) for k in kinds) + " |")
    return "\n".join(lines) + "\n"


def speedup_by_k(results: list[RunResult], method: str) -> dict[int, dict[int, float]]:
    """batch size -> {k: speedup over no speculation} of ``method`` at temperature 0."""
    out: dict[int, dict[int, float]] = {}
    for r in results:
        if r.method == method and r.temperature == 0 and r.speedup_vs_none is not None:
            out.setdefault(r.batch_size, {})[r.k] = r.speedup_vs_none
    return dict(sorted(out.items()))


def schedule_from_sweep(results: list[RunResult], method: str, max_batch: int = 256
                        ) -> tuple[tuple[int, int, int], ...]:
    """A k schedule from a k sweep (``--k-by-batch LABEL=auto``): at each swept batch size b_i
    (temperature 0) the k with the most output tokens/s, for batch sizes b_(i-1)+1 .. b_i (the
    last up to ``max_batch``). One noisy run picks it: close speedups are a coin toss.

    Raises:
        ValueError: ``method`` has no batch size with two or more k measured.
    """
    best: dict[int, int] = {}
    for b in sorted({r.batch_size for r in results if r.method == method}):
        rows = [r for r in results if r.method == method and r.batch_size == b
                and r.temperature == 0]
        if len({r.k for r in rows}) > 1:
            best[b] = max(rows, key=lambda r: r.tokens_per_s).k
    if not best:
        raise ValueError(f"no k sweep of {method!r} to choose k from (give --k-sweep and "
                         "--sweep-methods)")
    out, lo = [], 1
    for i, (b, k) in enumerate(best.items()):
        hi = max_batch if i == len(best) - 1 else b
        if out and out[-1][2] == k:
            out[-1] = (out[-1][0], hi, k)
        else:
            out.append((lo, hi, k))
        lo = hi + 1
    return tuple(out)


def best_k_table(results: list[RunResult], sweep_methods: list[str]) -> list[str]:
    """Markdown lines: per k-sweep method, its speedup over no speculation for every k and
    batch size at temperature 0, the best k per batch size, and the method's schedule run
    (``LABEL (k by batch size)``) when there is one. Empty without a sweep."""
    lines: list[str] = []
    for m in sweep_methods:
        table = speedup_by_k(results, m)
        ks = sorted({k for row in table.values() for k in row})
        if len(ks) < 2:
            continue
        sched = speedup_by_k(results, m + SCHEDULE_SUFFIX)
        lines += ["", f"Best k per batch size, {m} (speedup over no speculation, temperature 0; "
                  "one run, so close values are within noise):", "",
                  "| batch | " + " | ".join(f"k={k}" for k in ks) + " | best k |"
                  + (" k by batch size (its k) |" if sched else ""),
                  "|---|" + "---|" * (len(ks) + 1 + bool(sched))]
        for b, row in table.items():
            best = max(row, key=row.get)
            cells = [("**" + _f(row[k], 2, "×") + "**") if k == best else _f(row.get(k), 2, "×")
                     for k in ks]
            extra = ""
            if sched:
                (kb, v), = sched.get(b, {0: None}).items()
                extra = f" {_f(v, 2, '×')} ({kb}) |" if v is not None else " - |"
            lines.append(f"| {b} | " + " | ".join(cells) + f" | {best} |" + extra)
    return lines
