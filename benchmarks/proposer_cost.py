"""Cost of one MASSV proposer pass inside vLLM's loop, against vLLM's stock `DraftModelProposer`
with the same drafter weights (issue 14, item 1). A benchmark, not a test.

Engines (fp32, ``enforce_eager``, ``block_size=32`` on CPU, like ``benchmarks/throughput.py``):

* ``none``           -- the target alone: its inter-token latency (ITL) at batch 1 and its
                        tokens/s on the same prompts (the speedup baseline);
* ``drafter``        -- the MASSV drafter served alone (a copy of its config without the
                        speculators keys, ``throughput.plain_lm``; with them vLLM would serve
                        its verifier): its ITL; stand-alone c = drafter ITL / target ITL;
* ``massv``          -- the MASSV drafter through the plugin's proposer
                        (``vllm_massv.proposer.MassvDraftModelProposer``);
* ``stock-proposer`` -- the same drafter directory, same model class, through vLLM's stock
                        ``DraftModelProposer`` (``VLLM_MASSV_TEST_STOCK_PROPOSER=1`` turns off
                        patch 1 of ``vllm_massv.patches``): the difference to ``massv`` is the
                        proposer's own work;
* ``stock-arch``     -- the same weights without the projector as a plain ``Qwen2ForCausalLM``
                        (a copy under ``.cache/testbed``): everything stock (no image-embedding
                        path at all, no padded-vocab masking).
* ``massv-mrope``    -- optional (``--variants``): the M-RoPE drafter through the plugin.

Prompts are the testbed's text-only kinds (``spell``, ``count_from``, ``next``) through the
target's chat template: there stock drafts correctly too. The MASSV variants also run image
prompts (timing only).

Inside each speculative engine (``LLM.collective_rpc``, needs
``VLLM_ALLOW_INSECURE_SERIALIZATION=1``, set here) the worker's ``runner.drafter.propose`` and
``runner.propose_draft_token_ids`` (the whole draft step: the runner's input preparation, its
image-embedding gather and ``propose``) are wrapped with ``time.perf_counter``. Reported per
variant, batch size and prompt set: mean / median ms per ``propose`` call (= one draft pass of
k tokens) and per draft step, τ, tokens/s; then the ratio MASSV / stock, the in-loop c
(``throughput.py``'s definition at batch 1: (time per verification step - target ITL) / k, over
the target ITL), the pass c (draft step ms / (k · target ITL)), the stand-alone c and the bound
fraction (speedup over ``none`` / (τ / (1 + k·c_standalone))).

Finally a ``torch.profiler`` run (CPU activities) per speculative variant with
``record_function`` ranges around the proposer's parts: the image-embedding gathers (the runner's
shift-1 one, outside ``propose``, and the MASSV proposer's own), the mask remap, positions /
M-RoPE fill / slot mappings (first pass and draft steps), attention metadata, embeddings, the
drafter's forwards, sampling (logits + argmax), and "other" (the rest of ``propose``). The ranges
are installed only for this run, so they do not bias the timings above. The op table's top ops
and the count of host-sync ops (``aten::item``, ``aten::_local_scalar_dense``, ``aten::nonzero``)
per pass come with it.

Usage (starts 5 engines, ~5-10 min on the 2-core CPU testbed; run under the engine lock)::

    flock /tmp/vllm-engine.lock .venv/bin/python benchmarks/proposer_cost.py \\
        [--k 4] [--batch-sizes 1,4] [--num-prompts 12] [--num-image-prompts 6] \\
        [--max-tokens 64] [--variants massv,stock-proposer,stock-arch] \\
        [--out benchmarks/results/cpu-testbed-proposer-cost] [--label after]

writes ``OUT.md`` and ``OUT.json`` and prints the tables. Numbers are from tiny self-trained
models on a shared CPU: compare variants of one run, not runs of different days.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")
os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with functions
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Profiler range prefix; groups in display order: (range name, label, inside propose()).
RANGE = "massv_pc::"
GROUPS: tuple[tuple[str, str, bool], ...] = (
    ("gather_target_shift0", "target's own image-embedding gather (not drafting)", False),
    ("draft_step", "draft step (runner, total)", False),
    ("prepare", "runner: prepare next tokens / padded inputs", False),
    ("gather_runner_shift1", "runner: image-embedding gather for the drafter (shift 1)", False),
    ("gather_runner_shift0", "runner: image-embedding gather for the drafter (shift 0)", False),
    ("propose", "propose() total", False),
    ("gather_propose_shift0", "image-embedding gather in propose() (shift 0)", True),
    ("mask_remap", "mask remap", True),
    ("first_pass_inputs", "positions / slots first pass (incl. M-RoPE fill)", True),
    ("mrope_fill", "  of which M-RoPE fill", False),
    ("step_positions", "positions / slots draft steps", True),
    ("attn_metadata", "attention metadata", True),
    ("embed", "embeddings (embed_input_ids)", True),
    ("forward", "drafter forwards", True),
    ("sampling", "sampling (logits + argmax)", True),
)
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero")


# --------------------------------------------------------------------------------------------
# Worker-side functions (run by collective_rpc inside the engine's worker; self-contained)
# --------------------------------------------------------------------------------------------


def _w_install_timers(worker) -> str:
    """Wrap the drafter's `propose` and the runner's draft step with perf_counter timers."""
    import time

    runner = worker.model_runner
    drafter = runner.drafter
    if hasattr(runner, "_pc_times"):
        for v in runner._pc_times.values():
            v.clear()
        return type(drafter).__name__
    times: dict[str, list[float]] = {"propose": [], "draft_step": []}
    runner._pc_times = times

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[key].append(time.perf_counter() - t0)
        return wrapper

    drafter.propose = timed(drafter.propose, "propose")
    runner.propose_draft_token_ids = timed(runner.propose_draft_token_ids, "draft_step")
    return type(drafter).__name__


def _w_read_timers(worker) -> dict[str, list[float]]:
    return {k: list(v) for k, v in worker.model_runner._pc_times.items()}


def _w_start_profile(worker) -> None:
    """Install record_function ranges around the proposer's parts and start the profiler."""
    import functools

    from torch.profiler import ProfilerActivity, profile, record_function

    runner = worker.model_runner
    drafter = runner.drafter

    def ranged(fn, name):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with record_function("massv_pc::" + name):
                return fn(*args, **kwargs)
        return wrapper

    if not getattr(runner, "_pc_ranges", False):
        runner._pc_ranges = True
        gather = runner._gather_mm_embeddings  # the class's (MASSV may redirect it per step)
        in_propose, in_step = [False], [False]

        def gather_ranged(scheduler_output, shift_computed_tokens=0):
            where = ("propose" if in_propose[0] else "runner") if in_step[0] else "target"
            with record_function(f"massv_pc::gather_{where}_shift{shift_computed_tokens}"):
                return gather(scheduler_output, shift_computed_tokens=shift_computed_tokens)

        runner._gather_mm_embeddings = gather_ranged
        step = runner.propose_draft_token_ids

        def step_flagged(*args, **kwargs):
            in_step[0] = True
            try:
                return step(*args, **kwargs)
            finally:
                in_step[0] = False

        runner.propose_draft_token_ids = ranged(step_flagged, "draft_step")
        propose = drafter.propose

        def propose_flagged(*args, **kwargs):
            in_propose[0] = True
            try:
                return propose(*args, **kwargs)
            finally:
                in_propose[0] = False

        drafter.propose = propose_flagged
        for name, key in (("propose", "propose"), ("set_inputs_first_pass", "first_pass_inputs"),
                          ("_fill_mrope_first_pass", "mrope_fill"),
                          ("_update_positions_dependent_metadata", "step_positions"),
                          ("build_per_group_and_layer_attn_metadata", "attn_metadata"),
                          ("_sample_draft_tokens", "sampling"),
                          ("prepare_next_token_ids_padded", "prepare"),
                          ("prepare_inputs_padded", "prepare")):
            if hasattr(drafter, name):
                setattr(drafter, name, ranged(getattr(drafter, name), key))
        model = drafter.model
        model.embed_input_ids = ranged(model.embed_input_ids, "embed")
        model.forward = ranged(model.forward, "forward")
        try:
            import vllm_massv.proposer as mp
            for name in ("shift_mask_to_draft_layout",):
                if hasattr(mp, name):
                    setattr(mp, name, ranged(getattr(mp, name), "mask_remap"))
        except ImportError:
            pass
    prof = profile(activities=[ProfilerActivity.CPU])
    prof.start()
    runner._pc_prof = prof


