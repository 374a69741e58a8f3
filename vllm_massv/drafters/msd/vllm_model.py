"""vLLM model of an MSD drafter, `EagleMsdQwen2ForCausalLM`, served by vLLM's EAGLE proposer
(`method: eagle`): an fc over [target embedding of x_{t+1}; target hidden state f_t], one Qwen2
decoder layer, image rows decoupled, and the target's own embedding and LM head.
:meth:`EagleMsdQwen2ForCausalLM.embed_input_ids` remembers the image-row mask for the next
:meth:`~EagleMsdQwen2ForCausalLM.forward`. Architecture and how it plugs into vLLM:
docs/design/msd.md.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import (ParallelLMHead,
                                                                 VocabParallelEmbedding)
from vllm.model_executor.models.interfaces import SupportsEagle, SupportsMultiModalEmbeddings
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer
from vllm.model_executor.models.utils import (AutoWeightsLoader, WeightsMapper,
                                              _merge_multimodal_embeddings,
                                              get_draft_quant_config, maybe_prefix,
                                              process_eagle_weight)

from vllm_massv.drafters.msd.config import MsdConfig, MsdConfigError, expected_weight_names

logger = init_logger("vllm.massv.msd")


class MsdQwen2Model(nn.Module):
    """fc + Qwen2 decoder layer(s); the target's embedding is swapped in by the proposer."""

    hf_to_vllm_mapper = WeightsMapper(orig_to_new_stacked={
        ".q_proj": (".qkv_proj", "q"), ".k_proj": (".qkv_proj", "k"),
        ".v_proj": (".qkv_proj", "v"), ".gate_proj": (".gate_up_proj", 0),
        ".up_proj": (".gate_up_proj", 1)})

    def __init__(self, *, vllm_config: VllmConfig, msd: MsdConfig, prefix: str = "",
                 start_layer_id: int = 0) -> None:
        super().__init__()
        self.config = vllm_config.speculative_config.draft_model_config.hf_config
        quant_config = get_draft_quant_config(vllm_config)
        hidden = self.config.hidden_size
        self.embed_tokens = VocabParallelEmbedding(
            self.config.vocab_size, hidden, prefix=maybe_prefix(prefix, "embed_tokens"))
        # Attention-layer names must not collide with the target's: offset by its layer count.
        self.layers = nn.ModuleList([
            Qwen2DecoderLayer(self.config, vllm_config.cache_config, quant_config,
                              prefix=maybe_prefix(prefix, f"layers.{i + start_layer_id}"))
            for i in range(self.config.num_hidden_layers)])
        self.fc = ReplicatedLinear(2 * hidden, hidden, bias=msd.fc_bias,
                                   params_dtype=vllm_config.model_config.dtype,
                                   quant_config=quant_config, prefix=maybe_prefix(prefix, "fc"),
                                   return_bias=False)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor,
                hidden_states: torch.Tensor, decoupled_rows: torch.Tensor | None
                ) -> torch.Tensor:
        """[N, H] embeddings of x_{t+1}, [N] int64 1-D positions, [N, H] hidden states f_t,
        [N] bool decoupled rows (or None) -> [N, H] layer outputs o_t."""
        h = self.fc(torch.cat((inputs_embeds, hidden_states), dim=-1))
        if decoupled_rows is not None:
            h = torch.where(decoupled_rows.unsqueeze(-1), inputs_embeds.to(h.dtype), h)
        residual = None
        for layer in self.layers:
            h, residual = layer(positions, h, residual)
        return h + residual

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)


