"""Offline throughput of speculative decoding methods, side by side in one run (vLLM engine).

Every method runs the same prompts through vLLM's offline engine with the same target:

* ``none``                 -- the target alone (the baseline every speedup refers to);
* ``ngram``                -- vLLM's prompt-lookup proposer;
* ``draft_model:PATH``     -- a stock vLLM draft model (for a text LM: its positions shift after
                              images, because stock vLLM feeds it the target's token layout);
* ``massv:PATH``           -- a MASSV drafter through the plugin's proposer (a drafter made with
                              ``massv init --projector none`` is the fair text-only baseline);
* ``msd:PATH``             -- an MSD drafter (EAGLE-style head, ``massv init --method msd``),
                              served with vLLM's EAGLE proposer (``method: eagle``) through the
                              plugin;
* ``eagle3:PATH``          -- an EAGLE-3 head (speculators ``eagle3`` format, ``massv init
                              --method eagle3``, or vLLM's native EAGLE-3 layout), served by stock
                              vLLM (``method: eagle3``); on an M-RoPE target the plugin gives the
                              head 1-D absolute positions (``vllm_massv/patches/v1_eagle_positions.py``);
* ``eagle3-stock:PATH``    -- the same head with stock vLLM's positions on an M-RoPE target (the
                              temporal M-RoPE row, and draft KV slots computed from it): the
                              engine is started with ``VLLM_MASSV_TEST_STOCK_EAGLE_POSITIONS=1``,
                              to measure what the fix is worth.

For each method and each k (``--k``), one engine is started; inside it every batch size
(``--batch-sizes``: requests kept in flight, continuous batching) and temperature
(``--temperatures``) is run. The k sweep (``--k-sweep``, for ``--sweep-methods``) runs each extra
k at temperature 0 and the ``--sweep-batch-sizes`` (which every method also runs at temperature
0): ``results.md`` then gives the best k per batch size. ``--k-by-batch LABEL=SCHEDULE`` adds
the method ``LABEL (k by batch size)``, served with vLLM's batch-size schedule for k
(``num_speculative_tokens_per_batch_size``: the scheduler picks each step's k from the number of
scheduled requests); its rows carry the k the schedule gives at their batch size.

Reported per run: output tokens/s, request latency p50/p90, τ (vLLM's convention, 1 +
accepted/drafts), acceptance rate, per-position acceptance, speedup over no speculation (same batch
size and temperature) and over the ``--reference`` method (the blind drafter), and the analytic
bound τ/(1 + k·c) (Leviathan et al. 2023, eq. 1 with the drafter's step cost counted k times per
verification) where c = drafter ITL / target ITL, both measured alone at batch 1 in this run. At
batch 1 the counters are read after every request, which gives τ per prompt kind, and the draft cost
inside the speculative loop is estimated as (time per verification step - target ITL) / k, reported
as ``c_in_loop`` (relative to the target ITL): on a CPU with tiny models it includes the proposer's
fixed per-pass overhead. Greedy outputs of every method are compared token by token with no
speculation at the same batch size; a mismatch is reported and makes the run exit with status 1.

Outputs (``--out``): ``results.json`` (every run and setting), ``results.md`` (tables) and PNG
plots (:func:`plots`: τ vs k, speedup vs batch size per temperature, per-position acceptance, τ
per prompt kind; ``--replot results.json`` redraws them without an engine). On the CPU testbed
(``--testbed DIR``, see ``benchmarks/testbed/``) the methods default to the testbed's models.
On a GPU pass real models instead, e.g.::

    python benchmarks/throughput.py --target Qwen/Qwen2.5-VL-7B-Instruct \\
        --method blind=massv:./qwen2.5-1.5b-massv-none --method massv=massv:./massv-drafter \\
        --drafter-lm Qwen/Qwen2.5-1.5B-Instruct --llava-json eval.json --reference blind
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness.engine import (  # noqa: E402
    build_engine_args,
    decode_itl,
    device_name,
    engine_env,
    make_llm,
    plain_lm,
    run_requests,
    shutdown,
)
from benchmarks.harness.methods import (  # noqa: E402
    SCHEDULE_SUFFIX,
    Method,
    parse_schedule,
    testbed_methods,
)
from benchmarks.harness.paths import portable  # noqa: E402
from benchmarks.harness.plots import plots  # noqa: E402
from benchmarks.harness.prompts import (  # noqa: E402
    PromptItem,
    llava_prompts,
    render_prompts,
    testbed_prompts,
)
from benchmarks.harness.report import (  # noqa: E402
    RunResult,
    fill_comparisons,
    markdown,
    schedule_from_sweep,
    summarize,
)
from vllm_massv import envs, mrv2_cpu  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--target", help="target VLM (default with --testbed: its padded target)")
    p.add_argument("--method", action="append", default=[], metavar="LABEL=SPEC",
                   help="none | ngram | draft_model:PATH | massv:PATH | msd:PATH | eagle3:PATH | "
                        "eagle3-stock:PATH (repeatable; default with --testbed: every testbed "
                        "method)")
    p.add_argument("--reference", default=None,
                   help="label of the method speedups are also measured against (default: the "
                        "first massv method, on the testbed the blind LM with projector none)")
    p.add_argument("--drafter-lm", default=None,
                   help="model whose batch-1 ITL gives c (default: the reference's model)")
    src = p.add_argument_group("prompts (one of)")
    src.add_argument("--testbed", type=Path, default=None,
                     help="testbed folder (models/ and data/; see benchmarks/testbed/README.md)")
    src.add_argument("--llava-json", type=Path, default=None)
    src.add_argument("--image-root", type=Path, default=None)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--k", default="4", help="comma-separated k values (default 4)")
    p.add_argument("--k-sweep", default="",
                   help="extra k values run at temperature 0 and the sweep batch sizes only "
                        "(e.g. 1,2,3,5,6)")
    p.add_argument("--sweep-methods", default="",
                   help="comma-separated labels the k sweep runs for (default: all spec methods)")
    p.add_argument("--sweep-batch-sizes", default="1",
                   help="batch sizes of the k sweep (default 1); every method also runs them "
                        "at temperature 0, so each has a speedup there (e.g. 1,4,8,16)")
    p.add_argument("--k-by-batch", action="append", default=[], metavar="LABEL=SCHEDULE",
                   help="also run method LABEL with vLLM's batch-size schedule for k, e.g. "
                        "'MASSV=1-1:6,2-8:4,9-256:3' (batch sizes 1-1 draft 6 tokens, ...), or "
                        "'MASSV=auto': the best k per sweep batch size measured in this run "
                        "(runs last; repeatable)")
    p.add_argument("--batch-sizes", default="1,4,8")
    p.add_argument("--temperatures", default="0,1")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "throughput")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra vllm.LLM argument (VALUE parsed as JSON when it parses)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--replot", type=Path, default=None, metavar="RESULTS_JSON",
                   help="only redraw the plots of an earlier run's results.json into --out "
                        "(no engine)")
    return p


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def resolve(args: argparse.Namespace) -> tuple[str, list[Method], list[PromptItem]]:
    """Target, methods and prompts from the arguments (``SystemExit`` with a message on error)."""
    from transformers import AutoTokenizer

    methods = [Method.parse(m) for m in args.method]
    if args.testbed is not None:
        from benchmarks.testbed import assets

        paths = assets.ensure(args.testbed)
        target = args.target or str(paths["target"])
        methods = methods or testbed_methods(paths)
        items = testbed_prompts(paths["data"], args.num_prompts)
    elif args.llava_json is not None:
        if not args.target or not methods:
            raise SystemExit("--llava-json needs --target and at least one --method")
        target = args.target
        items = llava_prompts(args.llava_json, args.num_prompts, args.image_root)
    else:
        raise SystemExit("give --testbed DIR or --llava-json FILE (see --help)")
    if not any(m.kind == "none" for m in methods):
        methods.insert(0, Method("none", "none"))
    for item in args.k_by_batch:
        label, sep, text = item.partition("=")
        base = next((m for m in methods if m.label == label), None)
        if not sep or base is None or base.kind in ("none", "ngram"):
            raise SystemExit(f"--k-by-batch {item!r}: expected LABEL=SCHEDULE with LABEL one of "
                             f"the drafter methods: {[m.label for m in methods if m.model]}")
        try:
            schedule = None if text.strip() == "auto" else parse_schedule(text)
        except ValueError as e:
            raise SystemExit(f"--k-by-batch: {e}") from None
        methods.append(Method(label + SCHEDULE_SUFFIX, base.kind, base.model, schedule))
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"duplicate method labels: {labels}")
    tokenizer = AutoTokenizer.from_pretrained(target)
    return target, methods, render_prompts(items, tokenizer)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Every method, stock ones included, gets the CPU rejection-sampler fix
    # (vllm_massv/patches/v1_cpu_sampler.py): without it, stock methods at temperature > 0 verify
    # against garbage on CPU.
    os.environ.setdefault(envs.FIX_CPU_SAMPLER, "1")
    if args.replot is not None:
        return replot(args.replot, args.out)
    from tqdm import tqdm

    target, methods, items = resolve(args)
    engine_args = build_engine_args(args.engine_arg)
    plan = make_plan(args, methods)
    args.out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"target": target, "num_prompts": len(items),
                            "num_image_prompts": sum(it.has_image for it in items),
                            "max_tokens": args.max_tokens, "engine_args": engine_args,
                            "methods": [{**asdict(m), "engine_env": m.engine_env()}
                                        for m in methods], "reference": plan.reference,
                            "sweep_methods": plan.sweep_methods}
    meta["device"] = device_name()
    meta["mrv2_cpu"] = mrv2_cpu.activate()  # VLLM_MASSV_MRV2_CPU=1: timings are not speeds
    # c: the drafter's and the target's inter-token latency, each alone at batch 1.
    ref_method = next((m for m in methods if m.label == plan.reference), None)
    drafter_lm = args.drafter_lm or (ref_method.model if ref_method else None)
    text_prompt = next((it.inputs["prompt"] for it in items if not it.has_image),
                       items[0].inputs["prompt"])
    bar = tqdm(total=len(plan.runs) + (3 if drafter_lm else 0), disable=args.no_progress,
               desc="engines")
    if drafter_lm:
        meta.update(measure_c(target, drafter_lm, engine_args, text_prompt, bar))
    results, outputs, failures = run_plan(plan, target, items, engine_args, args.max_tokens,
                                          meta, bar)
    if drafter_lm:   # the target's ITL again: how much the machine drifted during the run
        meta["target_itl_end_ms"] = decode_itl(target, engine_args, text_prompt) * 1e3
        bar.update()
    bar.close()
    meta["failures"] = failures
    fill_comparisons(results, outputs, items, meta, plan.reference)
    return write_outputs(args.out, results, meta, plan.reference, failures)


def replot(results_json: Path, out: Path) -> int:
    """``--replot``: redraw the plots of an earlier run's ``results.json`` into ``out``."""
    data = json.loads(results_json.read_text())
    out.mkdir(parents=True, exist_ok=True)
    names = plots([RunResult(**r) for r in data["results"]], out, data["meta"].get("reference"))
    print(f"wrote {', '.join(names)} to {out}")
    return 0