def _w_stop_profile(worker) -> dict:
    """Stop the profiler; per range and per op: calls and total CPU time (us)."""
    runner = worker.model_runner
    prof = runner._pc_prof
    prof.stop()
    runner._pc_prof = None
    ranges: dict[str, dict[str, float]] = {}
    ops: list[dict] = []
    for e in prof.key_averages():
        if e.key.startswith("massv_pc::"):
            ranges[e.key[len("massv_pc::"):]] = {"count": e.count, "total_us": e.cpu_time_total}
        else:
            ops.append({"op": e.key, "count": e.count, "self_us": e.self_cpu_time_total})
    ops.sort(key=lambda d: -d["self_us"])
    return {"ranges": ranges, "ops": ops[:200]}


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def stock_arch_copy(drafter: Path, dst: Path) -> Path:
    """``drafter`` (a MASSV Qwen2 drafter) as a plain ``Qwen2ForCausalLM``: config without the
    ``massv``/speculators blocks, weights without ``mm_projector.*``. Rebuilt when stale."""
    from safetensors.torch import load_file, save_file

    src_w = drafter / "model.safetensors"
    stamp = dst / ".source-mtime"
    if stamp.is_file() and stamp.read_text() == str(src_w.stat().st_mtime_ns):
        return dst
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    config = json.loads((drafter / "config.json").read_text())
    if config.get("architectures") != ["MassvQwen2ForCausalLM"]:
        raise ValueError(f"{drafter} is not a MASSV Qwen2 drafter")
    for key in ("massv", "speculators_config", "speculators_model_type"):
        config.pop(key, None)
    config["architectures"] = ["Qwen2ForCausalLM"]
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {k: v for k, v in load_file(str(src_w)).items()
               if not k.startswith("mm_projector.")}
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for f in drafter.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "generation_config")):
            shutil.copy(f, dst / f.name)
    stamp.write_text(str(src_w.stat().st_mtime_ns))
    return dst


