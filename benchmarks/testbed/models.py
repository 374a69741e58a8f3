"""Train the testbed's base models on CPU: the target VLM and the blind text LM.

The testbed (issue 4) needs a target whose answers depend on the image, and a small text LM that
is fluent on the same conversations but blind -- the stand-in for an off-the-shelf small LM that
MASSV turns into a drafter. Both are trained here with plain PyTorch + transformers on fresh
samples drawn from :mod:`benchmarks.testbed.task` (train-split keys only), so no pixel data is
stored and every batch is new.

* ``target``: a ``Qwen2_5_VLForConditionalGeneration`` (text: hidden 192, 6 layers, 4 heads of 48,
  2 KV heads, FFN 512, M-RoPE sections [6, 9, 9], vocab 832 > tokenizer 768 as in real
  Qwen2.5-VL; vision: depth 2, hidden 192, patch 14, merge 2), with the byte-level BPE
  (768 entries) trained on :func:`task.corpus`. Images are 140x140 -> 10x10 patches -> 25 image
  tokens. Loss on the answer tokens and ``<|im_end|>``. ``mm_token_type_ids`` is always passed:
  without it transformers silently uses 1-D positions (testbed findings).
* ``blind``: a ``Qwen2ForCausalLM`` (hidden 128, 2 layers, FFN 256, tied embeddings, vocab 768)
  trained on the same conversations with the image placeholders left in as ordinary
  ``<|image_pad|>`` tokens and no pixels: it learns the phrasing and the text-only tasks, and can
  only guess the image content.

``--family qwen3_vl`` (issue 24) builds the Qwen3-VL testbed instead (``qwen3-vl/models/``): a
``Qwen3VLForConditionalGeneration`` target (text: hidden 192, 4 layers, 4 heads of 48, 2 KV
heads, FFN 512, interleaved M-RoPE [8, 8, 8], vocab 832; vision: depth 3, hidden 128, patch 14,
merge 2, DeepStack taps [0, 1] -> vLLM caches [25, 192 x 3] per 140x140 image) and a blind
``Qwen3ForCausalLM`` (as ``blind`` plus ``q_norm`` / ``k_norm``, head_dim 32), same tokenizer
and task. Smaller than the Qwen2.5-VL target (4 layers, not 6) so that it trains in one sitting.

Both use AdamW with a warm-up and a cosine schedule over a wall-clock budget (``--minutes``), and
save the model every few minutes, so an interrupted run still leaves a usable checkpoint.
Never run two trainings at once on a 2-core machine: each gets about 3x slower.

CLI::

    python -m benchmarks.testbed.models target --out benchmarks/testbed/models/target --minutes 30
    python -m benchmarks.testbed.models blind --out benchmarks/testbed/models/blind \\
        --tokenizer benchmarks/testbed/models/target --minutes 5
    python -m benchmarks.testbed.models eval --model benchmarks/testbed/models/target --n 80
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.testbed import task
from vllm_massv import testing
from vllm_massv.testing import qwen3_vl

#: Tokenizer size; the target's embedding is padded to TARGET_VOCAB (like Qwen2.5-VL's 151936 rows
#: for a 151665-entry tokenizer) so the drafter pairing exercises vocab padding.
TOKENIZER_VOCAB = 768
TARGET_VOCAB = 832
TARGET_ARCH = dict(hidden_size=192, num_layers=6, num_heads=4, intermediate_size=512,
                   vision_hidden_size=192, vision_depth=2, max_pixels=224 * 224)
BLIND_ARCH = dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=256, tie_word_embeddings=True)
QWEN3_VL_TARGET_ARCH = dict(hidden_size=192, num_layers=4, num_heads=4, num_kv_heads=2,
                            head_dim=48, intermediate_size=512, mrope_section=[8, 8, 8],
                            vision_hidden_size=128, vision_depth=3,
                            deepstack_visual_indexes=[0, 1], patch_size=14,
                            max_pixels=224 * 224)
QWEN3_BLIND_ARCH = dict(hidden_size=128, num_layers=2, num_heads=4, head_dim=32,
                        intermediate_size=256)
#: Per testbed family: (target builder, its sizes, blind-LM builder, its sizes).
FAMILIES = {
    "qwen2_5_vl": (testing.build_target, TARGET_ARCH, testing.build_text_lm, BLIND_ARCH),
    "qwen3_vl": (qwen3_vl.build_qwen3_vl_target, QWEN3_VL_TARGET_ARCH,
                 qwen3_vl.build_qwen3_text_lm, QWEN3_BLIND_ARCH),
}
CORPUS_SAMPLES = 3000
SAVE_EVERY_S = 300.0


def tokenizer_corpus() -> list[str]:
    """The text the testbed tokenizer is trained on (task prompts/answers + chat boilerplate)."""
    return task.corpus(CORPUS_SAMPLES) + ["system\nYou are a helpful assistant.", "user", "assistant"]


def sample_stream(seed: int, split: str = "train") -> Iterator[task.Sample]:
    """Endless fresh samples whose keys fall in ``split`` (held-out scenes never appear)."""
    rng = random.Random(seed)
    accept = (lambda key: task.split_of(key) == split)
    while True:
        yield task.make_sample(rng, accept=accept)


def chat_prompt(tokenizer: Any, sample: task.Sample) -> str:
    """The chat-formatted prompt of ``sample`` (system turn, user turn, assistant header)."""
    return tokenizer.apply_chat_template(task.messages(sample), tokenize=False,
                                         add_generation_prompt=True)


class Batcher:
    """Turn samples into a padded training batch with answer-only labels.

    ``with_images=False`` (the blind LM) keeps the single ``<|image_pad|>`` placeholder of each
    image expanded to the same number of tokens the target sees (25 for a 140x140 image), so the
    blind LM's inputs have the target's token layout, without pixels.
    """

    def __init__(self, model_dir: Path, with_images: bool) -> None:
        from transformers import AutoProcessor, AutoTokenizer

        self.with_images = with_images
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.processor = AutoProcessor.from_pretrained(str(model_dir)) if with_images else None
        header = self.tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
        self.header = header
        self.image_tokens = (task.IMAGE_SIZE // 28) ** 2

    def encode(self, texts: list[str], samples: list[task.Sample],
               padding_side: str) -> dict[str, torch.Tensor]:
        """Tokenize ``texts`` (chat-formatted, one per sample) with the samples' images (or, for
        the blind LM, the image placeholders expanded to the target's token count)."""
        if self.with_images:
            images = [task.render(s.scene) for s in samples if s.has_image]
            return self.processor(text=texts, images=images or None, return_tensors="pt",
                                  padding=True, padding_side=padding_side,
                                  return_mm_token_type_ids=True)
        pad = "<|image_pad|>"
        texts = [t.replace(pad, pad * self.image_tokens) for t in texts]
        return self.tokenizer(texts, return_tensors="pt", padding=True,
                              padding_side=padding_side, add_special_tokens=False)

    def __call__(self, samples: list[task.Sample]) -> dict[str, torch.Tensor]:
        texts = [chat_prompt(self.tokenizer, s) + s.answer + "<|im_end|>" for s in samples]
        batch = self.encode(texts, samples, "right")
        ids = batch["input_ids"]
        labels = torch.full_like(ids, -100)
        h = len(self.header)
        for row in range(ids.shape[0]):
            seq = ids[row].tolist()
            start = next(i + h for i in range(len(seq) - h, -1, -1) if seq[i:i + h] == self.header)
            end = int(batch["attention_mask"][row].sum())
            labels[row, start:end] = ids[row, start:end]
        batch = dict(batch)
        batch["labels"] = labels
        return batch


