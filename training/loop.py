"""`massv train`'s generic accelerate loop: optimizer, schedule, evaluation, checkpoints, resume.

What a drafter method adds (model, batcher, loss, curriculum, export hooks) comes from its setup
(:class:`MethodSetup`), found through :func:`method_setup`.

Data parallel (`accelerate launch --num_processes W -m vllm_massv.cli train ...`, DDP or FSDP):
the run's example stream (:class:`EpochStream`: seeded per-epoch permutations laid end to end) is
cut into micro-batches of `batch_size` by a DataLoader that accelerate prepares, which hands global
micro-batch b to rank b % W. One optimizer step consumes `batch_size x W x grad_accum` examples (the
global batch, a contiguous slice of the stream); `max_steps`, the epochs and the learning-rate
schedule count these global steps. The loss of a step is the mean over the loss positions of the
whole global batch (each rank's sum is divided by the all-reduced `loss_weight`), so W ranks x
batch B follow the loss curve of 1 rank x batch W*B. Evaluation is split between the ranks and
summed. Logging, checkpoint renames and the export happen on the main process only.

Resumable: `--save-every N` writes `checkpoints/step-N` (`accelerator.save_state`: model,
optimizer, scheduler, RNG of every rank); rerunning the same command (same number of processes)
continues from the newest checkpoint, skipping the consumed batches
(`accelerator.skip_first_batches`), with the same data order and step count.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol

import torch
from tqdm.auto import tqdm

from vllm_massv import methods
from vllm_massv.drafters.massv.config import MassvConfigError
from vllm_massv.training.examples import Example, load_examples, split_examples
from vllm_massv.training.export import export
from vllm_massv.training.model_card import phase_history, phase_record

if TYPE_CHECKING:
    from vllm_massv.checkpoint import DrafterBlock

Phase = Literal["align", "sdvit"]


@dataclass
class TrainConfig:
    """Hyper-parameters of one phase (written to `<out>/train_config.json`)."""
    phase: Phase | None           # MASSV phase; None for --method msd / eagle3
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
    method: str = "massv"         # a method of vllm_massv.methods.METHODS
    decouple: bool | None = None  # msd: False = train without decoupled visual tokens
    ttt_steps: int | None = None  # eagle3: draft steps unrolled in the loss (default: the head's k)
    ttt_decay: float = 1.0        # eagle3: loss weight of step j is ttt_decay ** j
    license: str | None = None    # Hub license id for the model card (default "other")
    stop_after: int | None = field(default=None, metadata={"help": "testing: stop after N steps"})
    log_examples: bool = field(default=False, metadata={
        "help": "testing: each rank writes its example ids per step to examples-rank{R}.jsonl"})


class MethodSetup(Protocol):
    """What a drafter method gives the loop: built by its `setup(cfg, tokenizer, device)`.

    Attributes:
        model: the drafter to train (the parameters with `requires_grad` are optimized).
        batcher: collates a list of examples into the batch dict `loss` reads.
        loss_kind: the loss's name, recorded in the phase history and the model card.
    """
    model: torch.nn.Module
    batcher: Callable[[list[Example]], dict[str, Any]]
    loss_kind: str

    def loss(self, model: torch.nn.Module, batch: dict[str, Any], examples: list[Example]
             ) -> tuple[torch.Tensor, int, int]:
        """(loss summed over the batch's loss positions, #positions the agreement counts,
        #positions where the drafter's argmax agrees with the target). `model` is the
        accelerate-wrapped `self.model`."""

    def loss_weight(self, batch: dict[str, Any]) -> int:
        """The number of positions `loss` sums over (the loop divides by its global sum)."""

    def view(self, example: Example, epoch: int, total_epochs: int) -> Example:
        """`example` as the run presents it in 0-based `epoch` of `total_epochs` (a curriculum)."""

    def save(self, model: torch.nn.Module, state_dict: dict[str, torch.Tensor], out: Path
             ) -> None:
        """Write the trained weights (`state_dict`: the full weights, gathered under FSDP) and
        `config.json` into `out`."""

    def checkpoint_block(self, model: torch.nn.Module, config: dict[str, Any],
                         source: dict[str, Any]) -> DrafterBlock | None:
        """The drafter's checkpoint block from the written `config` (which it may complete from
        the input drafter's `source` config), for the speculators fields and the model card; None
        when the saved `config.json` is final (no model card)."""


#: The setup function of each method, as "module:function" (imported when a run starts, so the
#: loop loads only the method it trains).
def method_setup(cfg: TrainConfig, tokenizer: Any, device: str | torch.device = "cpu"
                 ) -> MethodSetup:
    """Build the setup of `cfg.method` (frozen target parts on `device`).

    Raises:
        MassvConfigError: an unknown method, or (from the method) a drafter it cannot train.
    """
    try:
        method = methods.get(cfg.method)
    except ValueError as e:
        raise MassvConfigError(str(e)) from None
    return methods.resolve(method.train_setup)(cfg, tokenizer, device)


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


@torch.no_grad()
def evaluate(model, algo: MethodSetup, examples: list[Example], batch_size: int, accelerator
             ) -> dict[str, float]:
    """Held-out loss (mean over the loss positions) and drafter/target next-token agreement
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
    and the loss are split.

    Raises:
        MassvConfigError: a phase the drafter cannot train, or a data set without training
            examples.
    """
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
    algo = method_setup(cfg, tokenizer, accelerator.device)
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
        # one mean over the global batch: divide by the loss weight of every rank and micro-batch;
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
        cfg.phase or cfg.method, cfg.data, final, {**asdict(cfg), "loss_kind": algo.loss_kind})]
    if main:
        export(algo, accelerator.unwrap_model(model), state, cfg, out, final["phases"])
        (out / "train_summary.json").write_text(json.dumps(final, indent=2))
    accelerator.wait_for_everyone()
    return final


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
    """Keep the rows of a JSONL log with `"step" <= step` (a resumed run rewrites the rest)."""
    if path.exists():
        rows = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))
