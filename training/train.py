"""`massv train`: the two MASSV training phases (MASSV, arXiv 2505.10526 §3.2).

* `--phase align` — projector alignment: only the projector trains, the LM is frozen; targets are
  the data set's own answers (`reference` column: e.g. LLaVA-Pretrain captions).
* `--phase sdvit` — self-distilled visual instruction tuning: projector + LM train on the target's
  own responses (`token_ids` column written by `massv generate`); loss is cross-entropy to the
  target's tokens, or (`--loss kl`) KL to the target's stored top-k distribution.

The loss covers response tokens only. Image embeddings come from the target's frozen vision tower
(`features.TargetImageEncoder`), exactly what vLLM hands the drafter at serving time. Runs on one
CPU process here; on GPUs launch it with `accelerate launch` (DDP/FSDP). The output directory is a
drafter that `vllm serve --speculative-config` loads with no extra flags.

Resumable: `--save-every N` writes `checkpoints/step-N` (model, optimizer, scheduler, RNG, data
position); rerunning the same command continues from the newest checkpoint with the same data
order and step count.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vllm_massv.config import MassvConfig, MassvConfigError
from vllm_massv.hf.modeling_massv_qwen2 import mrope_positions
from vllm_massv.init_drafter import copy_tokenizer_files
from vllm_massv.speculators import (DEFAULT_NUM_SPECULATIVE_TOKENS,
                                    checkpoint_num_speculative_tokens, speculators_fields)
from vllm_massv.training.model_card import phase_history, phase_record, write_model_card

Phase = Literal["align", "sdvit"]
IGNORE = -100


@dataclass
class TrainConfig:
    """Hyper-parameters of one phase (written to `<out>/train_config.json`)."""
    phase: Phase
    drafter: str                  # input drafter dir (from `massv init` or a previous phase)
    data: str                     # Parquet dir written by `massv generate`
    target: str                   # target VLM dir (vision tower for image embeddings)
    out: str
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; default: from epochs
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    loss: Literal["ce", "kl"] = "ce"
    dtype: Literal["float32", "bfloat16"] = "float32"
    max_seq_len: int = 2048
    eval_fraction: float = 0.05
    eval_every: int = 0           # 0: evaluate at the start and the end only
    save_every: int = 0           # 0: no intermediate checkpoints
    seed: int = 0
    feature_cache: str | None = None
    license: str | None = None    # Hub license id for the model card (default "other")
    stop_after: int | None = field(default=None, metadata={"help": "testing: stop after N steps"})


@dataclass
class Example:
    id: str
    input_ids: list[int]          # prompt + response
    prompt_len: int
    images: list[str]
    top_ids: list[list[int]] | None = None       # response positions x k (for --loss kl)
    top_logprobs: list[list[float]] | None = None


def load_examples(cfg: TrainConfig, tokenizer) -> list[Example]:
    """Training examples from `massv generate` Parquet shards, sorted by id.

    align: prompt + the data set's `reference` answer (+ end-of-turn); sdvit: prompt + the
    target's `token_ids`. Rows without the needed column are skipped.
    """
    import pyarrow.parquet as pq

    files = data_files(cfg.data)
    table = [row for f in files for row in pq.read_table(f).to_pylist()]
    end_of_turn = end_of_turn_id(tokenizer)
    examples = []
    for row in sorted(table, key=lambda r: r["id"]):
        prompt = list(row["prompt_token_ids"])
        if cfg.phase == "align":
            if not row.get("reference"):
                continue
            response = tokenizer(row["reference"], add_special_tokens=False)["input_ids"]
            response = response + [end_of_turn]
        else:
            response = list(row["token_ids"])
        ids = (prompt + response)[: cfg.max_seq_len]
        if len(ids) <= len(prompt):
            continue
        examples.append(Example(row["id"], ids, len(prompt), list(row["images"] or []),
                                row.get("top_logprob_ids"), row.get("top_logprobs")))
    if cfg.loss == "kl" and any(e.top_ids is None for e in examples):
        raise MassvConfigError("--loss kl needs top-k logprobs: run `massv generate --logprobs K`")
    return examples


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an assistant turn: Qwen's `<|im_end|>`, Gemma's `<end_of_turn>`,
    else the tokenizer's eos."""
    vocab = tokenizer.get_vocab()
    for token in ("<|im_end|>", "<end_of_turn>"):
        if token in vocab:
            return vocab[token]
    if tokenizer.eos_token_id is None:
        raise MassvConfigError("the tokenizer has no end-of-turn or eos token")
    return tokenizer.eos_token_id


