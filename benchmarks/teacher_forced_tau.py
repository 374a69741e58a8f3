"""Greedy τ of a MASSV drafter without an engine: teacher-forced agreement on the held-out split
of `massv train`, replayed as the speculative loop.

At temperature 0 every accepted draft equals the target's greedy token, so the drafter's j-th draft
of a step is its argmax after the target's own prefix: exactly the teacher-forced prediction that
`massv train` scores as `eval_agreement`. Replaying the verifier over one greedy answer (token 0
comes from the prefill; each step accepts the leading drafts that match, up to k, and adds the
target's own token) gives τ = 1 + accepted/drafts and the per-position acceptance vLLM reports,
up to float round-off and the end of the answer (drafts past its last token count as rejected).

It scores the held-out examples `massv train` evaluates on (the same hashed split, the same data
directory), so drafters trained with different recipes compare on ~2,900 verification steps of
the CPU testbed instead of the ~450 of a 20-prompt throughput run. It runs the drafter once per
example (no vLLM), a few seconds on the testbed.

    PYTHONPATH=. .venv/bin/python benchmarks/teacher_forced_tau.py \\
        --drafter benchmarks/testbed/models/drafter-massv --data .cache/testbed/build/distill \\
        --target benchmarks/testbed/models/target --k 4
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch


def replay(matches: list[bool], k: int) -> list[int]:
    """Accepted drafts per verification step of one greedy answer.

    matches[t] says whether the drafter's teacher-forced argmax at response position t equals the
    target's token t (t = 0 .. n-1). Token 0 comes from the prefill; a step at position t drafts
    t .. t+k-1, accepts the leading matches and the target adds one token."""
    steps, t, n = [], 1, len(matches)
    while t < n:
        a = 0
        while a < k and t + a < n and matches[t + a]:
            a += 1
        steps.append(a)
        t += a + 1
    return steps


@torch.no_grad()
def teacher_forced_tau(drafter: str, data: str, target: str, k: int = 4,
                       feature_cache: str | None = None, batch_size: int = 32) -> dict:
    """{"image" | "text" | "all": {"tau", "per_position" (k floats), "agreement", "steps"}} on
    the held-out split `massv train --data DATA` evaluates on (its default eval fraction and
    seed)."""
    from transformers import AutoTokenizer

    from vllm_massv.drafters.massv.train import setup as massv_setup
    from vllm_massv.training.examples import load_examples, split_examples
    from vllm_massv.training.loop import TrainConfig

    cfg = TrainConfig(phase="sdvit", drafter=drafter, data=data, target=target, out="",
                      feature_cache=feature_cache)
    tokenizer = AutoTokenizer.from_pretrained(drafter)
    setup = massv_setup(cfg, tokenizer)
    model = setup.model.eval()
    vocab = model.massv_config.orig_vocab_size
    _, held_out = split_examples(load_examples(cfg, tokenizer), cfg.eval_fraction, cfg.seed)
    totals: dict[str, dict] = defaultdict(lambda: {"steps": 0, "accepted": [0] * k,
                                                   "agree": 0, "tokens": 0})
    for b in range(0, len(held_out), batch_size):
        chunk = held_out[b: b + batch_size]
        batch = setup.batcher(chunk)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       image_embeds=batch["image_embeds"], image_mask=batch["image_mask"],
                       position_ids=batch.get("position_ids")).logits
        pred = logits[:, :-1, :vocab].argmax(-1)          # [batch, width - 1]
        for i, e in enumerate(chunk):
            n = len(e.input_ids) - e.prompt_len
            response = torch.tensor(e.input_ids[e.prompt_len:])
            matches = (pred[i, e.prompt_len - 1: e.prompt_len - 1 + n] == response).tolist()
            for key in ("image" if e.images else "text", "all"):
                s = totals[key]
                s["agree"] += sum(matches)
                s["tokens"] += n
                for a in replay(matches, k):
                    s["steps"] += 1
                    for j in range(a):
                        s["accepted"][j] += 1
    return {key: {"tau": 1 + sum(s["accepted"]) / s["steps"],
                  "per_position": [a / s["steps"] for a in s["accepted"]],
                  "agreement": s["agree"] / s["tokens"], "steps": s["steps"]}
            for key, s in totals.items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--drafter", required=True, help="MASSV drafter dir")
    p.add_argument("--data", required=True, help="the `massv generate` dir it was trained on")
    p.add_argument("--target", required=True, help="target VLM dir (image embeddings)")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--feature-cache", help="`massv train --feature-cache` directory")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    result = teacher_forced_tau(args.drafter, args.data, args.target, args.k, args.feature_cache)
    print(json.dumps({"drafter": args.drafter, "k": args.k, **result}, indent=2))


if __name__ == "__main__":
    main()