def _lr(step: int, elapsed: float, budget: float, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, elapsed / budget)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train(model: Any, batcher: Batcher, out_dir: Path, *, minutes: float, batch_size: int,
          lr: float, seed: int, warmup: int = 100, log_every: int = 25) -> dict[str, Any]:
    """Train ``model`` in place on fresh train-split samples for ``minutes`` of wall clock.

    Saves to ``out_dir`` every :data:`SAVE_EVERY_S` s and at the end; appends one JSON line per
    ``log_every`` steps to ``out_dir/train_log.jsonl``. Returns a summary dict.
    """
    torch.manual_seed(seed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    stream = sample_stream(seed)
    budget = minutes * 60.0
    t0 = last_save = time.perf_counter()
    step, tokens, losses = 0, 0, []
    log = (out_dir / "train_log.jsonl").open("a", encoding="utf-8")
    while (elapsed := time.perf_counter() - t0) < budget:
        batch = batcher([next(stream) for _ in range(batch_size)])
        for group in opt.param_groups:
            group["lr"] = _lr(step, elapsed, budget, lr, warmup)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        tokens += int(batch["attention_mask"].sum())
        losses.append(loss.item())
        if step % log_every == 0:
            rec = {"step": step, "loss": sum(losses[-log_every:]) / log_every,
                   "lr": opt.param_groups[0]["lr"], "elapsed_s": round(elapsed, 1),
                   "tokens_per_s": round(tokens / max(elapsed, 1e-9))}
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if time.perf_counter() - last_save > SAVE_EVERY_S:
            _save(model, out_dir)
            last_save = time.perf_counter()
    log.close()
    model.eval()
    _save(model, out_dir)
    elapsed = time.perf_counter() - t0
    return {"steps": step, "batch_size": batch_size, "seconds": round(elapsed, 1),
            "tokens": tokens, "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:]))}


def _save(model: Any, out_dir: Path) -> None:
    was_training = model.training
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    testing.write_generation_config(out_dir)
    model.train(was_training)


def build_target(out_dir: Path, *, minutes: float, batch_size: int = 32, lr: float = 2e-3,
                 seed: int = 0, resume: bool = False,
                 family: str = "qwen2_5_vl") -> dict[str, Any]:
    """Initialise (``testing.build_target`` / ``build_qwen3_vl_target`` with the testbed sizes
    of ``family``) and train the target; ``resume`` continues from the model in ``out_dir`` (a
    fresh schedule and sample stream)."""
    from transformers import AutoModelForImageTextToText

    if not resume:
        build, arch = FAMILIES[family][:2]
        build(out_dir, seed=seed, vocab_size=TARGET_VOCAB, weight_scale=1.0,
              tokenizer_corpus=tokenizer_corpus(), tokenizer_vocab_size=TOKENIZER_VOCAB, **arch)
    model = AutoModelForImageTextToText.from_pretrained(str(out_dir), dtype=torch.float32)
    return train(model, Batcher(out_dir, with_images=True), out_dir, minutes=minutes,
                 batch_size=batch_size, lr=lr, seed=seed + (100 if resume else 0))


def build_blind(out_dir: Path, *, minutes: float, batch_size: int = 48, lr: float = 3e-3,
                seed: int = 1, resume: bool = False,
                family: str = "qwen2_5_vl") -> dict[str, Any]:
    """Initialise (``testing.build_text_lm``, or ``build_qwen3_text_lm`` for ``qwen3_vl``) and
    train the blind text LM (``resume``: as for :func:`build_target`)."""
    from transformers import AutoModelForCausalLM

    if not resume:
        build, arch = FAMILIES[family][2:]
        build(out_dir, seed=seed, vocab_size=TOKENIZER_VOCAB, weight_scale=1.0,
              tokenizer_corpus=tokenizer_corpus(), tokenizer_vocab_size=TOKENIZER_VOCAB, **arch)
    model = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32)
    return train(model, Batcher(out_dir, with_images=False), out_dir, minutes=minutes,
                 batch_size=batch_size, lr=lr, seed=seed + 1000 + (100 if resume else 0))


@torch.no_grad()
def evaluate(model_dir: Path, n: int, *, split: str = "val", seed: int = 0,
             max_new_tokens: int = 96, batch_size: int = 16) -> dict[str, Any]:
    """Greedy answers (transformers ``generate``) of the model in ``model_dir`` on ``n`` fresh
    ``split`` samples; per-kind attribute accuracy and exact-match rate (:func:`task.score`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(str(model_dir))
    is_vlm = "vision_config" in config.to_dict()
    cls = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
    model = cls.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    batcher = Batcher(model_dir, with_images=is_vlm)
    tok = batcher.tokenizer
    stream = sample_stream(seed + 7919, split)
    samples = [next(stream) for _ in range(n)]
    samples.sort(key=lambda s: (s.has_image, s.kind))
    per_kind: dict[str, list[dict[str, bool]]] = defaultdict(list)
    examples = []
    for i in range(0, n, batch_size):
        chunk = samples[i:i + batch_size]
        inputs = batcher.encode([chat_prompt(tok, s) for s in chunk], chunk, "left")
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=testing.EOS_TOKEN_ID, pad_token_id=testing.PAD_TOKEN_ID)
        texts = tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for s, text in zip(chunk, texts):
            per_kind[s.kind].append(task.score(s, text))
            if len(examples) < 12:
                examples.append({"kind": s.kind, "prompt": s.prompt, "answer": text.strip(),
                                 "reference": s.answer})
    report: dict[str, Any] = {"n": n, "split": split, "kinds": {}}
    for kind, scores in sorted(per_kind.items()):
        attrs = sorted(scores[0])
        report["kinds"][kind] = {
            "n": len(scores),
            "all_correct": sum(all(s.values()) for s in scores) / len(scores),
            **{a: sum(s[a] for s in scores) / len(scores) for a in attrs},
        }
    report["examples"] = examples
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("target", "blind"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--minutes", type=float, required=True)
        p.add_argument("--batch-size", type=int)
        p.add_argument("--lr", type=float)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--family", choices=list(FAMILIES), default="qwen2_5_vl",
                       help="target family of the testbed (qwen3_vl: qwen3-vl/models/)")
        p.add_argument("--resume", action="store_true",
                       help="continue training the model already in --out")
    p = sub.add_parser("eval")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--n", type=int, default=80)
    p.add_argument("--split", default="val")
    p.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cmd == "eval":
        report = evaluate(args.model, args.n, split=args.split)
        print(json.dumps(report, indent=2))
        return 0
    kwargs = {k: v for k, v in (("batch_size", args.batch_size), ("lr", args.lr)) if v is not None}
    build = build_target if args.cmd == "target" else build_blind
    summary = build(args.out, minutes=args.minutes, resume=args.resume, family=args.family,
                    **kwargs)
    path = args.out / "train_summary.json"
    old = json.loads(path.read_text()) if args.resume and path.is_file() else {"runs": []}
    runs = old.get("runs", [old])
    runs.append({**summary, "lr": kwargs.get("lr"), "resumed": args.resume})
    path.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
