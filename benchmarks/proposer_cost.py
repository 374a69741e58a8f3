"""Cost of one MASSV proposer pass inside vLLM's loop, against vLLM's stock `DraftModelProposer`
with the same drafter weights. A benchmark, not a test.

Engines (fp32, ``enforce_eager``, ``block_size=32`` on CPU, like ``benchmarks/throughput.py``):

* ``none``           -- the target alone: its inter-token latency (ITL) at batch 1 and its
                        tokens/s on the same prompts (the speedup baseline);
* ``drafter``        -- the MASSV drafter served alone (a copy of its config without the
                        speculators keys, ``harness.engine.plain_lm``; with them vLLM would serve
                        its verifier): its ITL; stand-alone c = drafter ITL / target ITL;
* ``massv``          -- the MASSV drafter through the plugin's proposer
                        (``vllm_massv.drafters.massv.v1_proposer.MassvDraftModelProposer``);
* ``stock-proposer`` -- the same drafter directory, same model class, through vLLM's stock
                        ``DraftModelProposer`` (``VLLM_MASSV_TEST_STOCK_PROPOSER=1`` turns off
                        the plugin's proposer routing): the difference to ``massv`` is the
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

from benchmarks.harness import metrics  # noqa: E402
from benchmarks.harness.engine import (  # noqa: E402
    build_engine_args,
    decode_itl,
    device_name,
    engine_env,
    itl_of,
    make_llm,
    plain_lm,
    run_requests,
    shutdown,
)
from benchmarks.harness.paths import portable  # noqa: E402
from benchmarks.harness.prompts import PromptItem, render_prompts, testbed_prompts  # noqa: E402
from benchmarks.harness.proposer_report import compare, markdown, summarize  # noqa: E402
from benchmarks.testbed import assets, task  # noqa: E402
from vllm_massv import envs  # noqa: E402


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
            import vllm_massv.drafters.massv.v1_proposer as mp
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
                    "num_drafts": run["delta"]["drafts"], "tau": metrics.tau(run["delta"]),
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
    paths = assets.ensure(args.testbed)
    target = str(paths["target"])
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    drafters = variant_drafters(paths["models"], variants)
    text, image = testbed_text_and_image(paths["data"], target, args.num_prompts,
                                         args.num_image_prompts)
    engine_args = build_engine_args(args.engine_arg)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    meta = {"label": args.label or "-", "device": device_name(), "target": target, "k": args.k,
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
            plain_lm(str(paths["models"] / "drafter-massv"), Path(tmp) / "drafter"),
            engine_args, itl_prompt) * 1e3
    result["variants"] = []
    for v in variants:
        env = {envs.TEST_STOCK_PROPOSER: "1" if v == "stock-proposer" else "0"}
        result["variants"].append(run_variant(
            v, target, str(drafters[v]), env, k=args.k, batch_sizes=batch_sizes,
            text_items=text, image_items=image if v.startswith("massv") else [],
            max_tokens=args.max_tokens, engine_args=engine_args,
            profile_prompts=args.profile_prompts))
    summarize(result, args.k)
    return write_result(result, args.out)


def variant_drafters(models: Path, variants: list[str]) -> dict[str, Path]:
    """The drafter directory of each variant (``stock-arch``: its plain-Qwen2 copy, built here).

    Raises:
        SystemExit: an unknown variant.
    """
    drafters = {"massv": models / "drafter-massv", "stock-proposer": models / "drafter-massv",
                "massv-mrope": models / "drafter-massv-mrope"}
    if "stock-arch" in variants:
        drafters["stock-arch"] = stock_arch_copy(models / "drafter-massv",
                                                 assets.CACHE / "drafter-massv-stock-arch")
    unknown = [v for v in variants if v not in drafters]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}")
    return drafters


def testbed_text_and_image(data: Path, target: str, num_text: int, num_image: int
                           ) -> tuple[list[PromptItem], list[PromptItem]]:
    """The first ``num_text`` text-only and ``num_image`` image prompts of the testbed's test
    split, rendered with the target's chat template."""
    from transformers import AutoTokenizer

    items = testbed_prompts(data, 10_000)
    tokenizer = AutoTokenizer.from_pretrained(target)
    text = render_prompts([it for it in items if it.kind in task.TEXT_KINDS],
                          tokenizer)[:num_text]
    image = render_prompts([it for it in items if it.has_image], tokenizer)[:num_image]
    return text, image


def write_result(result: dict[str, Any], out: Path) -> int:
    """Write ``OUT.md`` and a trimmed ``OUT.json`` and print the report.

    Returns:
        the exit status: 1 when a variant's greedy output differs from ``none``'s, else 0.
    """
    result = portable(result)  # committed result files name no local paths
    md = markdown(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.md").write_text(md)
    for v in result["variants"]:  # keep the json short: drop token ids (not none's, the
        # greedy reference of --baseline), trim op tables
        for r in v["runs"]:
            r.pop("token_ids", None)
        for which in ("profile_text", "profile_image"):
            if which in v:
                v[which]["ops"] = v[which]["ops"][:40]
    Path(f"{out}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(md)
    print(f"wrote {out}.md and {out}.json")
    bad = [v["variant"] for v in result["variants"] for r in v["runs"]
           if r.get("greedy_equal_none") is False]
    if bad:
        print(f"GREEDY MISMATCH vs none: {sorted(set(bad))}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