def data_files(data_dir: str | Path) -> list[Path]:
    """The Parquet parts of a `massv generate` output directory (all shards)."""
    from vllm_massv.training.generate import PARTS_DIR

    root = Path(data_dir)
    files = sorted((root / PARTS_DIR).glob("part-*.parquet")) or sorted(root.glob("part-*.parquet"))
    if not files:
        raise MassvConfigError(f"{data_dir}: no Parquet parts (run `massv generate` first)")
    return files


def image_max_pixels(data_dir: str | Path) -> int | None:
    """The image-size limit `massv generate` applied, so training sees the same pixels."""
    import pyarrow.parquet as pq

    from vllm_massv.training.data import DEFAULT_MAX_PIXELS

    meta = pq.read_schema(data_files(data_dir)[0]).metadata or {}
    settings = json.loads(meta.get(b"massv", b"{}")).get("settings", {})
    return settings.get("image_max_pixels", DEFAULT_MAX_PIXELS)


def split_examples(examples: list[Example], eval_fraction: float, seed: int
                   ) -> tuple[list[Example], list[Example]]:
    """Deterministic held-out split by hashed id (stable when the data set grows)."""
    import hashlib

    def held_out(e: Example) -> bool:
        h = int(hashlib.sha256(f"{seed}:{e.id}".encode()).hexdigest()[:8], 16)
        return h / 0xFFFFFFFF < eval_fraction

    evals = [e for e in examples if held_out(e)]
    return [e for e in examples if not held_out(e)], evals


class Batcher:
    """Pads examples, loads their images and computes the target image embeddings."""

    def __init__(self, encoder, pad_id: int, image_token_id: int,
                 max_pixels: int | None, mrope: bool = False) -> None:
        self.encoder, self.pad_id, self.image_token_id = encoder, pad_id, image_token_id
        self.max_pixels, self.mrope = max_pixels, mrope

    def __call__(self, batch: list[Example]) -> dict[str, torch.Tensor | None]:
        from vllm_massv.training.data import load_image

        width = max(len(e.input_ids) for e in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE)
        attention = torch.zeros_like(input_ids)
        image_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        images = []
        positions = torch.zeros(3, len(batch), width, dtype=torch.long) if self.mrope else None
        for i, e in enumerate(batch):
            ids = torch.tensor(e.input_ids)
            input_ids[i, : len(ids)] = ids
            attention[i, : len(ids)] = 1
            # position t predicts token t+1: label the response tokens at their own position
            labels[i, e.prompt_len: len(ids)] = ids[e.prompt_len:]
            image_mask[i, : e.prompt_len] = ids[: e.prompt_len] == self.image_token_id
            own = []
            for path in e.images:
                image = load_image(path, self.max_pixels)
                if image is None:
                    raise ValueError(f"{e.id}: image {path} is no longer readable")
                own.append(image)
            images += own
            if positions is not None:
                # the target's M-RoPE positions over the prompt; the response continues as text
                grids = [self.encoder.grid(im) for im in own]
                prompt_pos = mrope_positions(e.input_ids[: e.prompt_len], self.image_token_id,
                                             grids)
                start = int(prompt_pos.max()) + 1 if e.prompt_len else 0
                positions[:, i, : e.prompt_len] = prompt_pos
                positions[:, i, e.prompt_len:] = start + torch.arange(width - e.prompt_len)
        embeds = self.encoder.encode(images) if images else None
        if embeds is not None and embeds.shape[0] != int(image_mask.sum()):
            raise ValueError(f"{embeds.shape[0]} image embeddings for {int(image_mask.sum())} "
                             f"placeholders in batch {[e.id for e in batch]}")
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
                "image_mask": image_mask, "image_embeds": embeds, "position_ids": positions}