@dataclass
class Plan:
    """The engines of a run, in order: ``runs`` holds (method, k, [(batch size, temperature)])
    per engine; ``max_num_seqs`` is the largest batch size of any of them."""

    runs: list[tuple[Method, int, list[tuple[int, float]]]]
    reference: str | None
    sweep_methods: list[str]
    max_num_seqs: int


def make_plan(args: argparse.Namespace, methods: list[Method]) -> Plan:
    """One engine per method and k of ``--k`` at every setting (``--batch-sizes`` x
    ``--temperatures``, plus the sweep batch sizes at temperature 0), then one per extra k of
    ``--k-sweep`` (sweep methods only) at the sweep batch sizes, temperature 0. A schedule method
    (``--k-by-batch``) runs once, at the first k."""
    ks, sweep = _ints(args.k), [k for k in _ints(args.k_sweep) if k not in _ints(args.k)]
    batch_sizes, temps = _ints(args.batch_sizes), [float(t) for t in args.temperatures.split(",")]
    sweep_batches = _ints(args.sweep_batch_sizes)
    settings_all = [(b, t) for t in temps for b in batch_sizes] + [
        (b, 0.0) for b in sweep_batches if (b, 0.0) not in {(b, t) for t in temps
                                                             for b in batch_sizes}]
    spec_methods = [m for m in methods if m.kind != "none"]
    reference = args.reference or next((m.label for m in spec_methods if m.kind == "massv"),
                                       None)
    sweep_labels = ([s.strip() for s in args.sweep_methods.split(",") if s.strip()]
                    or [m.label for m in spec_methods])
    runs: list[tuple[Method, int, list[tuple[int, float]]]] = []
    for m in methods:
        if m.kind == "none":
            runs.append((m, 0, settings_all))
            continue
        scheduled = m.label.endswith(SCHEDULE_SUFFIX)
        for k in ks[:1] if scheduled else ks:
            runs.append((m, k, settings_all))
        if m.label in sweep_labels and not scheduled:
            runs += [(m, k, [(b, 0.0) for b in sweep_batches]) for k in sweep]
    swept = [m.label for m in methods if m.label in sweep_labels and sweep
             and not m.label.endswith(SCHEDULE_SUFFIX)]
    return Plan(runs, reference, swept, max(batch_sizes + sweep_batches))


