"""MSD drafter for transformers (training, reference computations): `MsdQwen2Drafter`, the twin of
`vllm_model.py`'s `EagleMsdQwen2ForCausalLM`, reading and writing the same drafter directory
(`config.json` with an `msd` block; `model.fc.*` and `model.layers.0.*` in `model.safetensors`).
Architecture and checkpoint layout: docs/design/msd.md.
"""

from __future__ import annotations

import json
from pathlib import Path
import torch
from torch import nn
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

from vllm_massv.drafters.msd.config import MSD_ARCHITECTURE, MsdConfig, MsdConfigError

WEIGHTS_NAME = "model.safetensors"


class MsdQwen2Model(nn.Module):
    """fc + one decoder layer (+ rotary tables, not saved); the `model.` prefix of the weights."""

    def __init__(self, config: Qwen2Config, fc_bias: bool = True) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=fc_bias)
        self.layers = nn.ModuleList([Qwen2DecoderLayer(config, layer_idx=0)])
        self.rotary_emb = Qwen2RotaryEmbedding(config)


class MsdQwen2Drafter(nn.Module):
    """The MSD drafter head (transformers modules; trainable parameters: fc and the layer).

    Args:
        config: the drafter's `Qwen2Config`, carrying the `msd` block as `config.msd` (a dict,
            :class:`~vllm_massv.drafters.msd.config.MsdConfig`).
    Raises:
        MsdConfigError: `num_hidden_layers` is not 1, or the `msd` block is missing/invalid.
    """

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        if config.num_hidden_layers != 1:
            raise MsdConfigError(f"an MSD drafter has one decoder layer, config says "
                                 f"{config.num_hidden_layers}")
        if config._attn_implementation is None:
            config._attn_implementation = "sdpa"
        self.config = config
        self.msd = MsdConfig.from_hf_config(config)
        self._config_json: dict | None = None   # config.json as read, rewritten by save
        self.model = MsdQwen2Model(config, fc_bias=self.msd.fc_bias)

    # ------------------------------------------------------------------ properties
    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def decouple_visual_tokens(self) -> bool:
        """Whether image/video rows bypass the fc (MSD's decoupling; False: the ablation)."""
        return self.msd.decouple_visual_tokens

    @property
    def mm_token_ids(self) -> tuple[int, ...]:
        """The placeholder ids whose rows are decoupled (image, and video when set)."""
        ids = (self.msd.image_token_id, self.msd.video_token_id)
        return tuple(i for i in ids if i is not None)

    def decoupled_rows(self, next_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] bool: rows whose *next* token (`next_ids` = x_{t+1}, the shifted input ids)
        is an image/video placeholder, i.e. the rows MSD decouples (vLLM's EAGLE first pass marks
        the same rows with `shift_computed_tokens=1`)."""
        mask = torch.zeros_like(next_ids, dtype=torch.bool)
        for tok in self.mm_token_ids:
            mask |= next_ids == tok
        return mask

    # ------------------------------------------------------------------ forward
    def forward(self, inputs_embeds: torch.Tensor, target_hidden: torch.Tensor,
                mm_rows: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Drafter outputs o_t (predictions of the target's post-norm hidden state f_{t+1}).

        Args:
            inputs_embeds: [B, L, H] embedding of the *next* token x_{t+1} at row t: the target's
                token embedding, and at `mm_rows` the target's image embedding for that
                placeholder (post-merger; vLLM `embed_input_ids(..., is_multimodal=...)`).
            target_hidden: [B, L, H] the target's last-layer post-norm hidden state f_t.
            mm_rows: [B, L] bool, rows whose next token is an image/video placeholder (see
                :meth:`decoupled_rows`). With `decouple_visual_tokens` their layer input is
                `inputs_embeds` itself instead of the fc mix; otherwise it is ignored.
            position_ids: [B, L] int64 1-D positions (default: 0..L-1 per row).
            attention_mask: [B, L] 1 for real tokens, 0 for padding (default: all real); attention
                is causal.
        Returns:
            [B, L, H] in the input dtype; the logits are :meth:`logits` of this.
        Raises:
            ValueError: shapes disagree.
        """
        if inputs_embeds.shape != target_hidden.shape or inputs_embeds.shape[-1] != \
                self.hidden_size:
            raise ValueError(f"inputs_embeds {tuple(inputs_embeds.shape)} and target_hidden "
                             f"{tuple(target_hidden.shape)} must both be [B, L, "
                             f"{self.hidden_size}]")
        batch, length, _ = inputs_embeds.shape
        h = self.model.fc(torch.cat((inputs_embeds, target_hidden), dim=-1))
        if self.decouple_visual_tokens and mm_rows is not None:
            h = torch.where(mm_rows.unsqueeze(-1), inputs_embeds.to(h.dtype), h)
        if position_ids is None:
            position_ids = torch.arange(length, device=h.device).expand(batch, -1)
        mask = _causal_mask(batch, length, attention_mask, h.dtype, h.device)
        cos_sin = self.model.rotary_emb(h, position_ids)
        for layer in self.model.layers:
            h = layer(h, attention_mask=mask, position_ids=position_ids,
                      position_embeddings=cos_sin)
        return h

    @staticmethod
    def logits(outputs: torch.Tensor, lm_head: nn.Module | torch.Tensor) -> torch.Tensor:
        """Next-token logits through the target's (frozen) LM head: [..., H] -> [..., vocab].

        `lm_head` is the target's `nn.Linear` or its weight [vocab, H]."""
        weight = lm_head.weight if isinstance(lm_head, nn.Module) else lm_head
        return outputs @ weight.to(outputs.dtype).T

    # ------------------------------------------------------------------ checkpoint
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32
                        ) -> "MsdQwen2Drafter":
        """Load a drafter directory (strict: every weight present, nothing extra).

        Raises:
            FileNotFoundError: no `model.safetensors`.
            MsdConfigError: missing/unexpected weights or a bad config.
        """
        from safetensors.torch import load_file

        path = Path(path)
        config = Qwen2Config.from_pretrained(path)
        model = cls(config)
        model._config_json = json.loads((path / "config.json").read_text())
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME}")
        missing, unexpected = model.load_state_dict(load_file(weights), strict=False)
        if missing or unexpected:
            raise MsdConfigError(f"{path}: MSD weights do not match (missing {missing}, unexpected "
                             f"{unexpected})")
        return model.to(dtype)

    def save_pretrained(self, path: str | Path) -> None:
        """Write `config.json` (the one read by :meth:`from_pretrained`, else the config's
        `to_dict()`; architectures = `EagleMsdQwen2ForCausalLM`, the current `msd` block) and
        `model.safetensors` (contiguous tensors, the contract's names)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = dict(self._config_json) if self._config_json else self.config.to_dict()
        config["architectures"] = [MSD_ARCHITECTURE]
        config["num_hidden_layers"] = 1
        config["tie_word_embeddings"] = False
        config["msd"] = self.msd.to_json_dict()
        for key in ("_attn_implementation_autoset", "_name_or_path"):
            config.pop(key, None)
        (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, path / WEIGHTS_NAME, metadata={"format": "pt"})


def _causal_mask(batch: int, length: int, attention_mask: torch.Tensor | None,
                 dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive [B, 1, L, L] mask: causal, and padded keys masked."""
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    allowed = allowed.expand(batch, 1, length, length)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    mask = torch.zeros(batch, 1, length, length, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)
