"""`make demo`: MASSV speculative decoding inside vLLM on the trained CPU testbed.

The testbed (``benchmarks/testbed/``, checked into git) is a small Qwen2.5-VL target trained on
this CPU to answer questions about synthetic scenes, and drafters made from a blind 2-layer text
LM with ``massv init`` + ``massv train``. The target is padded with zero-output layers so that the
drafter/target cost ratio is about that of Qwen2.5-1.5B / Qwen2.5-VL-7B (outputs unchanged; see
``benchmarks/testbed/assets.py``).

The demo asks a few held-out testbed questions and two real photos from ``skimage.data``, resized
to the testbed's 140x140 (the target never saw photos: its answers there describe shapes that are
not in the photo, but they are still the target's answers and the drafter still has to predict
them), one request at a time:

  1. the target alone (no speculation),
  2. the blind text LM as a text-only drafter through the MASSV proposer (``--projector none``),
  3. the MASSV drafter (phases 1 + 2),

and prints the answers, τ (mean acceptance length, 1 + accepted/drafts) and the speedup over no
speculation. Every speculative answer is checked token-identical to the target's own (greedy).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

K = 4
MAX_TOKENS = 96
TESTBED_KINDS = ("describe", "where", "colour", "read")
PHOTOS = (("astronaut", "Describe the image."), ("coffee", "Describe the image."))


def prompts(target: Path, data: Path) -> list:
    """Four held-out testbed questions (one per kind) and two skimage photos, chat-formatted."""
    from skimage import data as skdata
    from transformers import AutoTokenizer

    from benchmarks import throughput as tp
    from benchmarks.testbed import task
    from PIL import Image

    samples = task.load_split(data, "test")
    items = [tp.PromptItem(s.id, s.kind, {"messages": task.messages(s),
                                          "image": task.render(s.scene)}, True)
             for s in (next(x for x in samples if x.kind == kind) for kind in TESTBED_KINDS)]
    for name, question in PHOTOS:
        # Shown at the testbed's image size (140x140, 25 image tokens), the only size the target
        # was trained on; at full size it sees 10x more image tokens and rambles.
        image = Image.fromarray(getattr(skdata, name)()).convert("RGB").resize(
            (task.IMAGE_SIZE, task.IMAGE_SIZE), Image.Resampling.BICUBIC)
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": question}]}]
        items.append(tp.PromptItem(name, "photo", {"messages": messages, "image": image}, True))
    return tp.render_prompts(items, AutoTokenizer.from_pretrained(str(target)))


def main() -> int:
    from transformers import AutoTokenizer

    from benchmarks import throughput as tp
    from benchmarks.testbed import assets

    paths = assets.ensure()
    target, models = paths["target"], paths["models"]
    items = prompts(target, paths["data"])
    tokenizer = AutoTokenizer.from_pretrained(str(target))
    methods = [tp.Method("no speculation", "none"),
               tp.Method("blind LM, text-only", "massv", str(paths["drafter-blind"])),
               tp.Method("MASSV", "massv", str(models / "drafter-massv"))]
    engine_args = {"dtype": "float32", "enforce_eager": True, "block_size": 32}
    runs = {}
    for m in methods:
        print(f"--- starting vLLM: {m.label} ...", flush=True)
        llm = tp.make_llm(str(target), m.speculative_config(K), max_num_seqs=1,
                          engine_args=engine_args)
        try:
            tp.run_requests(llm, items[:1], batch_size=1, temperature=0.0, max_tokens=8)
            runs[m.label] = tp.run_requests(llm, items, batch_size=1, temperature=0.0,
                                            max_tokens=MAX_TOKENS, per_request=True)
        finally:
            tp.shutdown(llm)
    base = runs["no speculation"]
    print("\nAnswers (the target's, greedy; the photos are outside its training data):")
    for item, rec in zip(items, base["records"]):
        text = tokenizer.decode(rec["token_ids"], skip_special_tokens=True)
        question = item.inputs["prompt"].split("<|vision_end|>")[-1].split("<|im_end|>")[0]
        print(f"  [{item.kind}] {question.strip()}\n      -> {text}")
    print(f"\n{'method':22s} {'tau':>5s} {'testbed':>8s} {'photos':>7s} {'tok/s':>7s} "
          f"{'speedup':>8s}  identical")
    ok = True
    base_tps = sum(len(r["token_ids"]) for r in base["records"]) / base["seconds"]
    for label, run in runs.items():
        same = [r["token_ids"] for r in run["records"]] == [r["token_ids"] for r in
                                                             base["records"]]
        ok &= same
        tps = sum(len(r["token_ids"]) for r in run["records"]) / run["seconds"]
        taus = [_tau(run, lambda r: r["kind"] != "photo"), _tau(run, lambda r: r["kind"] == "photo")]
        print(f"{label:22s} {_fmt(tp.tau_of(run['delta'])):>5s} {_fmt(taus[0]):>8s} "
              f"{_fmt(taus[1]):>7s} {tps:7.1f} {tps / base_tps:7.2f}x  {'yes' if same else 'NO'}")
    print(f"\nk = {K}, greedy, one request at a time, CPU fp32, tiny self-trained models "
          "(benchmarks/testbed/README.md). Full comparison: make benchmark.")
    return 0 if ok else 1


def _tau(run: dict, keep) -> float | None:
    recs = [r for r in run["records"] if keep(r) and "delta" in r]
    drafts = sum(r["delta"]["drafts"] for r in recs)
    return 1 + sum(r["delta"]["accepted"] for r in recs) / drafts if drafts else None


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    sys.exit(main())