def _stats(xs: list[float]) -> dict[str, float | int | None]:
    if not xs:
        return {"n": 0, "mean_ms": None, "median_ms": None}
    return {"n": len(xs), "mean_ms": statistics.fmean(xs) * 1e3,
            "median_ms": statistics.median(xs) * 1e3}


def run_variant(name: str, target: str, drafter: str, env: dict[str, str], *, k: int,
                batch_sizes: list[int], text_items: list, image_items: list, max_tokens: int,
                engine_args: dict[str, Any], profile_prompts: int) -> dict[str, Any]:
    """One speculative engine: timed runs per batch size and prompt set, then a profile."""
    from benchmarks.throughput import engine_env, make_llm, run_requests, shutdown, tau_of

    with engine_env(env):
        llm = make_llm(target, {"method": "draft_model", "model": drafter,
                                "num_speculative_tokens": k},
                       max_num_seqs=max(batch_sizes), engine_args=engine_args)
    out: dict[str, Any] = {"variant": name, "drafter": drafter, "runs": []}
    try:
        run_requests(llm, text_items[:2], batch_size=2, temperature=0.0, max_tokens=8)
        sets = [("text", text_items)] + ([("image", image_items)] if image_items else [])
        for set_name, items in sets:
            for b in batch_sizes if set_name == "text" else [1]:
                out["proposer"] = llm.collective_rpc(_w_install_timers)[0]
                run = run_requests(llm, items, batch_size=b, temperature=0.0,
                                   max_tokens=max_tokens)
                times = llm.collective_rpc(_w_read_timers)[0]
                n_out = sum(len(r["token_ids"]) for r in run["records"])
                out["runs"].append({
                    "prompts": set_name, "batch_size": b, "seconds": run["seconds"],
                    "output_tokens": n_out, "tokens_per_s": n_out / run["seconds"],
                    "num_drafts": run["delta"]["drafts"], "tau": tau_of(run["delta"]),
                    "propose": _stats(times["propose"]),
                    "draft_step": _stats(times["draft_step"]),
                    "token_ids": [r["token_ids"] for r in run["records"]]})
        llm.collective_rpc(_w_start_profile)
        run_requests(llm, text_items[:profile_prompts], batch_size=1, temperature=0.0,
                     max_tokens=max_tokens)
        out["profile_text"] = llm.collective_rpc(_w_stop_profile)[0]
        if image_items:
            llm.collective_rpc(_w_start_profile)
            run_requests(llm, image_items[:profile_prompts], batch_size=1, temperature=0.0,
                         max_tokens=max_tokens)
            out["profile_image"] = llm.collective_rpc(_w_stop_profile)[0]
    finally:
        shutdown(llm)
    return out


