"""`massv train --method eagle3`: the data and loss of an EAGLE-3 head (EAGLE-3, arXiv 2503.01840
§3; speculators' `models/eagle3/core.py` and `metrics.py` for the conventions). The loop,
optimizer, checkpoints and resume are `loop.py`'s; the export is `export.py`'s.

Row t of a sequence x_0..x_{L-1} (vLLM's EAGLE first-pass layout, `vllm_massv.drafters.eagle3.hf_model`):

* input: the target's aux hidden states a_t (the configured layers, from a frozen target forward
  *with the image*, `features.TargetHiddenStates`) and the target's token embedding of x_{t+1}
  (at image placeholders the placeholder's token embedding: vLLM gives this head no image
  embeddings);
* training-time test over `ttt_steps` draft steps (default: the checkpoint's k): step j at row t
  consumes E(x_{t+1+j}) (teacher forcing with the target's own tokens, as speculators does) and the
  previous step's output, and drafts x_{t+2+j};
* target of step j at row t: the target's next-token distribution after x_{t+1+j},
  softmax(lm_head(f_{t+1+j})) with f the target's post-norm last hidden state, restricted to the
  draft vocabulary (t2d) as speculators does.

Loss: sum over steps j of `decay**j` x forward KL(target || draft) (speculators' default loss
`kl_div`, `ttt_step_loss_decay` 1.0), each summed over its loss rows t in [P-2, L-3-j] (P: the
prompt length): the rows whose drafted token is a response token, as MSD's loss rows are at
step 0. The trainer divides by the step-0 loss rows of the global batch, so each step contributes
its per-row mean (up to the few rows later steps lose at the end of each sequence).

Agreement: first-draft (step 0) argmax equal to the target's argmax, the number MSD reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_massv.drafters.eagle3.config import Eagle3ConfigError
from vllm_massv.drafters.eagle3.hf_model import Eagle3Drafter
from vllm_massv.training.examples import Example, image_max_pixels
from vllm_massv.training.features import FINAL, TargetHiddenStates
from vllm_massv.training.loop import TrainConfig


class Eagle3Batcher:
    """Builds EAGLE-3 training batches from a frozen target forward.

    Returns a dict of `aux` [B, W, n_aux*H], `token_embeds` [B, W, H] (row t: E(x_t)),
    `target_final` [B, W, H] float, `attention_mask` [B, W] long and `prompt_lens`, `lengths`
    [B] long.
    """

    def __init__(self, features: TargetHiddenStates, num_aux: int, max_pixels: int | None) -> None:
        self.features, self.num_aux, self.max_pixels = features, num_aux, max_pixels

    def __call__(self, batch: list[Example]) -> dict[str, torch.Tensor]:
        feats = self.features.for_examples(batch, self.max_pixels)
        width, hidden = max(len(e.input_ids) for e in batch), self.features.hidden_size
        b = len(batch)
        out = {"aux": torch.zeros(b, width, self.num_aux * hidden),
               "token_embeds": torch.zeros(b, width, hidden),
               "target_final": torch.zeros(b, width, hidden),
               "attention_mask": torch.zeros(b, width, dtype=torch.long),
               "prompt_lens": torch.tensor([e.prompt_len for e in batch]),
               "lengths": torch.tensor([len(e.input_ids) for e in batch])}
        for i, (e, (states, _)) in enumerate(zip(batch, feats)):
            n = len(e.input_ids)
            with torch.no_grad():
                out["token_embeds"][i, :n] = self.features.embed_tokens(
                    torch.tensor(e.input_ids, device=self.features.device)).cpu().float()
            # states: [n_aux + 1, n, H], aux layers in id order, then the final (post-norm) one
            out["aux"][i, :n] = states[:-1].float().permute(1, 0, 2).reshape(n, -1)
            out["target_final"][i, :n] = states[-1].float()
            out["attention_mask"][i, :n] = 1
        return out


def step_inputs(token_embeds: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Per draft step j, the [B, W, H] embeddings it consumes: row t holds E(x_{t+1+j}) (zeros past
    the end)."""
    out = []
    for j in range(steps):
        shifted = torch.zeros_like(token_embeds)
        shifted[:, : token_embeds.shape[1] - 1 - j] = token_embeds[:, 1 + j:]
        out.append(shifted)
    return out


def loss_rows(prompt_lens: torch.Tensor, lengths: torch.Tensor, width: int, step: int
              ) -> torch.Tensor:
    """[B, W] bool: rows t in [P-2, L-3-step] (see the module docstring)."""
    t = torch.arange(width, device=lengths.device)[None]
    return (t >= (prompt_lens[:, None] - 2).clamp(min=0)) & (t <= lengths[:, None] - 3 - step)


