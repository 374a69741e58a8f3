"""The one reader of vLLM's speculative-decoding counters, for the offline engine and the server.

Two sources hold the same cumulative counters under slightly different names:

* the offline engine, ``LLM.get_metrics()`` (needs ``disable_log_stats=False``):
  ``vllm:spec_decode_num_drafts`` etc. (:func:`engine_metrics`);
* the OpenAI-compatible server's Prometheus ``/metrics`` text, where counters carry a ``_total``
  suffix and the per-position counts one sample per ``position`` label (:func:`parse_prometheus`,
  :func:`fetch_prometheus`).

:func:`counters` turns either into one dict ``{"drafts", "draft_tokens", "accepted",
"accepted_per_pos"}``; :func:`delta` subtracts two of them, and :func:`tau`,
:func:`acceptance_rate`, :func:`per_position_acceptance` and :func:`summary` read a delta.
τ follows vLLM's convention: 1 + accepted / drafts (tokens per verification step).
"""

from __future__ import annotations

import re
from typing import Any

#: Counter name (offline engine) per key of :func:`counters`.
COUNTERS = {
    "drafts": "vllm:spec_decode_num_drafts",
    "draft_tokens": "vllm:spec_decode_num_draft_tokens",
    "accepted": "vllm:spec_decode_num_accepted_tokens",
}
#: Accepted tokens per draft position (a vector offline; one labelled sample each in Prometheus).
PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos"
#: The same counters in Prometheus text (counters are exported with a ``_total`` suffix).
PROMETHEUS_COUNTERS = {key: name + "_total" for key, name in COUNTERS.items()}
PROMETHEUS_PER_POSITION = PER_POSITION + "_total"
#: Prefix of every spec-decode metric.
PREFIX = "vllm:spec_decode"

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_POSITION = re.compile(r'position="(\d+)"')


def engine_metrics(llm: Any) -> dict[str, Any]:
    """vLLM's global spec-decode metrics of an offline engine, cumulative since it started.

    Args:
        llm: a ``vllm.LLM`` started with ``disable_log_stats=False``.

    Returns:
        ``{metric name: value}`` for every ``vllm:spec_decode*`` metric: a number for a counter,
        a list (one entry per draft position) for a vector. Empty without speculation.
    """
    out: dict[str, Any] = {}
    for m in llm.get_metrics():
        if m.name.startswith(PREFIX):
            out[m.name] = list(m.values) if hasattr(m, "values") else m.value
    return out


def parse_prometheus(text: str) -> dict[str, Any]:
    """Prometheus exposition text (a server's ``/metrics``) as numbers.

    Args:
        text: the ``/metrics`` body.

    Returns:
        ``{metric name: value summed over its label sets}`` for every metric, except
        :data:`PROMETHEUS_PER_POSITION`: a list of its samples in ``position`` order.
    """
    out: dict[str, Any] = {}
    per_pos: dict[int, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if name == PROMETHEUS_PER_POSITION:
            pos = _POSITION.search(labels)
            if pos:
                per_pos[int(pos.group(1))] = per_pos.get(int(pos.group(1)), 0.0) + value
            continue
        out[name] = out.get(name, 0.0) + value
    if per_pos:
        out[PROMETHEUS_PER_POSITION] = [per_pos[i] for i in sorted(per_pos)]
    return out


def fetch_prometheus(url: str, timeout: float = 30.0) -> dict[str, Any]:
    """GET ``URL/metrics`` of a running server (standard library only) and parse it.

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8000``.
        timeout: seconds.

    Returns:
        :func:`parse_prometheus` of the body.

    Raises:
        urllib.error.URLError: the server did not answer.
    """
    import urllib.request

    with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout) as resp:
        return parse_prometheus(resp.read().decode())


def counters(metrics: dict[str, Any]) -> dict[str, Any]:
    """The spec-decode counters of either source, under one set of keys.

    Args:
        metrics: :func:`engine_metrics` or :func:`parse_prometheus` output (or ``{}``: zeros).

    Returns:
        ``{"drafts", "draft_tokens", "accepted": number, "accepted_per_pos": list}``; a
        missing counter reads 0 and a missing per-position vector ``[]``.
    """
    out: dict[str, Any] = {}
    for key, name in COUNTERS.items():
        out[key] = metrics.get(name, metrics.get(PROMETHEUS_COUNTERS[key], 0))
    out["accepted_per_pos"] = list(metrics.get(PER_POSITION)
                                   or metrics.get(PROMETHEUS_PER_POSITION) or [])
    return out


def offline_counters(llm: Any) -> dict[str, Any]:
    """:func:`counters` of an offline engine (zeros without speculation)."""
    return counters(engine_metrics(llm))


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What happened between two :func:`counters` readings of the same engine or server.

    Args:
        before: the earlier reading; its ``accepted_per_pos`` may be empty (counted as zeros).
        after: the later reading.

    Returns:
        the same keys as :func:`counters`, each ``after - before``.
    """
    d = {k: after[k] - before[k] for k in COUNTERS}
    b = before["accepted_per_pos"] or [0] * len(after["accepted_per_pos"])
    d["accepted_per_pos"] = [a - x for a, x in zip(after["accepted_per_pos"], b)]
    return d


def tau(d: dict[str, Any]) -> float | None:
    """Mean acceptance length, vLLM's convention: 1 + accepted / drafts (None without drafts)."""
    return 1 + d["accepted"] / d["drafts"] if d["drafts"] else None


def acceptance_rate(d: dict[str, Any]) -> float | None:
    """accepted / draft tokens of a :func:`delta` (None without draft tokens)."""
    return d["accepted"] / d["draft_tokens"] if d["draft_tokens"] else None


def per_position_acceptance(d: dict[str, Any], k: int | None = None) -> list[float] | None:
    """Accepted / drafts at each draft position of a :func:`delta` (None without drafts).

    Args:
        d: a :func:`delta`.
        k: keep the first ``k`` positions only (an engine with a k schedule counts positions up
            to its largest k); None or 0 keeps all.
    """
    if not d["drafts"]:
        return None
    return [a / d["drafts"] for a in d["accepted_per_pos"][:k or None]]


def summary(d: dict[str, Any]) -> dict[str, Any]:
    """The figures of a :func:`delta`, as the load benchmark and the serving demo report them.

    Returns:
        ``{"drafts", "draft_tokens", "accepted_tokens": int, "tau", "acceptance_rate": float
        or None, "per_position_acceptance": list or None}`` (None when nothing was drafted,
        e.g. without speculation).
    """
    return {
        "drafts": int(d["drafts"]), "draft_tokens": int(d["draft_tokens"]),
        "accepted_tokens": int(d["accepted"]),
        "tau": tau(d), "acceptance_rate": acceptance_rate(d),
        "per_position_acceptance": per_position_acceptance(d),
    }


def prometheus_summary(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """:func:`summary` between two :func:`parse_prometheus` snapshots of one server (``before``
    may be ``{}``: totals since the server started)."""
    return summary(delta(counters(before), counters(after)))