def measure_c(target: str, drafter_lm: str, engine_args: dict[str, Any], prompt: str,
              bar: Any) -> dict[str, Any]:
    """The target's and the drafter's ITL, each alone at batch 1 in its own engine, and their
    ratio c (the meta keys ``target_itl_ms``, ``drafter_itl_ms``, ``c``, ``drafter_lm``)."""
    t_itl = decode_itl(target, engine_args, prompt)
    bar.update()
    with tempfile.TemporaryDirectory() as tmp:  # the drafter alone, not its verifier
        d_itl = decode_itl(plain_lm(drafter_lm, Path(tmp) / "drafter"), engine_args, prompt)
    bar.update()
    return dict(target_itl_ms=t_itl * 1e3, drafter_itl_ms=d_itl * 1e3, c=d_itl / t_itl,
                drafter_lm=drafter_lm)


def run_plan(plan: Plan, target: str, items: list[PromptItem], engine_args: dict[str, Any],
             max_tokens: int, meta: dict[str, Any], bar: Any
             ) -> tuple[list[RunResult], dict[tuple[str, int, int], list[list[int]]], list[str]]:
    """Run every engine of ``plan``; a method that fails to start is recorded in the failures
    and the others still run.

    Returns:
        (results, temperature-0 token ids per (method, k, batch size), failures). A
        ``LABEL=auto`` schedule gets its schedule from the results so far, recorded in
        ``meta["k_by_batch_auto"]``.
    """
    results: list[RunResult] = []
    outputs: dict[tuple[str, int, int], list[list[int]]] = {}
    failures: list[str] = []
    for method, k, settings in plan.runs:
        if method.label.endswith(SCHEDULE_SUFFIX) and method.schedule is None:
            base = method.label[:-len(SCHEDULE_SUFFIX)]
            try:   # `LABEL=auto`: the best k per batch size measured so far in this run
                method = replace(method, schedule=schedule_from_sweep(results, base))
            except ValueError as e:
                failures.append(f"{method.label}: {e}")
                bar.update()
                continue
            meta.setdefault("k_by_batch_auto", {})[method.label] = method.schedule
        bar.set_postfix_str(f"{method.label} k={k}")
        try:
            rows = run_method(method, k, settings, target, items, engine_args, max_tokens,
                              plan.max_num_seqs)
        except EngineStartError as e:  # one broken method must not lose the others' results
            failures.append(f"{method.label} k={k}: {e}"[:2000])
            bar.update()
            continue
        for res, token_ids in rows:
            if res.temperature == 0:
                outputs[(res.method, res.k, res.batch_size)] = token_ids
            results.append(res)
        bar.update()
    return results, outputs, failures