class EagleMsdQwen2ForCausalLM(nn.Module, SupportsEagle, SupportsMultiModalEmbeddings):
    """MSD drafter for vLLM's EAGLE proposer (`method: eagle`), Qwen2-VL / Qwen2.5-VL targets.

    Raises (at construction / weight loading):
        MsdConfigError: the `msd` block is missing or invalid, or weights are missing.
    """

    supports_multimodal_embeddings = True

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        self.config = vllm_config.speculative_config.draft_model_config.hf_config
        self.msd_config = MsdConfig.from_hf_config(self.config)
        if getattr(self.config, "draft_vocab_size", None) is None:
            self.config.draft_vocab_size = self.config.vocab_size
        target_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
        self.model = MsdQwen2Model(vllm_config=vllm_config, msd=self.msd_config,
                                   prefix=maybe_prefix(prefix, "model"),
                                   start_layer_id=target_layers)
        self.lm_head = ParallelLMHead(self.config.vocab_size, self.config.hidden_size,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        self.logits_processor = LogitsProcessor(self.config.vocab_size,
                                                scale=getattr(self.config, "logit_scale", 1.0))
        self.has_own_embed_tokens = False
        self.has_own_lm_head = False
        # Set by embed_input_ids, consumed by the next forward (see the module docstring).
        self._decoupled_rows: torch.Tensor | None = None

    def embed_input_ids(self, input_ids: torch.Tensor,
                        multimodal_embeddings: list[torch.Tensor] | None = None, *,
                        is_multimodal: torch.Tensor | None = None) -> torch.Tensor:
        """Target token embeddings of the (shifted) input ids, with the target's image
        embeddings at the `is_multimodal` rows; remembers those rows for :meth:`forward`.

        Args:
            input_ids: [N] int token ids (row t holds x_{t+1}).
            multimodal_embeddings: per image item a [n_i, H] tensor (the target's cached,
                post-merger embeddings), in row order.
            is_multimodal: [N] bool (CPU or device), True at rows taking an image embedding;
                its sum equals sum(n_i).
        Returns:
            [N, H] in the model dtype.
        Raises:
            ValueError: embeddings without a mask, or a count mismatch.
        """
        embeds = self.model.embed_input_ids(input_ids)
        self._decoupled_rows = None
        if not multimodal_embeddings:
            return embeds
        if is_multimodal is None:
            raise ValueError("multimodal_embeddings given without is_multimodal")
        embeds = _merge_multimodal_embeddings(embeds, multimodal_embeddings, is_multimodal)
        if self.msd_config.decouple_visual_tokens:
            self._decoupled_rows = is_multimodal.to(embeds.device, non_blocking=True)
        return embeds

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                hidden_states: torch.Tensor, inputs_embeds: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft pass.

        Args:
            input_ids: [N] int (used only when `inputs_embeds` is None: text-only targets).
            positions: [N] int64 1-D positions.
            hidden_states: [N, H] target hidden states f_t (first pass) or the drafter's own
                previous outputs (later draft steps).
            inputs_embeds: [N, H] from :meth:`embed_input_ids`.
        Returns:
            (o, o): [N, H] layer outputs, for logits and as the next step's hidden states.
        """
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_input_ids(input_ids)
        rows, self._decoupled_rows = self._decoupled_rows, None
        if rows is not None and rows.shape[0] != inputs_embeds.shape[0]:
            if rows.shape[0] > inputs_embeds.shape[0]:
                raise RuntimeError(f"MSD: {rows.shape[0]} decoupled-row flags for "
                                   f"{inputs_embeds.shape[0]} rows")
            rows = torch.nn.functional.pad(rows, (0, inputs_embeds.shape[0] - rows.shape[0]))
        out = self.model(inputs_embeds, positions, hidden_states, rows)
        return out, out

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load `model.fc.*` and `model.layers.*` (contract names; a name without the `model.`
        prefix, as in MSD's released files, gets it).

        Raises:
            MsdConfigError: a weight the contract requires is missing.
        """
        def named(weights):
            for name, tensor in weights:
                if not name.startswith(("model.", "lm_head.")):
                    name = "model." + name
                process_eagle_weight(self, name)
                yield name, tensor

        seen: list[str] = []

        def record(weights):
            for name, tensor in weights:
                seen.append(name)
                yield name, tensor

        loaded = AutoWeightsLoader(self).load_weights(record(named(weights)))
        missing = sorted(set(expected_weight_names(self.config.num_hidden_layers,
                                                   self.msd_config.fc_bias)) - set(seen))
        if missing:
            raise MsdConfigError(f"MSD drafter checkpoint lacks {missing}")
        # The embedding and LM head are the target's, installed by the proposer after loading.
        return set(loaded) | {n for n, _ in self.named_parameters()
                              if n.startswith(("model.embed_tokens.", "lm_head."))}
