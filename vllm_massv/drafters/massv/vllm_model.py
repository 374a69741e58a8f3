"""MASSV drafters for vLLM (MASSV, arXiv 2505.10526 §3): a vLLM text LM plus a projector that maps
the target VLM's cached image embeddings into the drafter's embedding space at the
image-placeholder positions. The drafter never runs a vision encoder: the proposer
(`v1_proposer.py`, V1 runner) or speculator (`mrv2_speculator.py`, Model Runner V2) hands it the
embeddings the target already computed.

:class:`MassvDrafterMixin` goes before the vLLM causal-LM class in the bases and
``SupportsMultiModalEmbeddings`` after it (a ``typing.Protocol`` placed before the LM class would
make Python skip the LM's ``__init__``). Declaring ``SupportsMultiModalEmbeddings`` (not
``SupportsMultiModal``) keeps the draft ``ModelConfig`` text-only (no multimodal processor) while
making vLLM's proposer pass ``multimodal_embeddings`` and ``is_multimodal`` to
``embed_input_ids`` (``v1/spec_decode/llm_base_proposer.py``). Gemma3 specifics (√hidden scaling,
padded image-token row, sliding windows): docs/design/massv.md.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.gemma3 import Gemma3ForCausalLM
from vllm.model_executor.models.interfaces import SupportsMultiModalEmbeddings
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM, Qwen3Model
from vllm.model_executor.models.utils import _merge_multimodal_embeddings, maybe_prefix
from vllm.sequence import IntermediateTensors

from vllm_massv.drafters.massv.config import (MassvConfig, MassvConfigError, deepstack_levels,
                                              expected_projector_weight_names)
from vllm_massv.drafters.massv.mrv2_config import MASSV_SPECULATOR_CONFIG
from vllm_massv.drafters.massv.projector import build_projector

logger = init_logger("vllm.massv.models")


class MassvDrafterMixin:
    """Projector, embedding merge, padded-vocab masking and weight checks of a MASSV drafter.

    The host class must be a vLLM causal LM with ``self.model.embed_input_ids`` (the LM's own
    token embedding, including any scaling the LM applies, e.g. Gemma's √hidden),
    ``compute_logits`` and ``load_weights``, and ``self.config`` (its HF text config).
    """

    supports_multimodal_embeddings = True

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.massv_config = MassvConfig.from_hf_config(vllm_config.model_config.hf_config)
        self.mm_projector = build_projector(self.massv_config, self.config.hidden_size)
        if self.mm_projector is None:
            logger.info("MASSV drafter with projector 'none': text-only drafting by design "
                        "(image placeholders keep their token embeddings).")
        # Rows >= orig_vocab_size exist only to match the target's vocab size.
        self.orig_vocab_size = self.massv_config.orig_vocab_size
        #: Model Runner V2 (`mrv2_speculator.py`): `forward` embeds the tokens itself and takes
        #: the image embeddings staged for the next forward. V1's proposer embeds before the call.
        self.embed_in_forward = False
        self._staged_mm: tuple[list[torch.Tensor], torch.Tensor] | None = None

    def stage_multimodal(self, staged: tuple[list[torch.Tensor], torch.Tensor] | None) -> None:
        """Hand the next `forward` its image embeddings (Model Runner V2's speculator calls this
        before the draft prefill and with None after the draft pass).

        Args:
            staged: None, or (embeds, is_mm) as `embed_input_ids` takes them: per image item a
                [n_i, vision_feature_dim] tensor, and an [num_tokens] bool mask in the layout
                of the next forward's `input_ids`.
        """
        self._staged_mm = staged

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors=None, inputs_embeds: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        """The LM's forward; with `embed_in_forward` (Model Runner V2) the input embeddings are
        computed here from `input_ids` and the staged image embeddings (consumed once).

        Args:
            input_ids: [num_tokens] int token ids (None when `inputs_embeds` is given).
            positions: [num_tokens] int64 1-D positions ([3, num_tokens] for `positions:
                mrope` drafters on V1).
            inputs_embeds: [num_tokens, hidden_size] or None.
        Returns:
            [num_tokens, hidden_size] hidden states.
        Raises:
            RuntimeError: the staged mask does not match `input_ids` (a layout bug; never
                drafted through silently).
        """
        if inputs_embeds is None and self.embed_in_forward:
            staged, self._staged_mm = self._staged_mm, None
            if staged is None:
                inputs_embeds = self.embed_input_ids(input_ids)
            else:
                embeds, is_mm = staged
                if is_mm.shape[0] != input_ids.shape[0]:
                    raise RuntimeError(
                        f"MASSV: staged image mask has {is_mm.shape[0]} rows, the draft pass "
                        f"{input_ids.shape[0]} tokens")
                inputs_embeds = self.embed_input_ids(
                    input_ids, embeds, is_multimodal=is_mm.to(input_ids.device))
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds,
                               **kwargs)

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: list[torch.Tensor] | None = None,
        *,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with projected image embeddings placed at the image positions.

        Token rows go through the LM's own embedding (scaled where the LM scales, e.g. Gemma3
        by √hidden, vLLM ``models/gemma3.py::Gemma3Model.embed_input_ids``); the projected
        image rows are not scaled, as in the target (vLLM ``SupportsMultiModal.embed_input_ids``).

        Args:
            input_ids: [num_tokens] int32/int64 token ids.
            multimodal_embeddings: per image item, a [n_i, vision_feature_dim] tensor (the
                target's cached image embeddings, target dtype), in sequence order.
            is_multimodal: [num_tokens] bool, True at the positions that take an image
                embedding; sum must equal sum(n_i).
        Returns:
            [num_tokens, hidden_size] in the model dtype.
        Raises:
            ValueError: embeddings without a mask, or a count mismatch.
        """
        inputs_embeds = self.model.embed_input_ids(input_ids)
        if not multimodal_embeddings or self.mm_projector is None:
            return inputs_embeds
        if is_multimodal is None:
            raise ValueError("multimodal_embeddings given without is_multimodal")
        dtype = inputs_embeds.dtype
        projected = [self.mm_projector(e.to(dtype)) for e in multimodal_embeddings]
        return _merge_multimodal_embeddings(inputs_embeds, projected, is_multimodal)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """[num_tokens, vocab_size] logits; padded vocab rows are -inf (never proposed)."""
        logits = super().compute_logits(hidden_states)
        if logits is not None and self.orig_vocab_size < logits.shape[-1]:
            logits[..., self.orig_vocab_size:] = float("-inf")
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load the LM's weights plus `mm_projector.*`.

        Raises:
            MassvConfigError: the checkpoint lacks projector weights its config promises.
        """
        seen: set[str] = set()

        def track(it: Iterable[tuple[str, torch.Tensor]]):
            for name, tensor in it:
                seen.add(name)
                yield name, tensor

        loaded = super().load_weights(track(weights))
        missing = [n for n in expected_projector_weight_names(self.massv_config) if n not in seen]
        if missing:
            raise MassvConfigError(
                f"MASSV drafter checkpoint has no {missing} (projector "
                f"{self.massv_config.projector!r}); re-export it with `massv init`/`massv train`.")
        return loaded


class MassvQwen2ForCausalLM(MassvDrafterMixin, Qwen2ForCausalLM, SupportsMultiModalEmbeddings):
    """Qwen2 text LM + MASSV projector. Checkpoint layout: Qwen2's own weight names plus
    `mm_projector.*`; `config.json` carries a `massv` block (:class:`MassvConfig`)."""

    #: vLLM >= 0.34 builds the Model Runner V2 speculator this names (`mrv2_config.py`).
    speculator_config_class = MASSV_SPECULATOR_CONFIG


class MassvGemma3ForCausalLM(MassvDrafterMixin, Gemma3ForCausalLM, SupportsMultiModalEmbeddings):
    """Gemma3 text LM + MASSV projector, for `Gemma3ForConditionalGeneration` targets.
    Checkpoint layout: Gemma3's own weight names (`model.*`, tied `lm_head`) plus
    `mm_projector.*`; `config.json` is a `gemma3_text` config with a `massv` block, saved with
    `sliding_window: null` (every draft layer in one KV-cache group; docs/design/massv.md)."""

    speculator_config_class = MASSV_SPECULATOR_CONFIG


@support_torch_compile(
    dynamic_arg_dims={
        "input_ids": 0,
        "positions": -1,   # [num_tokens] or [3, num_tokens] (M-RoPE)
        "intermediate_tensors": 0,
        "inputs_embeds": 0,
        "deepstack_input_embeds": 0,   # each level is [num_tokens, hidden_size]
    }
)
class Qwen3DeepStackModel(Qwen3Model):
    """vLLM's Qwen3 model with Qwen3-VL's DeepStack step: after decoder layer l < L, level l is
    added to the hidden states (zero rows away from the image positions). The loop of vLLM
    `models/qwen3_vl.py::Qwen3LLMModel.forward`, without pipeline parallelism (MASSV drafters
    refuse it before serving) or EAGLE-3 aux hidden states (a drafter has none)."""

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None,
                deepstack_input_embeds: IntermediateTensors | None = None) -> torch.Tensor:
        """Args: as `Qwen3Model.forward`, plus `deepstack_input_embeds`: L tensors
        `level_0` .. `level_{L-1}`, each [num_tokens, hidden_size]. Returns [num_tokens,
        hidden_size] normed hidden states."""
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        levels = len(deepstack_input_embeds) if deepstack_input_embeds is not None else 0
        for layer_idx, layer in enumerate(self.layers):
            hidden, residual = layer(positions, hidden, residual)
            if layer_idx < levels:
                hidden = hidden + deepstack_input_embeds[f"level_{layer_idx}"]
        hidden, _ = self.norm(hidden, residual)
        return hidden


class DeepStackLevels:
    """The DeepStack levels of the next forward, in one persistent [L, max_tokens, hidden]
    buffer (fixed addresses, as vLLM's Qwen3-VL keeps them: `_set_deepstack_input_embeds`).

    `set` scatters each image item's level columns to the rows its `is_multimodal` mask marks
    (rows of the forward's token layout: the draft batch); `clear` zeroes what was set, so a
    forward without images (decode steps, dummy runs) adds zeros.
    """

    def __init__(self, levels: int, max_tokens: int, hidden_size: int, dtype: torch.dtype
                 ) -> None:
        self.levels = levels
        self.buffer = torch.zeros(levels, max_tokens, hidden_size, dtype=dtype)
        self.num_set = 0   # rows [0, num_set) may be nonzero

    def set(self, multimodal_embeddings: list[torch.Tensor], is_multimodal: torch.Tensor,
            num_tokens: int, width: int) -> None:
        """Args:
            multimodal_embeddings: per image item, [n_i, width * (1 + L)] (vLLM's cache).
            is_multimodal: [num_tokens] bool, True at the sum(n_i) image positions.
            num_tokens: rows of the next forward.
            width: the main block's width (== hidden size: identity projector).
        Raises:
            ValueError: an item without exactly L levels.
        """
        for e in multimodal_embeddings:
            if e.shape[-1] != width * (1 + self.levels):
                raise ValueError(
                    f"MASSV deepstack: image embedding of width {e.shape[-1]}, expected the "
                    f"main block ({width}) plus {self.levels} DeepStack levels")
        self.clear()
        if num_tokens > self.buffer.shape[1]:
            self.buffer = self.buffer.new_zeros(self.levels, num_tokens, self.buffer.shape[2])
        per_level = [e[:, width:].to(self.buffer.dtype) for e in multimodal_embeddings]
        merged = _merge_multimodal_embeddings(
            self.buffer.new_zeros(num_tokens, self.levels * width), per_level, is_multimodal)
        self.buffer[:, :num_tokens] = merged.view(num_tokens, self.levels, width).transpose(0, 1)
        self.num_set = num_tokens

    def clear(self) -> None:
        if self.num_set:
            self.buffer[:, :self.num_set].zero_()
            self.num_set = 0

    def get(self, num_tokens: int) -> IntermediateTensors:
        """The first `num_tokens` rows of every level (views of the buffer)."""
        if num_tokens > self.buffer.shape[1]:
            self.buffer = self.buffer.new_zeros(self.levels, num_tokens, self.buffer.shape[2])
        return IntermediateTensors({f"level_{i}": self.buffer[i, :num_tokens]
                                    for i in range(self.levels)})


class Qwen3ForCausalLMWithDeepStack(Qwen3ForCausalLM):
    """`Qwen3ForCausalLM` whose model is :class:`Qwen3DeepStackModel` when the drafter's
    `massv.deepstack` is true (else exactly `Qwen3ForCausalLM`). The number of levels L is the
    target's (`len(vision_config.deepstack_visual_indexes)`, from the speculative config)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        if not MassvConfig.from_hf_config(vllm_config.model_config.hf_config).deepstack:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            self.deepstack: DeepStackLevels | None = None
            return
        # Qwen3ForCausalLM.__init__ with the DeepStack model (as vLLM's Qwen3LLMForCausalLM)
        super(Qwen3ForCausalLM, self).__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.vllm_config = vllm_config
        self.quant_config = vllm_config.quant_config
        self.model = Qwen3DeepStackModel(vllm_config=vllm_config,
                                         prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                      quant_config=self.quant_config,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

        spec = vllm_config.speculative_config
        target = getattr(spec, "target_model_config", None)
        levels = deepstack_levels(target.hf_config) if target is not None else 0
        if not levels:
            raise MassvConfigError(
                "massv.deepstack is true but the target's DeepStack levels are unknown (no "
                "Qwen3-VL target in the speculative config); serve the drafter as a "
                "speculative model of its Qwen3-VL target, or set deepstack to false.")
        sched = vllm_config.scheduler_config
        self.deepstack = DeepStackLevels(
            levels, sched.max_num_batched_tokens + sched.max_num_seqs, config.hidden_size,
            vllm_config.model_config.dtype)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if self.deepstack is None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        num_tokens = (inputs_embeds if inputs_embeds is not None else input_ids).shape[0]
        hidden = self.model(input_ids, positions, intermediate_tensors, inputs_embeds,
                            deepstack_input_embeds=self.deepstack.get(num_tokens))
        self.deepstack.clear()   # the levels belong to this forward's tokens only
        return hidden


class MassvQwen3ForCausalLM(MassvDrafterMixin, Qwen3ForCausalLMWithDeepStack,
                            SupportsMultiModalEmbeddings):
    """Qwen3 text LM (per-head `q_norm` / `k_norm`) + MASSV projector, for
    `Qwen3VLForConditionalGeneration` targets. Checkpoint layout: Qwen3's own weight names plus
    `mm_projector.*`; `config.json` is a `qwen3` config with a `massv` block (`positions:
    mrope` drafters carry the target's `mrope_section` and `mrope_interleaved: true`).

    vLLM caches each Qwen3-VL image as one [n_i, out_hidden_size * (1 + L)] tensor: the
    post-merger embedding in the first `out_hidden_size` columns, then L DeepStack levels that
    the target adds to the hidden states after its first L decoder layers (vLLM
    `models/qwen3_vl.py::Qwen3_VisionTransformer.forward`, `_compute_deepstack_embeds`,
    `Qwen3LLMModel.forward`). The projector reads the first `massv.vision_feature_dim`
    columns: the main embedding (`feature_tap: post_merger`) or the whole row
    (`post_merger_deepstack`). With `massv.deepstack` (identity projector; `massv init
    --projector identity` sets it on Qwen3-VL targets) the drafter does the same:
    `embed_input_ids` keeps the level columns at the rows `is_multimodal` marks (the draft
    batch's image positions) and the next `forward` adds level l after decoder layer l
    (:class:`Qwen3DeepStackModel`); calls without images clear them. Without it the levels
    are ignored.
    """

    speculator_config_class = MASSV_SPECULATOR_CONFIG

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: list[torch.Tensor] | None = None,
        *,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As :meth:`MassvDrafterMixin.embed_input_ids`, on each item's first
        `vision_feature_dim` columns (the main embedding, or the whole row for `feature_tap:
        post_merger_deepstack`); with `massv.deepstack`, also stages the DeepStack levels for
        the next `forward`.

        Args:
            multimodal_embeddings: per image item, [n_i, vision_feature_dim * (1 + L)] (vLLM's
                cached Qwen3-VL embedding with L DeepStack levels) or [n_i,
                vision_feature_dim] (not with `deepstack`).
            is_multimodal: [num_tokens] bool, the image positions in `input_ids`' layout.
        Raises:
            ValueError: an item narrower than `vision_feature_dim`, not a whole number of
                `vision_feature_dim` blocks wide, or (deepstack) without the target's L levels.
        """
        width = self.massv_config.vision_feature_dim
        if self.deepstack is not None:
            if multimodal_embeddings and is_multimodal is not None:
                self.deepstack.set(multimodal_embeddings, is_multimodal, input_ids.shape[0],
                                   width)
            else:
                self.deepstack.clear()
        if multimodal_embeddings:
            multimodal_embeddings = [main_image_embedding(e, width)
                                     for e in multimodal_embeddings]
        return super().embed_input_ids(input_ids, multimodal_embeddings,
                                       is_multimodal=is_multimodal)


def main_image_embedding(embeds: torch.Tensor, width: int) -> torch.Tensor:
    """The main (post-merger) block of a Qwen3-VL image embedding as vLLM caches it.

    Args:
        embeds: [n, width * (1 + L)], L >= 0 DeepStack levels after the main block (vLLM
            `models/qwen3_vl.py::_compute_deepstack_embeds` splits it the same way).
        width: the main block's width (`vision_config.out_hidden_size`).
    Returns:
        [n, width], a view of `embeds`.
    Raises:
        ValueError: `embeds.shape[-1]` is not a positive multiple of `width`.
    """
    cols = embeds.shape[-1]
    if cols < width or cols % width:
        raise ValueError(f"MASSV: image embedding of width {cols} is not the main block "
                         f"({width}) plus whole DeepStack levels")
    return embeds[..., :width]