def run_none(target: str, *, batch_sizes: list[int], text_items: list, max_tokens: int,
             engine_args: dict[str, Any], itl_prompt: str) -> dict[str, Any]:
    from benchmarks.throughput import itl_of, make_llm, run_requests, shutdown

    llm = make_llm(target, None, max_num_seqs=max(batch_sizes), engine_args=engine_args)
    try:
        run_requests(llm, text_items[:2], batch_size=2, temperature=0.0, max_tokens=8)
        out: dict[str, Any] = {"itl_ms": itl_of(llm, itl_prompt) * 1e3, "runs": []}
        for b in batch_sizes:
            run = run_requests(llm, text_items, batch_size=b, temperature=0.0,
                               max_tokens=max_tokens)
            n_out = sum(len(r["token_ids"]) for r in run["records"])
            out["runs"].append({"prompts": "text", "batch_size": b, "seconds": run["seconds"],
                                "output_tokens": n_out, "tokens_per_s": n_out / run["seconds"],
                                "token_ids": [r["token_ids"] for r in run["records"]]})
    finally:
        shutdown(llm)
    return out


def group_profile(profile: dict, passes: int) -> list[dict[str, Any]]:
    """Rows (group, calls, total ms, ms per pass, share of propose) from a profile's ranges."""
    ranges = profile["ranges"]
    propose_us = ranges.get("propose", {}).get("total_us", 0.0)
    rows = []
    inside = 0.0
    for key, label, in_propose in GROUPS:
        r = ranges.get(key)
        if r is None:
            continue
        if in_propose:
            inside += r["total_us"]
        rows.append({"group": key, "label": label, "calls": r["count"],
                     "total_ms": r["total_us"] / 1e3,
                     "ms_per_pass": r["total_us"] / 1e3 / max(passes, 1),
                     "share_of_propose": r["total_us"] / propose_us if propose_us else None})
    if propose_us:
        other = propose_us - inside
        rows.append({"group": "other", "label": "other (rest of propose())", "calls": None,
                     "total_ms": other / 1e3, "ms_per_pass": other / 1e3 / max(passes, 1),
                     "share_of_propose": other / propose_us})
    return rows


def sync_counts(profile: dict, passes: int) -> dict[str, float]:
    """Host-sync ops per draft step (counted over the whole profile, target included)."""
    counts = {op: 0 for op in SYNC_OPS}
    for o in profile["ops"]:
        if o["op"] in counts:
            counts[o["op"]] += o["count"]
    return {op: c / max(passes, 1) for op, c in counts.items()}


def summarize(result: dict[str, Any], k: int) -> dict[str, Any]:
    """Ratios, in-loop c, pass c, stand-alone c and bound fractions (in place, returned)."""
    t_itl = result["none"]["itl_ms"]
    c_alone = result["drafter_itl_ms"] / t_itl
    result["c_standalone"] = c_alone
    none_tps = {r["batch_size"]: r["tokens_per_s"] for r in result["none"]["runs"]}
    none_ids = {r["batch_size"]: r["token_ids"] for r in result["none"]["runs"]}
    for v in result["variants"]:
        for r in v["runs"]:
            if r["prompts"] == "text":
                b = r["batch_size"]
                r["speedup_vs_none"] = r["tokens_per_s"] / none_tps[b]
                if "token_ids" in r:
                    r["greedy_equal_none"] = r["token_ids"] == none_ids[b]
                if r["tau"]:
                    r["bound"] = r["tau"] / (1 + k * c_alone)
                    r["bound_fraction"] = r["speedup_vs_none"] / r["bound"]
            if r["batch_size"] == 1 and r["num_drafts"]:
                step_ms = r["seconds"] * 1e3 / r["num_drafts"]
                r["c_in_loop"] = (step_ms - t_itl) / k / t_itl
                r["c_pass"] = r["draft_step"]["mean_ms"] / k / t_itl
        passes = v["profile_text"]["ranges"].get("propose", {}).get("count", 0)
        v["profile_text_groups"] = group_profile(v["profile_text"], passes)
        v["profile_text_syncs_per_pass"] = sync_counts(v["profile_text"], passes)
        if "profile_image" in v:
            p = v["profile_image"]["ranges"].get("propose", {}).get("count", 0)
            v["profile_image_groups"] = group_profile(v["profile_image"], p)
            v["profile_image_syncs_per_pass"] = sync_counts(v["profile_image"], p)
    by = {v["variant"]: v for v in result["variants"]}
    ratios = []
    for base in ("stock-proposer", "stock-arch"):
        if "massv" in by and base in by:
            for rm, rs in zip(by["massv"]["runs"], by[base]["runs"]):
                if rm["prompts"] == rs["prompts"] == "text":
                    ratios.append({"vs": base, "batch_size": rm["batch_size"],
                                   "propose_mean": rm["propose"]["mean_ms"]
                                   / rs["propose"]["mean_ms"],
                                   "propose_median": rm["propose"]["median_ms"]
                                   / rs["propose"]["median_ms"],
                                   "draft_step_mean": rm["draft_step"]["mean_ms"]
                                   / rs["draft_step"]["mean_ms"]})
    result["ratios"] = ratios
    return result


