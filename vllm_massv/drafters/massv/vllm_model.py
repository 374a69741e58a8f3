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
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.models.gemma3 import Gemma3ForCausalLM
from vllm.model_executor.models.interfaces import SupportsMultiModalEmbeddings
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.model_executor.models.utils import _merge_multimodal_embeddings

from vllm_massv.drafters.massv.config import (MassvConfig, MassvConfigError,
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


class MassvQwen3ForCausalLM(MassvDrafterMixin, Qwen3ForCausalLM, SupportsMultiModalEmbeddings):
    """Qwen3 text LM (per-head `q_norm` / `k_norm`) + MASSV projector, for
    `Qwen3VLForConditionalGeneration` targets. Checkpoint layout: Qwen3's own weight names plus
    `mm_projector.*`; `config.json` is a `qwen3` config with a `massv` block (`positions:
    mrope` drafters carry the target's `mrope_section` and `mrope_interleaved: true`).

    The projector reads the target's *main* image embedding only. vLLM caches each Qwen3-VL
    image as one [n_i, out_hidden_size * (1 + L)] tensor: the post-merger embedding in the first
    `out_hidden_size` (= `massv.vision_feature_dim`) columns, then L DeepStack levels that the
    target adds to the hidden states after its first L decoder layers (vLLM
    `models/qwen3_vl.py::Qwen3_VisionTransformer.forward`, `_compute_deepstack_embeds`,
    `Qwen3LLMModel.forward`). The drafter keeps the first `vision_feature_dim` columns and does
    not inject the levels.
    """

    speculator_config_class = MASSV_SPECULATOR_CONFIG

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: list[torch.Tensor] | None = None,
        *,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As :meth:`MassvDrafterMixin.embed_input_ids`, on each item's main-embedding slice.

        Args:
            multimodal_embeddings: per image item, [n_i, vision_feature_dim * (1 + L)] (vLLM's
                cached Qwen3-VL embedding with L DeepStack levels) or [n_i,
                vision_feature_dim]; only the first `vision_feature_dim` columns are used.
        Raises:
            ValueError: an item narrower than `vision_feature_dim`, or not a whole number of
                `vision_feature_dim` blocks wide.
        """
        if multimodal_embeddings:
            multimodal_embeddings = [main_image_embedding(e, self.massv_config.vision_feature_dim)
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
