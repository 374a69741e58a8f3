"""The EAGLE-3 checkpoint contract: the speculators `eagle3` format that stock vLLM serves without
the plugin (`vllm serve <dir>`, or method `eagle3` in `--speculative-config`).
:class:`Eagle3Config` holds its fields; aux layer ids follow vLLM's convention (id `a` is the
hidden state entering decoder layer `a`, i.e. the output of layer `a - 1`). File layout, tensor
shapes and conventions: docs/design/eagle3.md.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from vllm_massv.checkpoint import DrafterConfigError

EAGLE3_SPECULATORS_TYPE = "eagle3"
#: The class vLLM builds for the head (registry names `Eagle3LlamaForCausalLM`,
#: `Eagle3Qwen2_5vlForCausalLM`: `model_executor/models/llama_eagle3.py`).
EAGLE3_ARCHITECTURE = "Eagle3LlamaForCausalLM"
#: Targets whose vLLM model class supports EAGLE-3 aux hidden states and that `massv` can run
#: (the frozen forward of `training.features.TargetHiddenStates`).
EAGLE3_TARGET_TYPES = ("qwen2_vl", "qwen2_5_vl")


class Eagle3ConfigError(DrafterConfigError):
    """A malformed EAGLE-3 head or one that does not fit its target."""


def default_aux_layer_ids(num_layers: int) -> list[int]:
    """vLLM's and speculators' default aux layers `(2, L // 2, L - 3)`
    (`interfaces.py::get_eagle3_default_aux_hidden_state_layers`) when they are distinct and
    valid; otherwise (shallow targets, e.g. 6 layers, where they give 2, 3, 3) a low,
    middle and high layer `(1, L // 2, L - 1)`.

    Raises:
        Eagle3ConfigError: fewer than 3 decoder layers.
    """
    if num_layers < 3:
        raise Eagle3ConfigError(
            f"EAGLE-3 needs a target with >= 3 decoder layers, got {num_layers}")
    ids = [2, num_layers // 2, num_layers - 3]
    if len(set(ids)) == 3 and min(ids) >= 1:
        return ids
    return [1, num_layers // 2, num_layers - 1]


class Eagle3Config(BaseModel):
    """Everything that defines an EAGLE-3 head (the fields of the speculators config).

    Dimensions follow the target's text config (the head attends with the target's head layout;
    `hidden_size` must equal the target's: vLLM asserts embeds and hidden states match).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    rms_norm_eps: float = Field(gt=0)
    rope_theta: float = Field(gt=0)
    max_position_embeddings: int = Field(gt=0)
    hidden_act: str = "silu"
    vocab_size: int = Field(gt=0, description="the target's vocabulary")
    draft_vocab_size: int = Field(gt=0, description="rows of the head's lm_head")
    eagle_aux_hidden_state_layer_ids: list[int]
    target_num_layers: int = Field(gt=0)
    norm_before_residual: bool = True   # speculators' training default
    norm_before_fc: bool = True         # speculators' training default for eagle3
    num_speculative_tokens: int = Field(default=4, ge=1)
    verifier: str
    verifier_architecture: str
    dtype: str = "float32"

    @field_validator("eagle_aux_hidden_state_layer_ids")
    @classmethod
    def _distinct(cls, ids: list[int]) -> list[int]:
        if len(ids) < 1 or len(set(ids)) != len(ids):
            raise ValueError(f"eagle_aux_hidden_state_layer_ids must be distinct, got {ids}")
        return ids

    def model_post_init(self, _context: Any) -> None:
        bad = [a for a in self.eagle_aux_hidden_state_layer_ids
               if not 1 <= a <= self.target_num_layers]
        if bad:
            raise Eagle3ConfigError(
                f"aux layer ids {bad} outside [1, {self.target_num_layers}] (id a = the output of "
                f"target layer a - 1; id 0, the input embeddings, is not supported)")
        if self.draft_vocab_size > self.vocab_size:
            raise Eagle3ConfigError(f"draft_vocab_size {self.draft_vocab_size} > the target's "
                                    f"vocab_size {self.vocab_size}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise Eagle3ConfigError("num_attention_heads must be a multiple of "
                                    "num_key_value_heads")

    @property
    def num_aux(self) -> int:
        return len(self.eagle_aux_hidden_state_layer_ids)

    @property
    def reduced_vocab(self) -> bool:
        """Whether the head drafts over a subset of the target's vocabulary (d2t/t2d)."""
        return self.draft_vocab_size != self.vocab_size

    # ------------------------------------------------------------------ config.json
    def transformer_layer_config(self) -> dict[str, Any]:
        """The Llama decoder-layer config vLLM builds the head from (1-D RoPE: no
        `mrope_section`, so vLLM's proposer treats the head as non-M-RoPE)."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "num_hidden_layers": 1, "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": self.hidden_act, "attention_bias": False, "mlp_bias": False,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "vocab_size": self.vocab_size, "tie_word_embeddings": False, "dtype": self.dtype,
        }

    def to_config_json(self) -> dict[str, Any]:
        """`config.json` in the speculators `eagle3` format (docs/design/eagle3.md)."""
        return {
            "architectures": ["Eagle3Speculator"],
            "speculators_model_type": EAGLE3_SPECULATORS_TYPE,
            "speculators_version": "0.9.0",
            "transformer_layer_config": self.transformer_layer_config(),
            "draft_vocab_size": self.draft_vocab_size,
            "target_hidden_size": self.hidden_size,
            "eagle_aux_hidden_state_layer_ids": list(self.eagle_aux_hidden_state_layer_ids),
            "norm_before_residual": self.norm_before_residual,
            "norm_before_fc": self.norm_before_fc,
            "fc_norm": False, "norm_output": False, "embed_requires_grad": False,
            "dtype": self.dtype,
            "speculators_config": {
                "algorithm": EAGLE3_SPECULATORS_TYPE,
                "proposal_methods": [{"proposal_type": "greedy",
                                      "speculative_tokens": self.num_speculative_tokens,
                                      "accept_tolerance": 0.0, "verifier_accept_k": 1}],
                "default_proposal_method": "greedy",
                "verifier": {"name_or_path": self.verifier,
                             "architectures": [self.verifier_architecture]},
            },
            # not read by vLLM or speculators: what the config cannot say otherwise
            "massv_eagle3": {"target_num_layers": self.target_num_layers},
        }

    @classmethod
    def from_config_json(cls, config: dict[str, Any]) -> "Eagle3Config":
        """Parse a `config.json` written by :meth:`to_config_json`.

        Raises:
            Eagle3ConfigError: not a speculators `eagle3` config, or an unsupported variant
                (`fc_norm`, `norm_output`, several layers, attention bias).
        """
        if config.get("speculators_model_type") != EAGLE3_SPECULATORS_TYPE:
            raise Eagle3ConfigError("not an EAGLE-3 head: config.json has no "
                                    "speculators_model_type 'eagle3'")
        layer = config.get("transformer_layer_config") or {}
        for flag in ("fc_norm", "norm_output"):
            if config.get(flag):
                raise Eagle3ConfigError(f"{flag}=true heads are not supported by massv's trainer")
        if layer.get("num_hidden_layers", 1) != 1 or layer.get("attention_bias"):
            raise Eagle3ConfigError("massv trains one-layer EAGLE-3 heads without attention bias")
        spec = config.get("speculators_config") or {}
        verifier = spec.get("verifier") or {}
        rope = layer.get("rope_parameters") or {}
        heads = int(layer["num_attention_heads"])
        try:
            return cls(
                hidden_size=layer["hidden_size"], intermediate_size=layer["intermediate_size"],
                num_attention_heads=heads, num_key_value_heads=layer["num_key_value_heads"],
                head_dim=layer.get("head_dim") or layer["hidden_size"] // heads,
                rms_norm_eps=layer["rms_norm_eps"],
                rope_theta=rope.get("rope_theta", layer.get("rope_theta", 10000.0)),
                max_position_embeddings=layer["max_position_embeddings"],
                hidden_act=layer.get("hidden_act", "silu"), vocab_size=layer["vocab_size"],
                draft_vocab_size=config.get("draft_vocab_size") or layer["vocab_size"],
                eagle_aux_hidden_state_layer_ids=config["eagle_aux_hidden_state_layer_ids"],
                target_num_layers=(config.get("massv_eagle3") or {}).get(
                    "target_num_layers", max(config["eagle_aux_hidden_state_layer_ids"])),
                norm_before_residual=config.get("norm_before_residual", True),
                norm_before_fc=config.get("norm_before_fc", False),
                num_speculative_tokens=(spec.get("proposal_methods") or [{}])[0].get(
                    "speculative_tokens", 4),
                verifier=verifier.get("name_or_path", ""),
                verifier_architecture=(verifier.get("architectures") or [""])[0],
                dtype=str(config.get("dtype") or layer.get("dtype") or "float32"))
        except (KeyError, ValueError) as e:
            raise Eagle3ConfigError(f"malformed EAGLE-3 config.json: {e}") from e

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the checkpoint (docs/design/eagle3.md) and its shape."""
        h, n, hd = self.hidden_size, self.num_aux, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        shapes: dict[str, tuple[int, ...]] = {
            "fc.weight": (h, n * h),
            "layers.0.self_attn.q_proj.weight": (q, 2 * h),
            "layers.0.self_attn.k_proj.weight": (kv, 2 * h),
            "layers.0.self_attn.v_proj.weight": (kv, 2 * h),
            "layers.0.self_attn.o_proj.weight": (h, q),
            "layers.0.mlp.gate_proj.weight": (self.intermediate_size, h),
            "layers.0.mlp.up_proj.weight": (self.intermediate_size, h),
            "layers.0.mlp.down_proj.weight": (h, self.intermediate_size),
            "layers.0.input_layernorm.weight": (h,),
            "layers.0.hidden_norm.weight": (h,),
            "layers.0.post_attention_layernorm.weight": (h,),
            "norm.weight": (h,),
            "lm_head.weight": (self.draft_vocab_size, h),
        }
        if self.norm_before_fc:
            shapes["input_norm.weight"] = (n * h,)
        if self.reduced_vocab:
            shapes["d2t"] = (self.draft_vocab_size,)
            shapes["t2d"] = (self.vocab_size,)
        return shapes
