"""`massv train --method msd`: the data, loss and curriculum of an MSD drafter (MSD, arXiv
2505.14260 §3; released code `EAGLE/eagle/train/main_deepspeed.py`). The loop, optimizer,
checkpoints and resume are `loop.py`'s; the export is `export.py`'s.

Row t of a sequence x_0..x_{L-1} (the layout vLLM's EAGLE first pass feeds, `vllm_massv.drafters.msd`):

* input hidden f_t: the target's last-layer post-norm hidden state at t, from a frozen target
  forward *with the image* (`features.TargetHiddenStates`), plus uniform noise in training
  (released `AddUniformNoise`: `(U[0,1) - 0.5) * 0.2 * 512 / L`, L = the sequence length);
* input embedding: the target's embedding of x_{t+1}; where x_{t+1} is an image placeholder in the
  prompt, the target's image embedding for it (post-merger), which the drafter takes as its layer
  input directly when decoupling (`MsdQwen2Drafter.forward`);
* targets: f_{t+1}, and the target's next-token distribution softmax(head(f_{t+1})).

Loss (released weights `v_w = 1.0`, `p_w = 0.1`): `1.0 * SmoothL1(o_t, f_{t+1})` (mean over the
hidden size) `+ 0.1 * soft cross-entropy(softmax(head(f_{t+1})), log_softmax(head(o_t)))`, both
averaged over the loss rows: t in [P-2, L-3] for a prompt of length P, i.e. the rows whose
prediction head(o_t) is a response token x_{t+2} (x_P .. x_{L-1}: the same tokens MASSV's loss
covers). `head` is the target's frozen LM head.

Curriculum (MSD §3.3, released `CustomDataset.update_ratio`): :func:`mm_ratio`. An example drawn in
an epoch with ratio r keeps its image with probability r (a seeded hash of id and epoch, so a
resumed run draws the same); otherwise it is the text-only view (:func:`strip_images`): the same
prompt and response with the prompt's `<|vision_start|>...<|vision_end|>` spans removed, and
target features recomputed on that text (released MSD uses separate ShareGPT data for the text
stage; `massv generate` data are image prompts, and stripping keeps the two stages on the same
answers). Examples that have no image are text in both stages.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from vllm_massv.drafters.msd.config import MsdConfig, MsdConfigError
from vllm_massv.drafters.msd.hf_model import MsdQwen2Drafter
from vllm_massv.training.examples import Example, image_max_pixels
from vllm_massv.training.features import TargetHiddenStates
from vllm_massv.training.loop import TrainConfig

#: Loss weights and input noise as released (`main_deepspeed.py`).
V_WEIGHT, P_WEIGHT = 1.0, 0.1
NOISE_STD = 0.2


def mm_ratio(epoch: int, total_epochs: int) -> float:
    """Share of examples that keep their image in `epoch` (1-based) of `total_epochs`: MSD's
    released `update_ratio` (`main_deepspeed.py`). Text only for the first half
    (epoch <= total // 2), then (epoch - total // 2) / total * 2, and 1.0 from the last epoch on.

    Raises:
        ValueError: epoch < 1 or total_epochs < 1.
    """
    if epoch < 1 or total_epochs < 1:
        raise ValueError(f"epoch {epoch} and total_epochs {total_epochs} must be >= 1")
    half = total_epochs // 2
    if epoch <= half:
        return 0.0
    if epoch < total_epochs:
        return (epoch - half) / total_epochs * 2
    return 1.0


def keeps_image(example_id: str, epoch: int, total_epochs: int, seed: int) -> bool:
    """Whether `example_id` is drawn with its image in `epoch` (1-based): a seeded hash of id and
    epoch below :func:`mm_ratio` (released: `random.random() < current_ratio` per item)."""
    ratio = mm_ratio(epoch, total_epochs)
    if ratio >= 1.0:
        return True
    h = int(hashlib.sha256(f"{seed}:{epoch}:{example_id}".encode()).hexdigest()[:8], 16)
    return h / 0x100000000 < ratio


def strip_images(example: Example, vision_start_id: int, vision_end_id: int) -> Example:
    """The text-only view of `example`: the prompt without its `<|vision_start|> ...
    <|vision_end|>` spans (placeholders included), no images, the same response.

    Raises:
        ValueError: an unterminated vision span in the prompt.
    """
    prompt, kept, i = example.input_ids[: example.prompt_len], [], 0
    while i < len(prompt):
        if prompt[i] == vision_start_id:
            try:
                i = prompt.index(vision_end_id, i) + 1
            except ValueError:
                raise ValueError(f"{example.id}: unterminated vision span at {i}") from None
            continue
        kept.append(prompt[i])
        i += 1
    return replace(example, input_ids=kept + example.input_ids[example.prompt_len:],
                   prompt_len=len(kept), images=[])


def curriculum_view(example: Example, epoch: int, total_epochs: int, seed: int,
                    vision_ids: tuple[int, int]) -> Example:
    """`example` as drawn in 0-based `epoch`: unchanged, or :func:`strip_images`'d."""
    if not example.images or keeps_image(example.id, epoch + 1, total_epochs, seed):
        return example
    return strip_images(example, *vision_ids)


class MsdBatcher:
    """Builds MSD training batches: target features with the image, shifted inputs, targets.

    Returns a dict of `inputs_embeds`, `target_hidden`, `target_next` [B, W, H] float,
    `mm_rows`, `loss_mask` [B, W] bool, `attention_mask` [B, W] long and `lengths` [B] long.
    """

    def __init__(self, features: TargetHiddenStates, max_pixels: int | None) -> None:
        self.features, self.max_pixels = features, max_pixels

    def __call__(self, batch: list[Example]) -> dict[str, torch.Tensor]:
        feats = self.features.for_examples(batch, self.max_pixels)
        width, hidden = max(len(e.input_ids) for e in batch), self.features.hidden_size
        b = len(batch)
        out = {name: torch.zeros(b, width, hidden) for name in
               ("inputs_embeds", "target_hidden", "target_next")}
        out |= {name: torch.zeros(b, width, dtype=torch.bool) for name in ("mm_rows", "loss_mask")}
        out["attention_mask"] = torch.zeros(b, width, dtype=torch.long)
        out["lengths"] = torch.tensor([len(e.input_ids) for e in batch])
        for i, (e, (states, image_embeds)) in enumerate(zip(batch, feats)):
            ids = torch.tensor(e.input_ids)
            n, p = len(ids), e.prompt_len
            mm = torch.zeros(n, dtype=torch.bool)
            mm[:p] = ids[:p] == self.features.image_token_id
            with torch.no_grad():
                embeds = self.features.embed_tokens(ids.to(self.features.device)).cpu().float()
            embeds[mm] = image_embeds.float()
            f = states[0].float()
            out["inputs_embeds"][i, : n - 1] = embeds[1:]
            out["mm_rows"][i, : n - 1] = mm[1:]
            out["target_hidden"][i, :n] = f
            out["target_next"][i, : n - 1] = f[1:]
            out["attention_mask"][i, :n] = 1
            rows = torch.arange(max(p - 2, 0), n - 2)
            out["loss_mask"][i, rows] = True
        return out


def compute_loss(model, batch: dict[str, torch.Tensor], examples: list[Example],
                 lm_head: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(MSD loss summed over the loss rows, #loss rows, #rows where argmax head(o_t) equals the
    target's greedy token argmax head(f_{t+1})). The trainer divides the sum by the loss rows of
    the whole global batch (`MsdSetup.loss_weight`), so the loss is MSD's per-row mean.

    Noise on f_t only while `model.training` (not in evaluation). `lm_head`: the target's LM
    head weight [vocab, H] (frozen). The agreement is the greedy acceptance of a first draft
    token given the target's true features; on greedy `massv generate` data the target's token is
    the response token x_{t+2} MASSV's agreement compares with. Later EAGLE draft steps run on the
    drafter's own outputs, so it overstates deeper positions."""
    device = lm_head.device
    b = {k: v.to(device) for k, v in batch.items()}
    f = b["target_hidden"]
    if model.training:
        scale = NOISE_STD * 512 / b["lengths"].to(f.dtype)[:, None, None]
        f = f + (torch.rand_like(f) - 0.5) * scale
    pred = model(b["inputs_embeds"], f, b["mm_rows"], attention_mask=b["attention_mask"])
    mask = b["loss_mask"]
    vloss = (F.smooth_l1_loss(pred, b["target_next"], reduction="none").mean(-1) * mask).sum()
    logits = pred @ lm_head.T
    with torch.no_grad():
        target_logits = b["target_next"] @ lm_head.T
        target_p = torch.softmax(target_logits, dim=-1)
    ploss = -((target_p * torch.log_softmax(logits, dim=-1)).sum(-1) * mask).sum()
    loss = V_WEIGHT * vloss + P_WEIGHT * ploss
    agree = int(((logits.argmax(-1) == target_logits.argmax(-1)) & mask).sum())
    return loss, int(mask.sum()), agree


@dataclass
class MsdSetup:
    """The MSD pieces of a run (a :class:`~vllm_massv.training.loop.MethodSetup`)."""
    model: torch.nn.Module
    batcher: MsdBatcher
    features: TargetHiddenStates
    vision_ids: tuple[int, int]
    seed: int
    loss_kind: str = "smooth-l1 + 0.1 soft ce"

    def loss(self, model, batch, examples):
        return compute_loss(model, batch, examples, self.features.lm_head.weight)

    @staticmethod
    def loss_weight(batch: dict[str, torch.Tensor]) -> int:
        """The rows :func:`compute_loss` sums over."""
        return int(batch["loss_mask"].sum())

    def view(self, example: Example, epoch: int, total_epochs: int) -> Example:
        return curriculum_view(example, epoch, total_epochs, self.seed, self.vision_ids)

    @staticmethod
    def save(model, state_dict: dict, out: Path) -> None:
        """`save_pretrained` of the gathered full weights (config.json with the `msd` block)."""
        model.load_state_dict(state_dict)
        model.save_pretrained(out)

    @staticmethod
    def checkpoint_block(model, config: dict, source: dict) -> MsdConfig:
        """The `msd` block (speculators type "msd": `vllm serve <out>` serves the target with
        method eagle)."""
        return model.msd


def setup(cfg: TrainConfig, tokenizer=None, device: str | torch.device = "cpu") -> MsdSetup:
    """Load the MSD drafter (`massv init --method msd` output or a trained one; `cfg.decouple`
    False turns decoupling off, None keeps the drafter's setting) and the frozen target (on
    `device`; the drafter is moved by accelerate). `tokenizer` is unused.

    Raises:
        MsdConfigError: not an MSD drafter, or a drafter built for another target size.
    """
    model = MsdQwen2Drafter.from_pretrained(cfg.drafter, dtype=torch.float32)
    if cfg.decouple is not None:
        model.msd = model.msd.model_copy(update={"decouple_visual_tokens": cfg.decouple})
    features = TargetHiddenStates(cfg.target, device=device,
                                  cache_dir=cfg.feature_cache)
    if features.hidden_size != model.hidden_size:
        raise MsdConfigError(f"drafter hidden_size {model.hidden_size} != the target's "
                             f"{features.hidden_size}; rebuild with `massv init --method msd`")
    tc = features.config
    batcher = MsdBatcher(features, image_max_pixels(cfg.data))
    return MsdSetup(model, batcher, features,
                    (int(tc.vision_start_token_id), int(tc.vision_end_token_id)), cfg.seed)

