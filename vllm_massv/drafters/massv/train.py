"""`massv train --method massv`: the two MASSV phases (MASSV, arXiv 2505.10526 §3.2).

* `--phase align`: projector alignment; only the projector trains, the LM is frozen; targets are
  the data set's own answers (`reference` column: e.g. LLaVA-Pretrain captions).
* `--phase sdvit`: self-distilled visual instruction tuning; projector + LM train on the target's
  own responses (`token_ids` column written by `massv generate`); loss is cross-entropy to the
  target's tokens, or (`--loss kl`) KL to the target's stored top-k distribution.

The loss covers response tokens only. Image embeddings come from the target's frozen vision tower
(`features.TargetImageEncoder`), exactly what vLLM hands the drafter at serving time. The loop,
optimizer, checkpoints and resume are `loop.py`'s; the export is `export.py`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from vllm_massv.drafters.massv.config import MassvConfig, MassvConfigError
from vllm_massv.drafters.massv.hf_model import drafter_class
from vllm_massv.rope import mrope_positions
from vllm_massv.training.data import load_image
from vllm_massv.training.examples import Example, image_max_pixels
from vllm_massv.training.features import TargetImageEncoder
from vllm_massv.training.loop import TrainConfig

IGNORE = -100


class Batcher:
    """Pads examples, loads their images and computes the target image embeddings.

    Returns a dict of `input_ids`, `attention_mask`, `labels` [B, W] long (IGNORE outside the
    response), `image_mask` [B, W] bool, `image_embeds` [n_image_tokens, H] (None without
    images) and `position_ids` [3, B, W] long (M-RoPE drafters; else None).
    """

    def __init__(self, encoder, pad_id: int, image_token_id: int,
                 max_pixels: int | None, mrope: bool = False) -> None:
        self.encoder, self.pad_id, self.image_token_id = encoder, pad_id, image_token_id
        self.max_pixels, self.mrope = max_pixels, mrope

    def __call__(self, batch: list[Example]) -> dict[str, torch.Tensor | None]:
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
class MassvSetup:
    """The MASSV pieces of a run (a :class:`~vllm_massv.training.loop.MethodSetup`): the drafter,
    its batcher and the loss (`kind`: "ce" or "kl")."""
    model: torch.nn.Module
    batcher: Batcher
    kind: str

    @property
    def loss_kind(self) -> str:
        return self.kind

    def loss(self, model, batch, examples):
        return compute_loss(model, batch, examples, self.kind)

    def loss_weight(self, batch) -> int:
        return loss_tokens(batch, self.kind, self.model.massv_config.orig_vocab_size)

    @staticmethod
    def view(example: Example, epoch: int, total_epochs: int) -> Example:
        return example

    @staticmethod
    def save(model, state_dict: dict, out: Path) -> None:
        model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)

    @staticmethod
    def checkpoint_block(model, config: dict, source: dict) -> MassvConfig:
        """The `massv` block; `config` gets the input drafter's `architectures` back."""
        config["architectures"] = source["architectures"]
        return MassvConfig.from_hf_config(config)


def setup(cfg: TrainConfig, tokenizer, device: str | torch.device = "cpu") -> MassvSetup:
    """Load the MASSV drafter of `cfg.drafter` for `cfg.phase` (align: only the projector
    trains) and the target's frozen vision tower (on the CPU; `device` is unused).

    Raises:
        MassvConfigError: no MASSV phase, or phase align on a drafter without a projector.
    """
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
    return MassvSetup(model, batcher, cfg.loss)
