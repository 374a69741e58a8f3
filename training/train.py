"""`massv train`: the two MASSV training phases (MASSV, arXiv 2505.10526 §3.2).

* `--phase align` — projector alignment: only the projector trains, the LM is frozen; targets are
  the data set's own answers (`reference` column: e.g. LLaVA-Pretrain captions).
* `--phase sdvit` — self-distilled visual instruction tuning: projector + LM train on the target's
  own responses (`token_ids` column written by `massv generate`); loss is cross-entropy to the
  target's tokens, or (`--loss kl`) KL to the target's stored top-k distribution.

The loss covers response tokens only. Image embeddings come from the target's frozen vision tower
(`features.TargetImageEncoder`), exactly what vLLM hands the drafter at serving time. The output
directory is a drafter that `vllm serve --speculative-config` loads with no extra flags.

`--method msd` trains an MSD drafter instead (EAGLE-style head over the target's hidden states;
data, loss and curriculum in `training/msd.py`), and `--method eagle3` vLLM's EAGLE-3 head
(three target layers, training-time test; `training/eagle3.py`), with this module's loop,
optimizer and checkpoints:
each method supplies a setup object (model, batcher, summed loss and its weight, the curriculum's
view of an example in its epoch, export).

Data parallel (`accelerate launch --num_processes W -m vllm_massv.cli train ...`, DDP or FSDP):
the run's example stream (:class:`EpochStream`: seeded per-epoch permutations laid end to end) is
cut into micro-batches of `batch_size` by a DataLoader that accelerate prepares, which hands global
micro-batch b to rank b % W. One optimizer step consumes `batch_size x W x grad_accum` examples (the
global batch, a contiguous slice of the stream); `max_steps`, the epochs and the learning-rate
schedule count these global steps. The loss of a step is the mean over the response tokens of the
whole global batch (each rank's token sum is divided by the all-reduced token count), so W ranks x
batch B follow the loss curve of 1 rank x batch W*B. Evaluation is split between the ranks and
summed. Logging, checkpoint renames and the export happen on the main process only.

Resumable: `--save-every N` writes `checkpoints/step-N` (`accelerator.save_state`: model,
optimizer, scheduler, RNG of every rank); rerunning the same command (same number of processes)
continues from the newest checkpoint, skipping the consumed batches
(`accelerator.skip_first_batches`), with the same data order and step count.
`python -m vllm_massv.training.train OUT/train_config.json` reruns a run from its saved config.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

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
#: The loss each non-MASSV method trains with (recorded in the phase history).
METHOD_LOSSES = {"msd": "smooth-l1 + 0.1 soft ce", "eagle3": "ttt kl"}
IGNORE = -100


@dataclass
class TrainConfig:
    """Hyper-parameters of one phase (written to `<out>/train_config.json`)."""
    phase: Phase | None           # MASSV phase; None for --method msd
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
    method: Literal["massv", "msd", "eagle3"] = "massv"
    decouple: bool | None = None  # msd: False = train without decoupled visual tokens
    ttt_steps: int | None = None  # eagle3: draft steps unrolled in the loss (default: the head's k)
    ttt_decay: float = 1.0        # eagle3: loss weight of step j is ttt_decay ** j
    license: str | None = None    # Hub license id for the model card (default "other")
    stop_after: int | None = field(default=None, metadata={"help": "testing: stop after N steps"})
    log_examples: bool = field(default=False, metadata={
        "help": "testing: each rank writes its example ids per step to examples-rank{R}.jsonl"})


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
    """(summed loss over the response tokens, #response tokens, #tokens where the drafter's argmax
    equals the target's token). The caller divides the sum by :func:`loss_tokens` of the global
    batch (one mean over every rank and micro-batch of an optimizer step)."""
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
        loss = F.cross_entropy(logits[learnable], labels[learnable], reduction="sum")
    else:
        loss = _topk_kl(logits, examples, model_vocab(model))
    return loss, n, agree


def loss_tokens(batch: dict, kind: str, vocab: int) -> int:
    """The number of positions :func:`compute_loss` sums its loss over: response tokens the
    drafter can draft (ids below its unpadded `vocab`) for `ce`, every response token for `kl`."""
    labels = batch["labels"][:, 1:]
    valid = labels != IGNORE
    return int((valid & (labels < vocab)).sum()) if kind == "ce" else int(valid.sum())


def model_vocab(model) -> int:
    """The drafter's original (unpadded) vocabulary size."""
    return getattr(model, "module", model).massv_config.orig_vocab_size


def _topk_kl(logits: torch.Tensor, examples: list[Example], vocab: int) -> torch.Tensor:
    """KL(target's top-k, renormalized over draftable ids || drafter), summed over the response
    positions."""
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
    return torch.cat(losses).sum()


@dataclass
class _MassvSetup:
    """The MASSV pieces of a run (the same interface as `training.msd.MsdSetup`): the drafter, the
    batcher, the summed loss and the number of positions it sums over, the example as the run
    presents it in an epoch (MASSV: unchanged), and the export."""
    model: torch.nn.Module
    batcher: Batcher
    kind: str

    @classmethod
    def build(cls, cfg: TrainConfig, tokenizer) -> "_MassvSetup":
        from vllm_massv.hf import drafter_class
        from vllm_massv.training.features import TargetImageEncoder

        if cfg.phase not in ("align", "sdvit"):
            raise MassvConfigError("a MASSV run needs --phase align or sdvit")
        model = drafter_class(cfg.drafter).from_pretrained(cfg.drafter, dtype=torch.float32)
        if model.mm_projector is None and cfg.phase == "align":
            raise MassvConfigError("phase 'align' trains the projector; this drafter has none")
        for name, p in model.named_parameters():
            p.requires_grad = cfg.phase == "sdvit" or name.startswith("mm_projector.")
        encoder = TargetImageEncoder(cfg.target, cache_dir=cfg.feature_cache)
        batcher = Batcher(encoder, tokenizer.pad_token_id or 0,
                          model.massv_config.image_token_id, image_max_pixels(cfg.data),
                          mrope=model.massv_config.positions == "mrope")
        return cls(model, batcher, cfg.loss)

    def loss(self, model, batch, examples):
        return compute_loss(model, batch, examples, self.kind)

    def loss_weight(self, batch) -> int:
        return loss_tokens(batch, self.kind, self.model.massv_config.orig_vocab_size)

    @staticmethod
    def view(example: Example, epoch: int, total_epochs: int) -> Example:
        return example

    @staticmethod
    def export(model, state_dict: dict, cfg: TrainConfig, out: Path, phases: list[dict]) -> None:
        _export(model, state_dict, cfg, out, phases)


@torch.no_grad()
def evaluate(model, algo, examples: list[Example], batch_size: int, accelerator
             ) -> dict[str, float]:
    """Held-out loss (mean over response tokens) and drafter/target next-token agreement
    (teacher-forced). The examples are split between the ranks (`split_between_processes`) and
    the sums all-reduced; every rank runs the same number of forward passes (a rank with fewer
    examples runs a discarded one), as FSDP's collective forward needs."""
    from accelerate.utils import send_to_device

    if not examples:
        return {}
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
    per_rank = math.ceil(len(examples) / accelerator.num_processes)
    with accelerator.split_between_processes(list(range(len(examples)))) as mine:
        for b in range(math.ceil(per_rank / batch_size)):
            idx = mine[b * batch_size: (b + 1) * batch_size]
            chunk = [examples[i] for i in idx] or examples[:1]
            batch = send_to_device(algo.batcher(chunk), accelerator.device)
            loss, n, agree = algo.loss(model, batch, chunk)
            if idx:
                totals += torch.tensor([float(loss), algo.loss_weight(batch), n, agree],
                                       dtype=torch.float64, device=accelerator.device)
    loss_sum, weight, n, agree = accelerator.reduce(totals, reduction="sum").tolist()
    model.train()
    return {"eval_loss": loss_sum / max(weight, 1), "eval_agreement": agree / max(n, 1)}


def train(cfg: TrainConfig) -> dict:
    """Run one phase; returns the final metrics (also in `<out>/train_log.jsonl`).

    Under `accelerate launch` every rank calls this; see the module docstring for how the data
    and the loss are split. Raises `MassvConfigError` for a phase the drafter cannot train or a
    data set without training examples."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, send_to_device, set_seed
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer, get_cosine_schedule_with_warmup

    # The optimizer step is decided by the micro-step counter alone (a step never straddles the
    # end of the DataLoader), and the scheduler is stepped once per optimizer step by the loop:
    # accelerate's default would step it once per process (`AcceleratedScheduler.step`).
    accelerator = Accelerator(
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.grad_accum, sync_with_dataloader=False),
        step_scheduler_with_optimizer=False,
        mixed_precision="bf16" if cfg.dtype == "bfloat16" else "no",
        cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    out = Path(cfg.out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    set_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.drafter)
    if cfg.method == "msd":
        from vllm_massv.training import msd

        algo = msd.setup(cfg, accelerator.device)
    elif cfg.method == "eagle3":
        from vllm_massv.training import eagle3

        algo = eagle3.setup(cfg, accelerator.device)
    else:
        algo = _MassvSetup.build(cfg, tokenizer)
    model = algo.model

    train_set, eval_set = split_examples(load_examples(cfg, tokenizer), cfg.eval_fraction,
                                         cfg.seed)
    if not train_set:
        raise MassvConfigError(f"{cfg.data}: no training examples (eval_fraction "
                               f"{cfg.eval_fraction})")
    world = accelerator.num_processes
    global_batch = cfg.batch_size * world * cfg.grad_accum
    steps_per_epoch = math.ceil(len(train_set) / global_batch)
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    # epochs of the run (MSD's curriculum): as asked, or as many as max_steps touches
    total_epochs = math.ceil(cfg.epochs) if cfg.max_steps is None else max(1, math.ceil(
        max_steps * global_batch / len(train_set)))
    stream = EpochStream(train_set, max_steps * global_batch, cfg.seed,
                         view=lambda e, epoch: algo.view(e, epoch, total_epochs))
    # its own generator: starting an iterator draws a base seed, which must not consume the
    # global RNG that a resumed run restores (MSD's input noise draws from it)
    loader = DataLoader(stream, batch_size=cfg.batch_size, collate_fn=list,
                        generator=torch.Generator().manual_seed(cfg.seed))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, max_steps)
    model, optimizer, scheduler, loader = accelerator.prepare(model, optimizer, scheduler, loader)

    step, log_path = 0, out / "train_log.jsonl"
    ckpt = _latest_checkpoint(out)
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
        accelerator.print(f"resuming from {ckpt} at step {step}")
        if main:
            _truncate_log(log_path, step)
    elif main and log_path.exists():
        log_path.unlink()
    examples_log = out / f"examples-rank{accelerator.process_index}.jsonl"
    if cfg.log_examples:
        _truncate_log(examples_log, step - 1)

    def log(record: dict) -> None:
        accelerator.print(json.dumps(record))
        if main:
            with log_path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")

    def evaluation() -> dict:
        return evaluate(model, algo, eval_set, cfg.batch_size, accelerator)

    if step == 0:
        log({"step": 0, **evaluation()})
    # this rank's micro-batches, the first `step * grad_accum` already consumed before a resume
    batches = iter(accelerator.skip_first_batches(loader, step * cfg.grad_accum) if step
                   else loader)
    bar = tqdm(total=max_steps, initial=step, desc=f"massv train {cfg.phase or cfg.method}",
               disable=not main)
    start, steps_run = time.perf_counter(), 0
    model.train()
    while step < max_steps:
        chunks = [next(batches) for _ in range(cfg.grad_accum)]
        if cfg.log_examples:
            with examples_log.open("a") as fh:
                fh.write(json.dumps({"step": step, "ids": [[e.id for e in c] for c in chunks]})
                         + "\n")
        micro = [send_to_device(algo.batcher(c), accelerator.device) for c in chunks]
        # one mean over the global batch: divide by the loss tokens of every rank and micro-batch;
        # x world x grad_accum undoes DDP's gradient average and accelerate's division by
        # grad_accum in `backward`
        weight = accelerator.reduce(torch.tensor(
            sum(algo.loss_weight(b) for b in micro), device=accelerator.device),
            reduction="sum").item()
        scale = world * cfg.grad_accum / max(weight, 1)
        totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
        for chunk, batch in zip(chunks, micro):
            with accelerator.accumulate(model):
                loss, n, a = algo.loss(model, batch, chunk)
                accelerator.backward(loss * scale)
                optimizer.step()   # accelerate skips these until gradients are synced
                optimizer.zero_grad()
            totals += torch.tensor([float(loss.detach()), n, a], dtype=torch.float64,
                                   device=accelerator.device)
        scheduler.step()
        loss_sum, tokens, agree = accelerator.reduce(totals, reduction="sum").tolist()
        step += 1
        steps_run += 1
        bar.update(1)
        record = {"step": step, "loss": loss_sum / max(weight, 1),
                  "agreement": agree / max(tokens, 1), "lr": scheduler.get_last_lr()[0]}
        if cfg.eval_every and step % cfg.eval_every == 0 and step < max_steps:
            record |= evaluation()
        if step == max_steps:
            record |= evaluation()
        log(record)
        if cfg.save_every and step % cfg.save_every == 0 and step < max_steps:
            _save_checkpoint(accelerator, out, step)
        if cfg.stop_after is not None and steps_run >= cfg.stop_after and step < max_steps:
            bar.close()
            return {"stopped_at": step}
    bar.close()
    seconds = time.perf_counter() - start
    state = accelerator.get_state_dict(model)   # every rank: FSDP gathers the full weights
    final = {"steps": step, "seconds": seconds, "steps_per_s": steps_run / max(seconds, 1e-9),
             "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
             "train_examples": len(train_set), "eval_examples": len(eval_set),
             "processes": world, "global_batch": global_batch, **record}
    final["phases"] = phase_history(cfg.drafter) + [phase_record(
        cfg.phase or cfg.method, cfg.data, final,
        {**asdict(cfg), "loss_kind": METHOD_LOSSES.get(cfg.method, cfg.loss)})]
    if main:
        algo.export(accelerator.unwrap_model(model), state, cfg, out, final["phases"])
        (out / "train_summary.json").write_text(json.dumps(final, indent=2))
    accelerator.wait_for_everyone()
    return final


class EpochStream(torch.utils.data.Dataset):
    """The examples of a whole run: seeded permutations of `examples`, one per epoch, laid end to
    end and cut at `length`; item p is the example at stream position p, as `view(example,
    epoch)` presents it in its (0-based) epoch (MSD's curriculum drops images in early epochs).
    Deterministic (the same on every rank, and on a resumed run), so the DataLoader accelerate
    prepares cuts it into the same global micro-batches on any run."""

    def __init__(self, examples: list[Example], length: int, seed: int,
                 view: Callable[[Example, int], Example] | None = None) -> None:
        self.examples, self.length, self.seed, self.view = examples, length, seed, view
        self._perms: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, p: int) -> Example:
        if not 0 <= p < self.length:
            raise IndexError(p)
        epoch, pos = divmod(p, len(self.examples))
        if epoch not in self._perms:
            perm = list(range(len(self.examples)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(perm)
            self._perms[epoch] = perm
        example = self.examples[self._perms[epoch][pos]]
        return example if self.view is None else self.view(example, epoch)


def _latest_checkpoint(out: Path) -> Path | None:
    ckpts = [p for p in (out / "checkpoints").glob("step-*") if (p / "trainer_state.json").exists()]
    return max(ckpts, key=lambda p: int(p.name.split("-")[1]), default=None)


def _save_checkpoint(accelerator, out: Path, step: int) -> None:
    """`accelerator.save_state` (every rank writes its part) into a temp dir that the main
    process renames once complete, so an interrupted save is never resumed from."""
    final = out / "checkpoints" / f"step-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
        tmp.rename(final)
    accelerator.wait_for_everyone()


def _truncate_log(path: Path, step: int) -> None:
    if path.exists():
        rows = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))


def _export(model, state_dict: dict, cfg: TrainConfig, out: Path, phases: list[dict]) -> None:
    """Write the trained drafter: config (the massv block and a speculators_config with the
    input drafter's k, so `vllm serve <out>` serves it), safetensors (`state_dict`: the full
    weights, gathered under FSDP), tokenizer, and the model card README.md
    (`vllm_massv.training.model_card`)."""
    model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
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


if __name__ == "__main__":  # `accelerate launch -m vllm_massv.training.train OUT/train_config.json`
    import sys

    train(TrainConfig(**json.loads(Path(sys.argv[1]).read_text())))