def compute_loss(model, batch: dict, examples: list[Example], kind: str
                 ) -> tuple[torch.Tensor, int, int]:
    """(mean loss over response tokens, #response tokens, #tokens where the drafter's argmax
    equals the target's token)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                image_embeds=batch["image_embeds"], image_mask=batch["image_mask"],
                position_ids=batch.get("position_ids"))
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    valid = labels != IGNORE
    n = int(valid.sum())
    agree = int(((logits.argmax(-1) == labels) & valid).sum())
    # Target tokens in the padded vocabulary rows can never be drafted (their logits are -inf):
    # they count as misses in the agreement but carry no loss.
    learnable = valid & (labels < model_vocab(model))
    if kind == "ce":
        loss = F.cross_entropy(logits[learnable], labels[learnable])
    else:
        loss = _topk_kl(logits, examples, model_vocab(model))
    return loss, n, agree


def model_vocab(model) -> int:
    """The drafter's original (unpadded) vocabulary size."""
    return getattr(model, "module", model).massv_config.orig_vocab_size


def _topk_kl(logits: torch.Tensor, examples: list[Example], vocab: int) -> torch.Tensor:
    """KL(target's top-k, renormalized over draftable ids || drafter) at response positions."""
    losses = []
    logp = torch.log_softmax(logits, dim=-1)
    for i, e in enumerate(examples):
        n = len(e.input_ids) - e.prompt_len
        ids = torch.tensor(e.top_ids[:n])
        draftable = ids < vocab
        target_logp = torch.tensor(e.top_logprobs[:n]).masked_fill(~draftable, float("-inf"))
        p = torch.softmax(target_logp, dim=-1)
        q = logp[i, e.prompt_len - 1: e.prompt_len - 1 + n].gather(-1, ids.clamp_max(vocab - 1))
        kl = torch.where(draftable, p * (p.clamp_min(1e-12).log() - q), torch.zeros_like(p))
        losses.append(kl.sum(-1))
    return torch.cat(losses).mean()


@torch.no_grad()
def evaluate(model, batcher: Batcher, examples: list[Example], batch_size: int, kind: str
             ) -> dict[str, float]:
    """Held-out loss and drafter/target next-token agreement (teacher-forced)."""
    if not examples:
        return {}
    model.eval()
    total_loss = total_n = total_agree = 0.0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i: i + batch_size]
        loss, n, agree = compute_loss(model, batcher(chunk), chunk, kind)
        total_loss += float(loss) * n
        total_n += n
        total_agree += agree
    model.train()
    return {"eval_loss": total_loss / max(total_n, 1), "eval_agreement": total_agree / max(total_n, 1)}


