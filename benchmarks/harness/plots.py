"""PNG plots of a throughput run, one function per plot; :func:`plots` writes them all.

Every method keeps one colour (tab10) and one marker in every plot; with more than
:data:`MAX_SERIES` methods a plot gets several rows of panels, each with the reference method.
matplotlib is imported inside the functions (the Agg backend, chosen in :func:`plots`), so the
engine side never loads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness.methods import SCHEDULE_SUFFIX
from benchmarks.harness.report import RunResult, speedup_by_k

#: Plot style: at most this many series per axes (more methods: more panels, each with the
#: reference); every method keeps one colour (tab10) and one marker in every plot.
MAX_SERIES = 7
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<")


@dataclass
class _Context:
    """What every plot needs: the speculative rows, the methods in run order, their styles and
    panels, and each method's main k."""

    results: list[RunResult]
    spec: list[RunResult]
    methods: list[str]
    style: dict[str, tuple[Any, str]]
    panels: list[list[str]]
    main_k: dict[str, int]

    def main_row(self, r: RunResult) -> bool:
        """Not a k-sweep point (a schedule run's k changes with the batch size)."""
        return r.k == self.main_k[r.method] or r.method.endswith(SCHEDULE_SUFFIX)

    def greedy_b1(self, m: str) -> RunResult | None:
        """``m``'s batch-1 greedy row at its main k."""
        return next((r for r in self.spec if r.method == m and r.batch_size == 1
                     and r.temperature == 0 and self.main_row(r)), None)


def plots(results: list[RunResult], out: Path, reference: str | None = None) -> list[str]:
    """Write the PNG plots into ``out``; returns their file names.

    * ``tau_vs_k.png``: τ against k (batch 1, T = 0);
    * ``speedup_vs_batch.png``: speedup over no speculation against batch size, one column per
      temperature;
    * ``acceptance_per_position.png``: acceptance rate at each draft position (batch 1, T = 0);
    * ``tau_per_kind.png``: τ per prompt kind, grouped bars (batch 1, T = 0);
    * ``speedup_vs_k.png``: speedup against k, one line per batch size, one panel per method
      with a k sweep; stars: the method's ``(k by batch size)`` run at the k it used.

    With more than :data:`MAX_SERIES` methods each plot gets several rows of panels, every row
    with ``reference`` (the blind drafter) for comparison. Each method's k is its main k (the k
    with the most settings: not a k-sweep point).
    """
    import matplotlib

    matplotlib.use("Agg")

    spec = [r for r in results if r.tau is not None]
    methods = list(dict.fromkeys(r.method for r in spec))
    if not methods:
        return []
    ctx = _Context(results, spec, methods, _styles(methods), _panels(methods, reference),
                   {m: _main_k([r for r in spec if r.method == m]) for m in methods})
    written = [plot_tau_vs_k(ctx, out), plot_speedup_vs_batch(ctx, out),
               plot_acceptance_per_position(ctx, out), plot_tau_per_kind(ctx, out),
               plot_speedup_vs_k(ctx, out)]
    return [name for name in written if name is not None]


def plot_tau_vs_k(ctx: _Context, out: Path) -> str:
    """``tau_vs_k.png``: τ against k at batch 1, temperature 0, with the limit k + 1."""
    import matplotlib.pyplot as plt

    fig, axes = _grid(plt, len(ctx.panels), 1)
    for row, group in zip(axes, ctx.panels):
        ax = row[0]
        for m in group:
            pts = sorted({(r.k, r.tau) for r in ctx.spec if r.method == m and r.batch_size == 1
                          and r.temperature == 0})
            if pts:
                _line(ax, ctx.style, m, [p[0] for p in pts], [p[1] for p in pts])
        ks = sorted({r.k for r in ctx.spec})
        ax.plot(ks, [k + 1 for k in ks], color="grey", linestyle=":", linewidth=1,
                label="limit k + 1")
        ax.set_xlabel("k (num_speculative_tokens)")
        ax.set_ylabel("τ (tokens per verification step)")
        ax.set_xticks(ks)
        _legend(ax)
    axes[0][0].set_title("Acceptance length τ vs k (batch 1, temperature 0)")
    return _save(fig, out / "tau_vs_k.png")


def plot_speedup_vs_batch(ctx: _Context, out: Path) -> str:
    """``speedup_vs_batch.png``: speedup over no speculation against batch size, one column per
    temperature (main k rows only)."""
    import matplotlib.pyplot as plt

    temps = sorted({r.temperature for r in ctx.spec})
    fig, axes = _grid(plt, len(ctx.panels), len(temps), sharey=True)
    for row, group in zip(axes, ctx.panels):
        for ax, temp in zip(row, temps):
            for m in group:
                pts = sorted((r.batch_size, r.speedup_vs_none) for r in ctx.spec
                             if r.method == m and r.temperature == temp and ctx.main_row(r)
                             and r.speedup_vs_none is not None)
                if pts:
                    _line(ax, ctx.style, m, [p[0] for p in pts], [p[1] for p in pts],
                          label=m if m.endswith(SCHEDULE_SUFFIX) else f"{m} (k={ctx.main_k[m]})")
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_xticks(sorted({r.batch_size for r in ctx.spec}))
            ax.set_xlabel("batch size (requests in flight)")
            ax.set_title(f"temperature {temp:g}" + (" (greedy)" if temp == 0 else ""))
        row[0].set_ylabel("speedup vs no speculation\n(× output tokens/s)")
        _legend(row[-1])
    return _save(fig, out / "speedup_vs_batch.png")


