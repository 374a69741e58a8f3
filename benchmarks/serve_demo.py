"""`make serve-demo`: MASSV behind vLLM's OpenAI-compatible server on the CPU testbed.

What a user types, run for them:

    vllm serve benchmarks/testbed/models/drafter-massv --dtype float32 --enforce-eager ...

One argument: the drafter's `config.json` names its target (`speculators_config.verifier`) and k,
so vLLM serves the testbed target with the MASSV drafter (`vllm_massv/speculators.py`);
`--two-arguments` starts the same server as `vllm serve TARGET --speculative-config massv.json`.
The demo then sends held-out testbed questions with their images through the `openai` client
(one at a time, greedy), prints each answer, reads τ (1 + accepted / drafts) from the server's
`/metrics`, and stops the server. Run from the repository root (the drafter names its target by a
path relative to it).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import metrics  # noqa: E402
from benchmarks.harness.load import png_data_url  # noqa: E402
from benchmarks.testbed import task  # noqa: E402

DRAFTER = Path("benchmarks/testbed/models/drafter-massv")
SERVER_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
               "--max-num-seqs", "2", "--block-size", "32", "--seed", "0",
               "--limit-mm-per-prompt", '{"image": 1, "video": 0}']
KINDS = ("describe", "where", "colour", "read")


def testbed_questions(kinds: tuple[str, ...] = KINDS, seed: int = 0) -> list[tuple[Any, list]]:
    """One held-out testbed sample per kind, as (sample, OpenAI chat messages with the image as a
    PNG data URL)."""
    samples = task.generate_split("test", 200, seed=seed)
    out = []
    for kind in kinds:
        s = next(x for x in samples if x.kind == kind)
        content: list[dict[str, Any]] = []
        if s.has_image:
            content.append({"type": "image_url",
                            "image_url": {"url": png_data_url(task.render(s.scene))}})
        content.append({"type": "text", "text": s.prompt})
        out.append((s, [{"role": "user", "content": content}]))
    return out


def served_model(url: str) -> str:
    """The model name the server answers to (`/v1/models`)."""
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="none").models.list().data[0].id


def ask(url: str, model: str, messages: list, max_tokens: int = 64) -> Any:
    """One greedy chat completion through the `openai` client (token ids returned too)."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="none", timeout=300, max_retries=0)
    return client.chat.completions.create(model=model, messages=messages, temperature=0.0,
                                          max_tokens=max_tokens,
                                          extra_body={"return_token_ids": True})


def spec_decode_stats(url: str) -> dict[str, Any]:
    """Speculative-decoding totals since the server started, from `/metrics` (τ, acceptance
    rate, per-position acceptance; `tau` is None when nothing was drafted)."""
    return metrics.prometheus_summary({}, metrics.fetch_prometheus(url))


def server(two_arguments: bool = False, log: Path | None = None, args: list[str] | None = None,
           drafter: Path = DRAFTER):
    """The testbed MASSV server (not started): `vllm serve DRAFTER`, or with `two_arguments`
    `vllm serve TARGET --speculative-config FILE` built from the drafter's own block. Another
    `drafter` (a testbed directory with a speculators block, e.g. the EAGLE-3 head) is served
    with one argument."""
    from vllm_massv.speculators import checkpoint_num_speculative_tokens
    from vllm_massv.testing import ApiServer

    args = list(SERVER_ARGS if args is None else args)
    if not two_arguments:
        return ApiServer(drafter, args, log=log, cwd=ROOT)
    cfg = json.loads((ROOT / DRAFTER / "config.json").read_text())
    spec = {"method": "draft_model", "model": str(DRAFTER),
            "num_speculative_tokens": checkpoint_num_speculative_tokens(cfg)}
    spec_file = Path(tempfile.mkdtemp(prefix="massv-serve-demo-")) / "massv.json"
    spec_file.write_text(json.dumps(spec))
    return ApiServer(cfg["speculators_config"]["verifier"]["name_or_path"], args,
                     speculative_config=spec_file, log=log, cwd=ROOT)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--two-arguments", action="store_true",
                   help="vllm serve TARGET --speculative-config massv.json instead")
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args(argv)

    from vllm_massv.testing import ServerStartError

    srv = server(args.two_arguments)
    print("$ " + shlex.join(["vllm", *srv.cmd[1:]]), flush=True)
    print(f"starting the server (log: {srv.log}) ...", flush=True)
    try:
        with srv:
            model = served_model(srv.url)
            print(f"ready at {srv.url}, model {model!r}\n")
            for sample, messages in testbed_questions():
                answer = ask(srv.url, model, messages, args.max_tokens).choices[0].message.content
                print(f"[{sample.kind}] {sample.prompt}\n  -> {answer}")
            stats = spec_decode_stats(srv.url)
    except ServerStartError as e:
        print(f"serve_demo.py: error: {e}", file=sys.stderr)
        return 2
    print(f"\nfrom /metrics: tau = {stats['tau']:.2f} (1 + {stats['accepted_tokens']} accepted / "
          f"{stats['drafts']} drafts), acceptance rate {stats['acceptance_rate']:.2f}, k = "
          f"{stats['draft_tokens'] // max(stats['drafts'], 1)}; server stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