def train(cfg: TrainConfig) -> dict:
    """Run one phase; returns the final metrics (also in `<out>/train_log.jsonl`)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer, get_cosine_schedule_with_warmup

    from vllm_massv.hf import drafter_class
    from vllm_massv.training.features import TargetImageEncoder

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum,
                              mixed_precision="bf16" if cfg.dtype == "bfloat16" else "no",
                              cpu=not torch.cuda.is_available())
    set_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.drafter)
    model = drafter_class(cfg.drafter).from_pretrained(cfg.drafter, dtype=torch.float32)
    if model.mm_projector is None and cfg.phase == "align":
        raise MassvConfigError("phase 'align' trains the projector; this drafter has none")
    for name, p in model.named_parameters():
        p.requires_grad = cfg.phase == "sdvit" or name.startswith("mm_projector.")
    encoder = TargetImageEncoder(cfg.target, cache_dir=cfg.feature_cache)
    batcher = Batcher(encoder, tokenizer.pad_token_id or 0, model.massv_config.image_token_id,
                      image_max_pixels(cfg.data), mrope=model.massv_config.positions == "mrope")

    train_set, eval_set = split_examples(load_examples(cfg, tokenizer), cfg.eval_fraction,
                                         cfg.seed)
    steps_per_epoch = math.ceil(len(train_set) / (cfg.batch_size * cfg.grad_accum))
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    step, log_path = 0, out / "train_log.jsonl"
    ckpt = _latest_checkpoint(out)
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
        accelerator.print(f"resuming from {ckpt} at step {step}")
        _truncate_log(log_path, step)
    elif log_path.exists():
        log_path.unlink()

    def log(record: dict) -> None:
        accelerator.print(json.dumps(record))
        with log_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    if step == 0:
        log({"step": 0, **evaluate(model, batcher, eval_set, cfg.batch_size, cfg.loss)})
    micro = cfg.batch_size
    order = _data_order(len(train_set), cfg.seed)
    bar = tqdm(total=max_steps, initial=step, desc=f"massv train {cfg.phase}",
               disable=not accelerator.is_main_process)
    start, steps_run = time.perf_counter(), 0
    model.train()
    while step < max_steps:
        loss_sum = tokens = agree = 0.0
        for micro_step in range(cfg.grad_accum):
            idx = order(step * cfg.grad_accum + micro_step, micro)
            chunk = [train_set[i] for i in idx]
            with accelerator.accumulate(model):
                loss, n, a = compute_loss(model, batcher(chunk), chunk, cfg.loss)
                accelerator.backward(loss)
                optimizer.step()   # accelerate skips these until gradients are synced
                scheduler.step()
                optimizer.zero_grad()
            loss_sum += float(loss.detach())
            tokens += n
            agree += a
        step += 1
        steps_run += 1
        bar.update(1)
        record = {"step": step, "loss": loss_sum / cfg.grad_accum,
                  "agreement": agree / max(tokens, 1), "lr": scheduler.get_last_lr()[0]}
        if cfg.eval_every and step % cfg.eval_every == 0 and step < max_steps:
            record |= evaluate(model, batcher, eval_set, cfg.batch_size, cfg.loss)
        if step == max_steps:
            record |= evaluate(model, batcher, eval_set, cfg.batch_size, cfg.loss)
        log(record)
        if cfg.save_every and step % cfg.save_every == 0 and step < max_steps:
            _save_checkpoint(accelerator, out, step)
        if cfg.stop_after is not None and steps_run >= cfg.stop_after and step < max_steps:
            bar.close()
            return {"stopped_at": step}
    bar.close()
    seconds = time.perf_counter() - start
    accelerator.wait_for_everyone()
    final = {"steps": step, "seconds": seconds, "steps_per_s": steps_run / max(seconds, 1e-9),
             "train_examples": len(train_set), "eval_examples": len(eval_set), **record}
    final["phases"] = phase_history(cfg.drafter) + [phase_record(
        cfg.phase, cfg.data, final, {**asdict(cfg), "loss_kind": cfg.loss})]
    if accelerator.is_main_process:
        _export(accelerator.unwrap_model(model), cfg, out, final["phases"])
        (out / "train_summary.json").write_text(json.dumps(final, indent=2))
    return final


def _data_order(n: int, seed: int):
    """Micro-batch k's example indices: epoch-wise seeded permutations, so a resumed run sees
    exactly the data an uninterrupted one would."""
    perms: dict[int, list[int]] = {}

    def indices(k: int, size: int) -> list[int]:
        out = []
        for j in range(k * size, (k + 1) * size):
            epoch, pos = divmod(j, n)
            if epoch not in perms:
                perm = list(range(n))
                random.Random(seed * 1_000_003 + epoch).shuffle(perm)
                perms[epoch] = perm
            out.append(perms[epoch][pos])
        return out

    return indices


def _latest_checkpoint(out: Path) -> Path | None:
    ckpts = [p for p in (out / "checkpoints").glob("step-*") if (p / "trainer_state.json").exists()]
    return max(ckpts, key=lambda p: int(p.name.split("-")[1]), default=None)


def _save_checkpoint(accelerator, out: Path, step: int) -> None:
    final = out / "checkpoints" / f"step-{step}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    accelerator.save_state(str(tmp))
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
    tmp.rename(final)


def _truncate_log(path: Path, step: int) -> None:
    if path.exists():
        rows = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))


def _export(model, cfg: TrainConfig, out: Path, phases: list[dict]) -> None:
    """Write the trained drafter: config (the massv block and a speculators_config with the
    input drafter's k, so `vllm serve <out>` serves it), safetensors, tokenizer, and the model
    card README.md (`vllm_massv.training.model_card`)."""
    model.save_pretrained(out, safe_serialization=True)
    cfg_path = out / "config.json"
    config = json.loads(cfg_path.read_text())
    source = json.loads((Path(cfg.drafter) / "config.json").read_text())
    config["architectures"] = source["architectures"]
    massv = MassvConfig.from_hf_config(config)
    k = checkpoint_num_speculative_tokens(source) or DEFAULT_NUM_SPECULATIVE_TOKENS
    config.update(speculators_fields(massv, k, verifier=massv.target or cfg.target))
    cfg_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copy_tokenizer_files(Path(cfg.drafter), out)
    write_model_card(out, massv, k, phases, license=cfg.license)
