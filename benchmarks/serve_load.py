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

`--json FILE` writes every figure and each request's result. The workload, the client and the
figures are `benchmarks.harness.load`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness.paths import portable  # noqa: E402
from benchmarks.harness.load import (  # noqa: E402
    LoadRun,
    RequestSpec,
    build_workload,
    compare_answers,
    format_table,
    run_load_sync,
    summarize,
)

TINY_CACHE = ROOT / ".cache" / "serve_load"
# Server flags for the tiny CPU testbed (the test suite's engine settings).
TINY_SERVER_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
                    "--max-num-seqs", "4", "--block-size", "32", "--max-num-batched-tokens", "64",
                    "--enable-prefix-caching", "--seed", "0",
                    "--limit-mm-per-prompt", '{"image": 2, "video": 0}']


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
        Path(args.json).write_text(json.dumps(portable(report), indent=2) + "\n")
        print(f"wrote {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