class EngineStartError(Exception):
    """A method's engine did not start (the message names the exception)."""


def run_method(method: Method, k: int, settings: list[tuple[int, float]], target: str,
               items: list[PromptItem], engine_args: dict[str, Any], max_tokens: int,
               max_num_seqs: int) -> list[tuple[RunResult, list[list[int]]]]:
    """One engine for ``method`` at ``k``: a short warm-up, then every (batch size,
    temperature) of ``settings`` over all ``items``.

    Returns:
        per setting, its :class:`RunResult` (k: the method's k at that batch size) and the
        token ids per prompt.

    Raises:
        EngineStartError: the engine did not start.
    """
    with engine_env(method.engine_env()):   # the engine-core process inherits it at start
        try:
            llm = make_llm(target, method.speculative_config(k), max_num_seqs=max_num_seqs,
                           engine_args=engine_args)
        except Exception as e:
            raise EngineStartError(f"{type(e).__name__}: {e}") from e
        rows = []
        try:
            run_requests(llm, items[:2], batch_size=2, temperature=0.0, max_tokens=8)
            for b, temp in settings:
                run = run_requests(llm, items, batch_size=b, temperature=temp,
                                   max_tokens=max_tokens, per_request=b == 1)
                res = summarize(method.label, method.k_at(b, k), b, temp, run)
                rows.append((res, [r["token_ids"] for r in run["records"]]))
        finally:
            shutdown(llm)
    return rows


def write_outputs(out: Path, results: list[RunResult], meta: dict[str, Any],
                  reference: str | None, failures: list[str]) -> int:
    """Write ``results.json``, ``results.md`` and the plots, print the report and the problems.

    Returns:
        the exit status: 1 on a greedy mismatch or a failed method, else 0.
    """
    meta = portable(meta)  # committed result files name no local paths
    (out / "results.json").write_text(json.dumps(
        {"meta": meta, "results": [asdict(r) for r in results]}, indent=2) + "\n")
    md = markdown(results, meta)
    (out / "results.md").write_text(md)
    meta["plots"] = plots(results, out, reference)
    print(md)
    bad = [r for r in results if r.greedy_equal is False]
    for r in bad:
        print(f"GREEDY MISMATCH: {r.method} k={r.k} batch {r.batch_size}: "
              f"{', '.join(r.greedy_mismatches[:5])}", file=sys.stderr)
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    print(f"wrote {out}/results.json, results.md and {len(meta['plots'])} plots")
    return 1 if bad or failures else 0


if __name__ == "__main__":
    sys.exit(main())