def _f(x: Any, d: int = 2) -> str:
    return "-" if x is None else f"{x:.{d}f}"


def markdown(result: dict[str, Any]) -> str:
    m = result["meta"]
    lines = [f"# MASSV proposer cost ({m['label']}, {m['device']})", "",
             (f"Target `{m['target']}`, k = {m['k']}, {m['num_text_prompts']} text-only prompts "
             f"({m['num_image_prompts']} image prompts for the MASSV variants), max "
             f"{m['max_tokens']} new tokens, greedy; fp32, enforce_eager. Target ITL "
             f"{_f(result['none']['itl_ms'])} ms, drafter ITL (alone) "
             f"{_f(result['drafter_itl_ms'])} ms: stand-alone c = {_f(result['c_standalone'], 3)}."),
             "", f"Command: `{m['command']}`", "",
             ("## Time per draft pass (propose() = one pass of k tokens; draft step = the runner's "
             "whole `propose_draft_token_ids`)"), "",
             ("| variant | proposer | prompts | batch | passes | propose mean ms | median ms | "
             "draft step mean ms | τ | tok/s | speedup vs none | c in loop | c pass | "
             "bound τ/(1+kc) | bound fraction | greedy = none |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in result["variants"]:
        for r in v["runs"]:
            eq = r.get("greedy_equal_none")
            lines.append(
                f"| {v['variant']} | {v['proposer']} | {r['prompts']} | {r['batch_size']} | "
                f"{r['propose']['n']} | {_f(r['propose']['mean_ms'])} | "
                f"{_f(r['propose']['median_ms'])} | {_f(r['draft_step']['mean_ms'])} | "
                f"{_f(r['tau'])} | {_f(r['tokens_per_s'], 1)} | {_f(r.get('speedup_vs_none'))} | "
                f"{_f(r.get('c_in_loop'), 3)} | {_f(r.get('c_pass'), 3)} | {_f(r.get('bound'))} | "
                f"{_f(r.get('bound_fraction'))} | {'-' if eq is None else ('yes' if eq else 'NO')} |")
    lines += ["", "## MASSV / stock (text-only prompts)", "",
              "| vs | batch | propose mean | propose median | draft step mean |", "|---|---|---|---|---|"]
    for r in result["ratios"]:
        lines.append(f"| {r['vs']} | {r['batch_size']} | {_f(r['propose_mean'])}× | "
                     f"{_f(r['propose_median'])}× | {_f(r['draft_step_mean'])}× |")
    for v in result["variants"]:
        for which in ("text", "image"):
            rows = v.get(f"profile_{which}_groups")
            if not rows:
                continue
            passes = v[f"profile_{which}"]["ranges"].get("propose", {}).get("count", 0)
            syncs = v[f"profile_{which}_syncs_per_pass"]
            lines += ["", (f"## Profile: {v['variant']} ({v['proposer']}), {which} prompts, "
                      f"batch 1, {passes} passes (torch.profiler, CPU; ranges add overhead)"), "",
                      "| part | calls | total ms | ms per pass | share of propose() |",
                      "|---|---|---|---|---|"]
            for r in rows:
                share = r["share_of_propose"]
                lines.append(f"| {r['label']} | {r['calls'] if r['calls'] is not None else '-'} | "
                             f"{_f(r['total_ms'])} | {_f(r['ms_per_pass'], 3)} | "
                             f"{'-' if share is None else f'{share * 100:.1f}%'} |")
            lines.append("")
            lines.append("Host-sync ops per pass (whole step, target included): " + ", ".join(
                f"`{op}` {c:.1f}" for op, c in syncs.items()))
    return "\n".join(lines) + "\n"


#: range names of the first version of this script (before the proposer reused the runner's
#: gather, shift 0 was gathered by the target and inside propose())
_OLD_KEYS = {"gather_shift1": "gather_runner_shift1"}


def compare(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Markdown before/after tables of two result files (same variants and settings)."""
    lines = [f"# MASSV proposer cost: {before['meta']['label']} vs {after['meta']['label']}", "",
             (f"Stand-alone c: {_f(before['c_standalone'], 3)} / {_f(after['c_standalone'], 3)}; "
             f"target ITL {_f(before['none']['itl_ms'])} / {_f(after['none']['itl_ms'])} ms."), "",
             ("| variant | prompts | batch | propose mean ms | propose median ms | "
             "draft step mean ms | c in loop | c pass | bound fraction |"),
             "|---|---|---|---|---|---|---|---|---|"]
    runs_a = {(v["variant"], r["prompts"], r["batch_size"]): r
              for v in after["variants"] for r in v["runs"]}
    for v in before["variants"]:
        for rb in v["runs"]:
            ra = runs_a.get((v["variant"], rb["prompts"], rb["batch_size"]))
            if ra is None:
                continue

            def ba(get, d=2, rb=rb, ra=ra):
                return f"{_f(get(rb), d)} → {_f(get(ra), d)}"
            lines.append(
                f"| {v['variant']} | {rb['prompts']} | {rb['batch_size']} | "
                f"{ba(lambda r: r['propose']['mean_ms'])} | "
                f"{ba(lambda r: r['propose']['median_ms'])} | "
                f"{ba(lambda r: r['draft_step']['mean_ms'])} | "
                f"{ba(lambda r: r.get('c_in_loop'), 3)} | {ba(lambda r: r.get('c_pass'), 3)} | "
                f"{ba(lambda r: r.get('bound_fraction'))} |")
    lines += ["", "| MASSV / | batch | propose mean | propose median | draft step mean |",
              "|---|---|---|---|---|"]
    ratios_a = {(r["vs"], r["batch_size"]): r for r in after["ratios"]}
    for rb in before["ratios"]:
        ra = ratios_a.get((rb["vs"], rb["batch_size"]))
        if ra is not None:
            lines.append(f"| {rb['vs']} | {rb['batch_size']} | " + " | ".join(
                f"{_f(rb[key])}× → {_f(ra[key])}×"
                for key in ("propose_mean", "propose_median", "draft_step_mean")) + " |")
    var_a = {v["variant"]: v for v in after["variants"]}
    for v in before["variants"]:
        va = var_a.get(v["variant"])
        for which in ("text", "image"):
            key_g = f"profile_{which}_groups"
            if va is None or key_g not in v or key_g not in va:
                continue
            gb = {_OLD_KEYS.get(r["group"], r["group"]): r for r in v[key_g]}
            ga = {r["group"]: r for r in va[key_g]}
            lines += ["", f"Profile {v['variant']}, {which} prompts: ms per pass (before → after)",
                      "", "| part | before | after |", "|---|---|---|"]
            for key, label, _ in (*GROUPS, ("other", "other (rest of propose())", True)):
                if key in gb or key in ga:
                    lines.append(f"| {label} | {_f(gb.get(key, {}).get('ms_per_pass'), 3)} | "
                                 f"{_f(ga.get(key, {}).get('ms_per_pass'), 3)} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--testbed", type=Path, default=ROOT / "benchmarks" / "testbed")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--num-prompts", type=int, default=12, help="text-only prompts")
    p.add_argument("--num-image-prompts", type=int, default=6,
                   help="image prompts for the MASSV variants (0: none)")
    p.add_argument("--profile-prompts", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--variants", default="massv,stock-proposer,stock-arch",
                   help="comma list of massv, stock-proposer, stock-arch, massv-mrope")
    p.add_argument("--out", type=Path,
                   default=ROOT / "benchmarks" / "results" / "cpu-testbed-proposer-cost")
    p.add_argument("--label", default="", help="a name for this run (e.g. before / after)")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--baseline", type=Path, metavar="RESULT.json",
                   help="take the target-alone run (ITL, tokens/s, greedy reference) from an "
                        "earlier result of the same settings (skips one engine)")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE.json", "AFTER.json"),
                   help="no engines: write OUT.md with before/after tables of two result files")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.compare:
        md = compare(*(json.loads(p.read_text()) for p in args.compare))
        Path(f"{args.out}.md").write_text(md)
        print(md)
        return 0
    from transformers import AutoTokenizer

    from benchmarks.testbed import assets, task
    from benchmarks.throughput import (
        _device_name,
        _engine_args,
        decode_itl,
        plain_lm,
        render_prompts,
        testbed_prompts,
    )
    from vllm_massv.patches import STOCK_PROPOSER_ENV

    paths = assets.ensure(args.testbed)
    target = str(paths["target"])
    models = paths["models"]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    drafters = {"massv": models / "drafter-massv", "stock-proposer": models / "drafter-massv",
                "massv-mrope": models / "drafter-massv-mrope"}
    if "stock-arch" in variants:
        drafters["stock-arch"] = stock_arch_copy(models / "drafter-massv",
                                                 assets.CACHE / "drafter-massv-stock-arch")
    unknown = [v for v in variants if v not in drafters]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}")
    items = testbed_prompts(paths["data"], 10_000)
    tokenizer = AutoTokenizer.from_pretrained(target)
    text = render_prompts([it for it in items if it.kind in task.TEXT_KINDS],
                          tokenizer)[:args.num_prompts]
    image = render_prompts([it for it in items if it.has_image],
                           tokenizer)[:args.num_image_prompts]
    engine_args = _engine_args(args)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    meta = {"label": args.label or "-", "device": _device_name(), "target": target, "k": args.k,
            "num_text_prompts": len(text), "num_image_prompts": len(image),
            "max_tokens": args.max_tokens, "batch_sizes": batch_sizes,
            "engine_args": engine_args,
            "command": "python " + " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
            if argv is None else "main(" + repr(argv) + ")"}
    itl_prompt = text[0].inputs["prompt"]
    result: dict[str, Any] = {"meta": meta}
    if args.baseline:
        result["none"] = json.loads(args.baseline.read_text())["none"]
        meta["baseline"] = str(args.baseline)
    else:
        result["none"] = run_none(target, batch_sizes=batch_sizes, text_items=text,
                                  max_tokens=args.max_tokens, engine_args=engine_args,
                                  itl_prompt=itl_prompt)
    with tempfile.TemporaryDirectory() as tmp:  # the drafter alone, not its verifier
        result["drafter_itl_ms"] = decode_itl(
            plain_lm(str(models / "drafter-massv"), Path(tmp) / "drafter"), engine_args,
            itl_prompt) * 1e3
    result["variants"] = []
    for v in variants:
        env = {STOCK_PROPOSER_ENV: "1" if v == "stock-proposer" else "0"}
        result["variants"].append(run_variant(
            v, target, str(drafters[v]), env, k=args.k, batch_sizes=batch_sizes,
            text_items=text, image_items=image if v.startswith("massv") else [],
            max_tokens=args.max_tokens, engine_args=engine_args,
            profile_prompts=args.profile_prompts))
    summarize(result, args.k)
    md = markdown(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text(md)
    for v in result["variants"]:  # keep the json short: drop token ids (not none's, the
        # greedy reference of --baseline), trim op tables
        for r in v["runs"]:
            r.pop("token_ids", None)
        for which in ("profile_text", "profile_image"):
            if which in v:
                v[which]["ops"] = v[which]["ops"][:40]
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(md)
    print(f"wrote {args.out}.md and {args.out}.json")
    bad = [v["variant"] for v in result["variants"] for r in v["runs"]
           if r.get("greedy_equal_none") is False]
    if bad:
        print(f"GREEDY MISMATCH vs none: {sorted(set(bad))}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
