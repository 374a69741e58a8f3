"""EAGLE-3 head for PyTorch/transformers (training, reference computations): `Eagle3Drafter`, the
twin of vLLM's `Eagle3LlamaForCausalLM` (`vllm/model_executor/models/llama_eagle3.py`), reading
and writing the checkpoint of `config.py`. :meth:`Eagle3Drafter.unroll` runs the draft chain from
every row of a sequence at once (training-time test, EAGLE-3 §3.2). The computation, step by
step as vLLM serves it: docs/design/eagle3.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vllm_massv.drafters.eagle3.config import Eagle3Config, Eagle3ConfigError

WEIGHTS_NAME = "model.safetensors"


class RMSNorm(nn.Module):
    """RMSNorm as vLLM's `RMSNorm` / transformers' `LlamaRMSNorm` compute it (float32 inside)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Eagle3Attention(nn.Module):
    """q/k/v over the 2H-wide `cat(embeds, hidden)`, RoPE (neox), GQA, o_proj back to H."""

    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        h, hd = cfg.hidden_size, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = (cfg.num_attention_heads,
                                                    cfg.num_key_value_heads, hd)
        self.q_proj = nn.Linear(2 * h, self.heads * hd, bias=False)
        self.k_proj = nn.Linear(2 * h, self.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(2 * h, self.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.heads * hd, h, bias=False)


class Eagle3MLP(nn.Module):
    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Eagle3DecoderLayer(nn.Module):
    """vLLM's `llama_eagle3.LlamaDecoderLayer` with `layer_idx == 0` (weights `layers.0.*`)."""

    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        self.norm_before_residual = cfg.norm_before_residual
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Eagle3Attention(cfg)
        self.mlp = Eagle3MLP(cfg)

    def attention_inputs(self, embeds: torch.Tensor, hidden: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(`cat(input_layernorm(embeds), hidden_norm(hidden))` [.., 2H], the residual [.., H])."""
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        return torch.cat([self.input_layernorm(embeds), normed], dim=-1), residual

    def finish(self, attn_out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The pre-norm layer output `o` from the attention output (after o_proj)."""
        r = residual + attn_out
        return r + self.mlp(self.post_attention_layernorm(r))


class Eagle3Drafter(nn.Module):
    """The EAGLE-3 head (trainable: fc, input_norm, the layer, norm; frozen: lm_head, d2t/t2d).

    Args:
        cfg: the head's :class:`~vllm_massv.drafters.eagle3.config.Eagle3Config`.
    """

    def __init__(self, cfg: Eagle3Config) -> None:
        super().__init__()
        self.cfg = cfg
        h, n = cfg.hidden_size, cfg.num_aux
        self.fc = nn.Linear(n * h, h, bias=False)
        self.input_norm = RMSNorm(n * h, cfg.rms_norm_eps) if cfg.norm_before_fc else None
        self.layers = nn.ModuleList([Eagle3DecoderLayer(cfg)])
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(h, cfg.draft_vocab_size, bias=False)
        self.lm_head.weight.requires_grad_(False)
        if cfg.reduced_vocab:
            self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
            self.register_buffer("t2d", torch.zeros(cfg.vocab_size, dtype=torch.bool))
        else:
            self.d2t = self.t2d = None
        half = cfg.head_dim // 2
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, half, dtype=torch.float32) / half))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @property
    def layer(self) -> Eagle3DecoderLayer:
        return self.layers[0]

    # ------------------------------------------------------------------ pieces
    def combine_hidden_states(self, aux: torch.Tensor) -> torch.Tensor:
        """[..., n_aux*H] target aux states (vLLM concatenates them in layer-id order) ->
        [..., H]: `fc(input_norm(aux))`."""
        if self.input_norm is not None:
            aux = self.input_norm(aux)
        return self.fc(aux)

    def logits(self, outputs: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits `lm_head(norm(o))`: [..., H] -> [..., draft_vocab_size]."""
        return self.lm_head(self.norm(outputs))

    def target_logits(self, draft_logits: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits scattered into the target's vocabulary (-inf elsewhere), as
        vLLM's `compute_logits` does with d2t."""
        if self.d2t is None:
            return draft_logits
        full = draft_logits.new_full((*draft_logits.shape[:-1], self.cfg.vocab_size),
                                     float("-inf"))
        ids = torch.arange(self.cfg.draft_vocab_size, device=draft_logits.device) + self.d2t
        full[..., ids] = draft_logits
        return full

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Neox-style RoPE (`rotate_half`) of x [B, heads, L, hd] at positions [B, L]."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq      # [B, L, hd/2]
        cos = torch.cat([freqs.cos(), freqs.cos()], -1)[:, None].to(x.dtype)
        sin = torch.cat([freqs.sin(), freqs.sin()], -1)[:, None].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor):
        attn, (b, length, _) = self.layer.self_attn, x.shape
        q = attn.q_proj(x).view(b, length, attn.heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, length, attn.kv_heads, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, length, attn.kv_heads, attn.head_dim).transpose(1, 2)
        rep = attn.heads // attn.kv_heads
        k = self._rope(k, positions).repeat_interleave(rep, dim=1)
        return self._rope(q, positions), k, v.repeat_interleave(rep, dim=1)

    # ------------------------------------------------------------------ training-time test
    def unroll(self, aux: torch.Tensor, embeds: list[torch.Tensor],
               attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The head's draft chain started at every row at once (training-time test).

        Args:
            aux: [B, L, n_aux*H] the target's aux hidden states a_t (layer-id order).
            embeds: one [B, L, H] per draft step j: row t holds the embedding of the token step j
                consumes there, E(x_{t+1+j}) under teacher forcing (zeros past the end).
            attention_mask: [B, L] 1 for real rows, 0 for padding (default: all real).
            position_ids: [B, L] 1-D positions of the step-0 rows (default 0..L-1); step j adds j.
        Returns:
            Per step j, the pre-norm outputs o^j [B, L, H]; `logits(o^j)[:, t]` is the draft of
            token x_{t+2+j}. Step j's row t attends to step-0 rows <= t and to row t of steps
            1..j, the keys vLLM's KV cache holds when it drafts from context row t.
        """
        return self._chain(self.combine_hidden_states(aux), embeds, attention_mask, position_ids)

    def causal_forward(self, hidden: torch.Tensor, embeds: torch.Tensor,
                       position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One causal pass over rows whose hidden input is given: [B, L, H] (`combine_hidden_
        states(aux)` for context rows, a previous output o for draft rows), embeddings [B, L, H]
        -> outputs o [B, L, H]. vLLM's forward over its KV cache computes the same rows."""
        return self._chain(hidden, [embeds], None, position_ids)[0]

    def _chain(self, hidden: torch.Tensor, embeds: list[torch.Tensor],
               attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
               ) -> list[torch.Tensor]:
        b, length, _ = hidden.shape
        scale = self.layer.self_attn.head_dim ** -0.5
        if position_ids is None:
            position_ids = torch.arange(length, device=hidden.device).expand(b, -1)
        allowed = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()
        allowed = allowed.expand(b, 1, length, length)
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]
        keys: list[tuple[torch.Tensor, torch.Tensor]] = []
        outputs = []
        for j, e in enumerate(embeds):
            x, residual = self.layer.attention_inputs(e, hidden)
            q, k, v = self._qkv(x, position_ids + j)
            if j == 0:
                k0, v0 = k, v
            else:
                keys.append((k, v))
            scores = (q @ k0.transpose(-1, -2)) * scale                       # [B, h, L, L]
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
            diag = [((q * ki).sum(-1) * scale)[..., None] for ki, _ in keys]  # [B, h, L, 1]
            probs = torch.softmax(torch.cat([scores, *diag], dim=-1), dim=-1)
            out = probs[..., :length] @ v0
            for i, (_, vi) in enumerate(keys):
                out = out + probs[..., length + i: length + i + 1] * vi
            out = out.transpose(1, 2).reshape(b, length, -1)
            hidden = self.layer.finish(self.layer.self_attn.o_proj(out), residual)
            outputs.append(hidden)
        return outputs

    def forward(self, aux: torch.Tensor, embeds: list[torch.Tensor],
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        """:meth:`unroll` (the call accelerate/DDP wrap in training)."""
        return self.unroll(aux, embeds, attention_mask, position_ids)

    # ------------------------------------------------------------------ checkpoint
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32
                        ) -> "Eagle3Drafter":
        """Load a head directory (strict: every tensor of the contract, nothing else).

        Raises:
            FileNotFoundError: no `config.json` or `model.safetensors`.
            Eagle3ConfigError: a config that is not EAGLE-3, or weights that do not match it.
        """
        from safetensors.torch import load_file

        path = Path(path)
        cfg = Eagle3Config.from_config_json(json.loads((path / "config.json").read_text()))
        model = cls(cfg)
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME}")
        state = load_file(weights)
        expected = cfg.weight_shapes()
        bad = {k: tuple(v.shape) for k, v in state.items() if expected.get(k) != tuple(v.shape)}
        missing = sorted(set(expected) - set(state))
        if bad or missing:
            raise Eagle3ConfigError(f"{path}: EAGLE-3 weights do not match the config (missing "
                                    f"{missing}, unexpected or misshapen {bad})")
        model.load_state_dict(state, strict=True)
        return model.to(dtype)

    def save_pretrained(self, path: str | Path, state_dict: dict | None = None) -> None:
        """Write `config.json` (speculators `eagle3` format) and `model.safetensors`."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(
            json.dumps(self.cfg.to_config_json(), indent=2, sort_keys=True) + "\n")
        state = state_dict if state_dict is not None else self.state_dict()
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
                  path / WEIGHTS_NAME, metadata={"format": "pt"})
