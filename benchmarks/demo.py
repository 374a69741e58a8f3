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

and prints first τ (mean acceptance length, 1 + accepted/drafts) and the speedup over no
speculation on the testbed questions (what the target was trained for), then the photos' τ on a
line of their own, then the answers. Every speculative answer is checked token-identical to the
target's own (greedy).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # the demo's own lines, not engine logs
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness.engine import make_llm, run_requests, shutdown  # noqa: E402
from benchmarks.harness.methods import Method  # noqa: E402
from benchmarks.harness.prompts import PromptItem, render_prompts  # noqa: E402
from benchmarks.harness.report import tau_of_records  # noqa: E402
from benchmarks.testbed import assets, task  # noqa: E402

K = 4
MAX_TOKENS = 96
TESTBED_KINDS = ("describe", "where", "colour", "read")
TEXT_ONLY = "text-only drafter"   # the blind LM, projector none
MASSV = "MASSV"
PHOTOS = (("astronaut", "Describe the image."), ("coffee", "Describe the image."))


def prompts(target: Path, data: Path) -> list:
    """Four held-out testbed questions (one per kind) and two skimage photos, chat-formatted."""
    from PIL import Image
    from skimage import data as skdata
    from transformers import AutoTokenizer

    samples = task.load_split(data, "test")
    items = [PromptItem(s.id, s.kind, {"messages": task.messages(s),
                                       "image": task.render(s.scene)}, True)
             for s in (next(x for x in samples if x.kind == kind) for kind in TESTBED_KINDS)]
    for name, question in PHOTOS:
        # Shown at the testbed's image size (140x140, 25 image tokens), the only size the target
        # was trained on; at full size it sees 10x more image tokens and rambles.
        image = Image.fromarray(getattr(skdata, name)()).convert("RGB").resize(
            (task.IMAGE_SIZE, task.IMAGE_SIZE), Image.Resampling.BICUBIC)
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": question}]}]
        items.append(PromptItem(name, "photo", {"messages": messages, "image": image}, True))
    return render_prompts(items, AutoTokenizer.from_pretrained(str(target)))


def main() -> int:
    from transformers import AutoTokenizer

    paths = assets.ensure()
    target, models = paths["target"], paths["models"]
    items = prompts(target, paths["data"])
    tokenizer = AutoTokenizer.from_pretrained(str(target))
    methods = [Method("no speculation", "none"),
               Method(TEXT_ONLY, "massv", str(paths["drafter-blind"])),
               Method(MASSV, "massv", str(models / "drafter-massv"))]
    engine_args = {"dtype": "float32", "enforce_eager": True, "block_size": 32}
    runs = {}
    for m in methods:
        print(f"--- starting vLLM: {m.label} ...", flush=True)
        llm = make_llm(str(target), m.speculative_config(K), max_num_seqs=1,
                       engine_args=engine_args)
        try:
            run_requests(llm, items[:1], batch_size=1, temperature=0.0, max_tokens=8)
            runs[m.label] = run_requests(llm, items, batch_size=1, temperature=0.0,
                                         max_tokens=MAX_TOKENS, per_request=True)
        finally:
            shutdown(llm)
    base = runs["no speculation"]
    ok = all([r["token_ids"] for r in run["records"]] == [r["token_ids"] for r in base["records"]]
             for run in runs.values())
    print(headline(runs, K))
    print(photos_line(runs))
    print("\nAnswers (the target's, greedy; every speculative answer "
          f"{'is token-identical' if ok else 'is NOT identical'} to them):")
    for item, rec in zip(items, base["records"]):
        text = tokenizer.decode(rec["token_ids"], skip_special_tokens=True)
        question = item.inputs["prompt"].split("<|vision_end|>")[-1].split("<|im_end|>")[0]
        print(f"  [{item.kind}] {question.strip()}\n      -> {text}")
    print(f"\nk = {K}, greedy, one request at a time, CPU fp32, tiny self-trained models "
          "(benchmarks/testbed/README.md). Full comparison: make benchmark. Served through "
          "`vllm serve`: make serve-demo.")
    return 0 if ok else 1


def _is_photo(rec: dict) -> bool:
    return rec["kind"] == "photo"


def _tok_per_s(run: dict, keep) -> float:
    recs = [r for r in run["records"] if keep(r)]
    return sum(len(r["token_ids"]) for r in recs) / sum(r["latency_s"] for r in recs)


def headline(runs: dict[str, dict], k: int) -> str:
    """The table a newcomer reads first: the testbed questions only (what the target was trained
    for), MASSV against the text-only drafter."""
    testbed = [r for r in next(iter(runs.values()))["records"] if not _is_photo(r)]
    base = runs["no speculation"]
    base_tps = _tok_per_s(base, lambda r: not _is_photo(r))
    lines = [f"\n=== {len(testbed)} held-out testbed questions (the scenes the target was trained "
             f"on), k = {k} ===",
             f"{'method':22s} {'tau':>5s} {'tok/s':>7s} {'speedup':>8s}  identical to target"]
    for label, run in runs.items():
        same = [r["token_ids"] for r in run["records"]] == [r["token_ids"] for r in
                                                             base["records"]]
        tps = _tok_per_s(run, lambda r: not _is_photo(r))
        lines.append(f"{label:22s} {_fmt(_tau(run, lambda r: not _is_photo(r))):>5s} "
                     f"{tps:7.1f} {tps / base_tps:7.2f}x  {'yes' if same else 'NO'}")
    if TEXT_ONLY in runs and MASSV in runs:
        tm, tt = (_tau(runs[m], lambda r: not _is_photo(r)) for m in (MASSV, TEXT_ONLY))
        if tm and tt:
            lines.append(f"MASSV: {tm:.2f} tokens per target step against {tt:.2f} for the same "
                         f"LM without image features ({tm / tt - 1:+.0%}).")
    return "\n".join(lines)


def photos_line(runs: dict[str, dict]) -> str:
    """The two photos on their own line, with why their τ is low."""
    names = [r["id"] for r in next(iter(runs.values()))["records"] if _is_photo(r)]
    taus = ", ".join(f"{label} {_fmt(_tau(run, _is_photo))}" for label, run in runs.items()
                     if label != "no speculation")
    return (f"\nPhotos ({', '.join(names)}): tau {taus}. Low for every drafter: the target never "
            "saw a photo and answers with shapes that are not in it, text no drafter can "
            "predict from the image.")


def _tau(run: dict, keep) -> float | None:
    return tau_of_records([r for r in run["records"] if keep(r)])


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    sys.exit(main())