def plot_acceptance_per_position(ctx: _Context, out: Path) -> str:
    """``acceptance_per_position.png``: acceptance rate at each draft position (batch 1,
    temperature 0, main k)."""
    import matplotlib.pyplot as plt

    fig, axes = _grid(plt, len(ctx.panels), 1)
    for row, group in zip(axes, ctx.panels):
        ax = row[0]
        for m in group:
            r = ctx.greedy_b1(m)
            if r is not None and r.acceptance_per_position:
                _line(ax, ctx.style, m, list(range(1, len(r.acceptance_per_position) + 1)),
                      r.acceptance_per_position, label=f"{m} (k={r.k})")
        ax.set_xlabel("draft position")
        ax.set_ylabel("acceptance rate\n(accepted / drafts)")
        ax.set_ylim(0, 1.02)
        ax.xaxis.get_major_locator().set_params(integer=True)
        _legend(ax)
    axes[0][0].set_title("Acceptance per draft position (batch 1, temperature 0)")
    return _save(fig, out / "acceptance_per_position.png")


def plot_tau_per_kind(ctx: _Context, out: Path) -> str | None:
    """``tau_per_kind.png``: τ per prompt kind, grouped bars (batch 1, temperature 0); None
    (nothing written) without per-kind τ."""
    import matplotlib.pyplot as plt

    kinds = sorted({kd for r in ctx.spec for kd in r.tau_per_kind})
    if not kinds:
        return None
    fig, axes = _grid(plt, len(ctx.panels), 1, width=max(7.0, 0.9 * len(kinds) + 3))
    for row, group in zip(axes, ctx.panels):
        ax = row[0]
        rows = [(m, ctx.greedy_b1(m)) for m in group]
        rows = [(m, r) for m, r in rows if r is not None and r.tau_per_kind]
        width = 0.8 / max(1, len(rows))
        for j, (m, r) in enumerate(rows):
            xs = [i + (j - (len(rows) - 1) / 2) * width for i in range(len(kinds))]
            ax.bar(xs, [r.tau_per_kind.get(kd, 0.0) for kd in kinds], width,
                   color=ctx.style[m][0], label=f"{m} (k={r.k})", edgecolor="black",
                   linewidth=0.3)
        ax.set_xticks(range(len(kinds)))
        ax.set_xticklabels(kinds, rotation=20, ha="right")
        ax.set_ylabel("τ (tokens per verification step)")
        ax.set_ylim(bottom=1.0)
        _legend(ax)
    axes[0][0].set_title("τ per prompt kind (batch 1, temperature 0)")
    return _save(fig, out / "tau_per_kind.png")


def plot_speedup_vs_k(ctx: _Context, out: Path) -> str | None:
    """``speedup_vs_k.png``: speedup against k, one line per batch size, one panel per method
    with a k sweep; stars: its ``(k by batch size)`` run at the k it used. None (nothing
    written) without a k sweep."""
    import matplotlib
    import matplotlib.pyplot as plt

    swept = [m for m in ctx.methods if not m.endswith(SCHEDULE_SUFFIX) and len(
        {r.k for r in ctx.spec if r.method == m and r.temperature == 0}) > 1]
    if not swept:
        return None
    fig, axes = _grid(plt, 1, len(swept), sharey=True)
    cmap = matplotlib.colormaps["viridis"]
    for ax, m in zip(axes[0], swept):
        table = speedup_by_k(ctx.results, m)
        sched = speedup_by_k(ctx.results, m + SCHEDULE_SUFFIX)
        starred = False
        for i, (b, row) in enumerate(table.items()):
            colour = cmap(i / max(1, len(table) - 1) * 0.9)
            ax.plot(sorted(row), [row[k] for k in sorted(row)], color=colour,
                    marker=MARKERS[i % len(MARKERS)], label=f"batch {b}")
            for kb, v in sched.get(b, {}).items():
                ax.plot([kb], [v], color=colour, marker="*", markersize=13,
                        markeredgecolor="black", linestyle="none",
                        label=f"{m}{SCHEDULE_SUFFIX}\n(star: its k, colour: batch)"
                        if not starred else None)
                starred = True
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xlabel("k (num_speculative_tokens)")
        ax.set_title(m)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0][0].set_ylabel("speedup vs no speculation\n(temperature 0)")
    _legend(axes[0][-1])
    return _save(fig, out / "speedup_vs_k.png")


def _styles(methods: list[str]) -> dict[str, tuple[Any, str]]:
    """method -> (tab10 colour, marker), fixed by the method's order in the run."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {m: (cmap(i % 10), MARKERS[(i + i // 10) % len(MARKERS)])
            for i, m in enumerate(methods)}


def _panels(methods: list[str], reference: str | None) -> list[list[str]]:
    """Methods split into groups of at most :data:`MAX_SERIES`, the reference in every group."""
    if len(methods) <= MAX_SERIES:
        return [methods]
    ref = [reference] if reference in methods else []
    others = [m for m in methods if m not in ref]
    n = math.ceil(len(others) / (MAX_SERIES - len(ref)))
    size = math.ceil(len(others) / n)
    return [ref + others[i:i + size] for i in range(0, len(others), size)]


def _main_k(rows: list[RunResult]) -> int:
    ks = [r.k for r in rows]
    return max(dict.fromkeys(ks), key=ks.count)


def _grid(plt: Any, nrows: int, ncols: int, sharey: bool = False, width: float | None = None):
    fig, axes = plt.subplots(nrows, ncols, figsize=(width or 4.2 * ncols + 3, 3.4 * nrows),
                             squeeze=False, sharey=sharey)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    return fig, axes


def _line(ax: Any, style: dict[str, tuple[Any, str]], method: str, xs: list[Any],
          ys: list[Any], label: str | None = None) -> None:
    colour, marker = style[method]
    ax.plot(xs, ys, color=colour, marker=marker, markersize=6, linewidth=1.5,
            label=label or method)


def _legend(ax: Any) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)


def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path.name
