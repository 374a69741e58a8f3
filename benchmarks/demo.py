"""`make demo`: MASSV speculative decoding inside vLLM on a tiny local testbed (CPU).

Builds (once, into .cache/demo) a tiny random-weight Qwen2.5-VL target and two drafters with
`massv init`, then runs the same image prompts (two real photos from `skimage.data` and a
synthetic image) three ways in vLLM's offline engine:

  1. the target alone (no speculation),
  2. stock `draft_model` with the target's language model as the drafter,
  3. the MASSV sanity drafter (same weights + the target's image embeddings, M-RoPE positions),

and prints the answers, τ (mean acceptance length, 1 + accepted/drafts), acceptance rate and
speed relative to no speculation. The models are random and tiny: the answers are gibberish and
the drafter costs as much as the target, so there is no speed-up to expect here; what the demo
shows is that MASSV's drafts are accepted where stock vLLM's are not, and that every answer is
token-identical to the target's own.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")
ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "demo"
K = 4
MAX_TOKENS = 32


def build_models() -> dict[str, Path]:
    from vllm_massv import testing as mt

    return mt.build_tiny_testbed(CACHE)


def run(target: Path, draft: Path | None, prompts: list[dict]) -> dict:
    from vllm import LLM, SamplingParams

    spec = None if draft is None else {"method": "draft_model", "model": str(draft),
                                       "num_speculative_tokens": K}
    llm = LLM(model=str(target), dtype="float32", max_model_len=2048, max_num_seqs=4,
              enforce_eager=True, block_size=32, limit_mm_per_prompt={"image": 1, "video": 0},
              seed=0, disable_log_stats=False, speculative_config=spec)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up
    before = _counters(llm)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    after = _counters(llm)
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    drafts = after.get("drafts", 0) - before.get("drafts", 0)
    accepted = after.get("accepted", 0) - before.get("accepted", 0)
    drafted = after.get("draft_tokens", 0) - before.get("draft_tokens", 0)
    return {"outputs": outs, "seconds": seconds,
            "tau": 1 + accepted / drafts if drafts else None,
            "acceptance": accepted / drafted if drafted else None}


def _counters(llm) -> dict[str, float]:
    names = {"vllm:spec_decode_num_drafts": "drafts", "vllm:spec_decode_num_draft_tokens":
             "draft_tokens", "vllm:spec_decode_num_accepted_tokens": "accepted"}
    return {names[m.name]: m.value for m in llm.get_metrics() if m.name in names}


def main() -> int:
    from vllm_massv import testing as mt

    paths = build_models()
    imgs = mt.sample_images()
    questions = [("astronaut", "Who is in this photo?"), ("chelsea", "What animal is this?"),
                 ("gradient", "Describe the colours.")]
    prompts = [{"prompt": mt.image_prompt(paths["target"], q), "multi_modal_data":
                {"image": imgs[name]}} for name, q in questions]
    results = {label: run(paths["target"], draft, prompts) for label, draft in
               [("no speculation", None), ("stock draft_model", paths["stock"]),
                ("MASSV (sanity drafter)", paths["sanity"])]}
    base = results["no speculation"]
    ref_ids = [list(o.outputs[0].token_ids) for o in base["outputs"]]
    print("\nAnswers of the target (random tiny weights: gibberish by design):")
    for (name, q), o in zip(questions, base["outputs"]):
        print(f"  [{name}] {q} -> {o.outputs[0].text[:80]!r}")
    print(f"\n{'method':26s} {'tau':>6s} {'accept':>7s} {'tokens/s':>9s} {'speed':>6s}  same")
    ok = True
    for label, r in results.items():
        ids = [list(o.outputs[0].token_ids) for o in r["outputs"]]
        same = ids == ref_ids
        ok &= same
        tps = len(prompts) * MAX_TOKENS / r["seconds"]
        tau = f"{r['tau']:.2f}" if r["tau"] else "-"
        acc = f"{r['acceptance']:.0%}" if r["acceptance"] is not None else "-"
        print(f"{label:26s} {tau:>6s} {acc:>7s} {tps:9.1f} "
              f"{base['seconds'] / r['seconds']:5.2f}x  {'yes' if same else 'NO'}")
    print(f"\nk = {K}, greedy, {MAX_TOKENS} tokens per prompt, batch of {len(prompts)}, CPU fp32. "
          "The sanity drafter is as large as the target, so speed is not the point here.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