def compute_loss(model, batch: dict[str, torch.Tensor], steps: int, decay: float,
                 lm_head: torch.Tensor, t2d: torch.Tensor | None
                 ) -> tuple[torch.Tensor, int, int]:
    """(EAGLE-3 TTT loss summed over steps and loss rows, #step-0 loss rows, #step-0 rows where
    the draft's argmax equals the target's).

    Args:
        model: the (accelerate-wrapped) :class:`~vllm_massv.drafters.eagle3.hf_model.Eagle3Drafter`.
        batch: an :class:`Eagle3Batcher` batch on the model's device.
        steps, decay: TTT depth and per-step loss weight decay.
        lm_head: the target's LM head weight [vocab, H] (frozen).
        t2d: [vocab] bool draft-vocabulary mask, or None (full vocabulary).
    """
    b = batch
    width = b["aux"].shape[1]
    outputs = model(b["aux"], step_inputs(b["token_embeds"], steps), b["attention_mask"])
    inner = getattr(model, "module", model)
    with torch.no_grad():
        target_logits = b["target_final"] @ lm_head.T
        if t2d is not None:
            target_logits = target_logits[..., t2d]
    total = b["aux"].new_zeros(())
    n0 = agree = 0
    for j, o in enumerate(outputs):
        rows = loss_rows(b["prompt_lens"], b["lengths"], width, j)
        logp = torch.log_softmax(inner.logits(o), dim=-1)               # [B, W, Vd]
        tgt = torch.zeros_like(target_logits)
        tgt[:, : width - 1 - j] = target_logits[:, 1 + j:]
        tgt_logp = torch.log_softmax(tgt, dim=-1)
        kl = (tgt_logp.exp() * (tgt_logp - logp)).sum(-1)
        total = total + decay ** j * (kl * rows).sum()
        if j == 0:
            n0 = int(rows.sum())
            agree = int(((logp.argmax(-1) == tgt.argmax(-1)) & rows).sum())
    return total, n0, agree


@dataclass
class Eagle3Setup:
    """The EAGLE-3 pieces of a run (a :class:`~vllm_massv.training.loop.MethodSetup`)."""
    model: torch.nn.Module
    batcher: Eagle3Batcher
    features: TargetHiddenStates
    steps: int
    decay: float
    loss_kind: str = "ttt kl"

    def loss(self, model, batch, examples):
        t2d = self.model.t2d
        return compute_loss(model, batch, self.steps, self.decay, self.features.lm_head.weight,
                            None if t2d is None else t2d.to(batch["aux"].device))

    @staticmethod
    def loss_weight(batch: dict[str, torch.Tensor]) -> int:
        """The step-0 loss rows (the trainer's divisor)."""
        return int(loss_rows(batch["prompt_lens"], batch["lengths"], batch["aux"].shape[1],
                             0).sum())

    @staticmethod
    def view(example: Example, epoch: int, total_epochs: int) -> Example:
        return example

    @staticmethod
    def save(model, state_dict: dict, out: Path) -> None:
        """`Eagle3Drafter.save_pretrained`: speculators `eagle3` config.json + model.safetensors,
        which `vllm serve <out>` serves as it is."""
        model.save_pretrained(out, state_dict=state_dict)

    @staticmethod
    def checkpoint_block(model, config: dict, source: dict) -> None:
        """None: the saved config.json is final (no massv/msd block, no model card)."""
        return None


def setup(cfg: TrainConfig, tokenizer=None, device: str | torch.device = "cpu") -> Eagle3Setup:
    """Load the head (`massv init --method eagle3` output or a trained one) and the frozen target
    (on `device`), with the target layers the head's config names. `tokenizer` is unused.

    Raises:
        Eagle3ConfigError: not an EAGLE-3 head, or one built for another target shape.
    """
    model = Eagle3Drafter.from_pretrained(cfg.drafter, dtype=torch.float32)
    c = model.cfg
    layers = tuple(a - 1 for a in c.eagle_aux_hidden_state_layer_ids) + (FINAL,)
    features = TargetHiddenStates(cfg.target, layers=layers, device=device,
                                  cache_dir=cfg.feature_cache)
    text = features.config.get_text_config()
    if (features.hidden_size, int(text.num_hidden_layers), int(text.vocab_size)) != (
            c.hidden_size, c.target_num_layers, c.vocab_size):
        raise Eagle3ConfigError(
            f"head built for hidden {c.hidden_size}, {c.target_num_layers} layers, vocab "
            f"{c.vocab_size}; the target has {features.hidden_size}, {text.num_hidden_layers}, "
            f"{text.vocab_size}: rebuild with `massv init --method eagle3`")
    steps = cfg.ttt_steps or c.num_speculative_tokens
    batcher = Eagle3Batcher(features, c.num_aux, image_max_pixels(cfg.data))
    return Eagle3Setup(model, batcher, features, steps, cfg.ttt_decay)
