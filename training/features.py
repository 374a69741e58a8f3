"""Target image embeddings for training, exactly as vLLM feeds them to the drafter at serving time.

What vLLM caches per image (the drafter's projector input):

* Qwen2(.5)-VL: the vision tower's output *after the patch merger* (vLLM
  `models/qwen2_5_vl.py::embed_multimodal`): [n_tokens, out_hidden_size],
  n_tokens = grid_t * grid_h * grid_w / spatial_merge_size**2, one row per `<|image_pad|>`.
* Qwen3-VL: the main (post-merger) embedding followed by the L DeepStack levels, one
  `out_hidden_size` block each (vLLM `models/qwen3_vl.py::Qwen3_VisionTransformer.forward`,
  `torch.cat([hidden_states] + deepstack_feature_lists, dim=1)`): [n_tokens,
  out_hidden_size * (1 + L)]. A drafter's `massv.feature_tap` picks the columns it reads.
* Gemma3: SigLIP's last hidden state (post-layernorm) through the VLM's
  `Gemma3MultiModalProjector` (avg-pool to `mm_tokens_per_image`, RMSNorm, projection to the
  text width; vLLM `models/gemma3_mm.py::_process_image_input`): [mm_tokens_per_image,
  text hidden_size], one row per `<image_soft_token>`. Pan-and-scan is not supported.

:class:`TargetImageEncoder` computes the same with transformers, loading only the vision-side
weights from the target checkpoint, and can cache results on disk for repeated epochs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from vllm_massv.drafters.massv.config import MassvConfigError, deepstack_levels
from vllm_massv.drafters.massv.init import FAMILIES, drafter_family
from vllm_massv.rope import mrope_positions
from vllm_massv.training.data import load_image

_VISION_PREFIXES = ("model.visual.", "visual.")
# Gemma3 checkpoint layouts: transformers >= 4.52 (`model.vision_tower.`) and the hub's
# (`vision_tower.`); SigLIP's own weights may sit under a further `vision_model.`.
_GEMMA3_PREFIXES = {"model.vision_tower.vision_model.": "vision_tower.",
                    "vision_tower.vision_model.": "vision_tower.",
                    "model.vision_tower.": "vision_tower.", "vision_tower.": "vision_tower.",
                    "model.multi_modal_projector.": "projector.",
                    "multi_modal_projector.": "projector."}


class TargetImageEncoder:
    """The frozen vision side of a target: Qwen2-VL / Qwen2.5-VL vision tower (+ merger), or
    Gemma3's SigLIP tower + multimodal projector.

    Args:
        target: target checkpoint directory (config, image processor, safetensors).
        dtype: compute dtype (use the serving dtype for exact parity).
        cache_dir: optional directory of cached embeddings, keyed by image bytes + processor
            settings + target.
    Raises:
        ValueError: an unsupported target type (`MassvConfigError`), no vision weights, or a
            Gemma3 image processor with pan-and-scan on.
    """

    def __init__(self, target: str | Path, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", cache_dir: str | Path | None = None) -> None:
        from transformers import AutoConfig, AutoImageProcessor

        self.target = Path(target)
        config = AutoConfig.from_pretrained(self.target)
        gemma3 = drafter_family(config) is FAMILIES["gemma3"]  # raises for other targets
        self.image_processor = AutoImageProcessor.from_pretrained(self.target)
        self._levels = 0
        if gemma3:
            if getattr(self.image_processor, "do_pan_and_scan", None):
                raise ValueError(f"{self.target}: the image processor has do_pan_and_scan on; "
                                 "training features for pan-and-scan crops are not supported")
            self.visual = Gemma3ImageFeatures.from_target(self.target, config, dtype)
            self._feature_dim = int(config.text_config.hidden_size)
        else:
            self.visual = _load_vision_tower(self.target, config, dtype)
            self._levels = deepstack_levels(config)
            self._feature_dim = int(self.visual.config.out_hidden_size) * (1 + self._levels)
        self.visual = self.visual.to(device).eval()
        self.dtype, self.device = dtype, torch.device(device)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if self.cache_dir:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        salt = [str(self.target.resolve()), str(dtype), self.image_processor.to_dict()]
        if self._levels:
            salt.append(f"deepstack-levels:{self._levels}")   # full cached rows since issue 24
        self._cache_salt = hashlib.sha256(json.dumps(
            salt, sort_keys=True, default=str).encode()).hexdigest()

    @property
    def feature_dim(self) -> int:
        """Width of the embeddings vLLM caches per image token (for Qwen3-VL the main block plus
        the DeepStack levels; the drafter reads the columns its `massv.feature_tap` names)."""
        return self._feature_dim

    @torch.no_grad()
    def encode(self, images: list) -> torch.Tensor:
        """Embeddings of `images` (PIL, RGB) in order: [sum_i n_tokens_i, feature_dim], CPU."""
        if not images:
            return torch.zeros(0, self.feature_dim, dtype=self.dtype)
        keys = [self._key(im) for im in images] if self.cache_dir else [None] * len(images)
        out: list[torch.Tensor | None] = [self._load(k) for k in keys]
        todo = [i for i, t in enumerate(out) if t is None]
        if todo:
            inputs = self.image_processor(images=[images[i] for i in todo], return_tensors="pt")
            pixels = inputs["pixel_values"].to(self.device, self.dtype)
            if isinstance(self.visual, Gemma3ImageFeatures):
                feats = self.visual(pixels)                       # [n, tokens, dim]
                sizes = [feats.shape[1]] * feats.shape[0]
                feats = feats.flatten(0, 1)
            else:
                grid = inputs["image_grid_thw"]
                output = self.visual(pixels, grid_thw=grid.to(self.device))
                feats = output.pooler_output
                if self._levels:   # Qwen3-VL: vLLM's cached row, main block then the levels
                    feats = torch.cat([feats, *output.deepstack_features], dim=-1)
                sizes = (grid.prod(-1) // self.visual.spatial_merge_size ** 2).tolist()
            for i, f in zip(todo, torch.split(feats.cpu(), sizes)):
                out[i] = f
                if keys[i]:
                    torch.save(f.clone(), self.cache_dir / f"{keys[i]}.pt")
        return torch.cat(out)  # type: ignore[arg-type]

    def grid(self, image) -> tuple[int, int, int]:
        """Qwen2-VL targets only: (t, h, w) of `image`'s embedding grid in merged-token units (t = 1 for an image), as
        the image processor resizes it (`smart_resize`, vLLM and transformers alike); the
        image gets t*h*w `<|image_pad|>` tokens."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        proc = self.image_processor
        size = proc.size
        min_px = getattr(size, "shortest_edge", None) or getattr(proc, "min_pixels", None)
        max_px = getattr(size, "longest_edge", None) or getattr(proc, "max_pixels", None)
        factor = proc.patch_size * proc.merge_size
        h, w = smart_resize(image.height, image.width, factor=factor, min_pixels=min_px,
                            max_pixels=max_px)
        return (1, h // factor, w // factor)

    def _key(self, image) -> str:
        h = hashlib.sha256(self._cache_salt.encode())
        h.update(f"{image.size}{image.mode}".encode())
        h.update(image.tobytes())
        return h.hexdigest()[:32]

    def _load(self, key: str | None) -> torch.Tensor | None:
        if key is None:
            return None
        path = self.cache_dir / f"{key}.pt"  # type: ignore[operator]
        return torch.load(path) if path.is_file() else None


def _load_vision_tower(target: Path, config, dtype: torch.dtype) -> torch.nn.Module:
    """Build the vision tower from the target's config and load only its weights."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel)

    if config.model_type == "qwen2_vl":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import (
            Qwen2VisionTransformerPretrainedModel as VisionModel)
    elif config.model_type == "qwen3_vl":
        # `pooler_output` is the main (post-merger) embedding, `deepstack_features` the levels
        from transformers.models.qwen3_vl.modeling_qwen3_vl import (
            Qwen3VLVisionModel as VisionModel)
    else:
        VisionModel = Qwen2_5_VisionTransformerPretrainedModel
    visual = VisionModel._from_config(config.vision_config, dtype=dtype)
    state = {}
    for file in sorted(target.glob("*.safetensors")):
        with safe_open(file, framework="pt") as fh:
            for name in fh.keys():
                for prefix in _VISION_PREFIXES:
                    if name.startswith(prefix):
                        state[name[len(prefix):]] = fh.get_tensor(name).to(dtype)
    if not state:
        raise ValueError(f"{target}: no vision tower weights (model.visual.* / visual.*)")
    visual.load_state_dict(state, strict=True)
    return visual


class Gemma3ImageFeatures(torch.nn.Module):
    """Gemma3's image path up to the embeddings vLLM caches: SigLIP (`vision_use_head=False`,
    last hidden state incl. post-layernorm) and `Gemma3MultiModalProjector`.

    forward: pixel_values [n, 3, image_size, image_size] -> [n, mm_tokens_per_image,
    text hidden_size] (transformers `Gemma3Model.get_image_features`).
    """

    def __init__(self, config) -> None:
        super().__init__()
        from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector
        from transformers.models.siglip.modeling_siglip import SiglipVisionModel

        self.vision_tower = SiglipVisionModel._from_config(config.vision_config)
        self.projector = Gemma3MultiModalProjector(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projector(self.vision_tower(pixel_values=pixel_values).last_hidden_state)

    @classmethod
    def from_target(cls, target: Path, config, dtype: torch.dtype) -> "Gemma3ImageFeatures":
        """Build from the target's config and load only the vision tower and projector weights.

        Raises:
            ValueError: the checkpoint lacks some of them.
        """
        module = cls(config).to(dtype)
        state = {}
        for file in sorted(target.glob("*.safetensors")):
            with safe_open(file, framework="pt") as fh:
                for name in fh.keys():
                    prefix = next((p for p in _GEMMA3_PREFIXES if name.startswith(p)), None)
                    if prefix is not None:
                        state[_GEMMA3_PREFIXES[prefix] + name[len(prefix):]] = \
                            fh.get_tensor(name).to(dtype)
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{target}: Gemma3 vision weights do not match the config "
                             f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
        return module


#: `TargetHiddenStates` layer selector for the last layer's output after the final norm (the
#: target's LM-head input; EAGLE-1 / MSD features). Integers select a decoder layer's raw output.
FINAL = "final"


class TargetHiddenStates:
    """Frozen forward of a Qwen2-VL / Qwen2.5-VL target *with its images*: the hidden states an
    EAGLE-style drafter (MSD) trains on, and the post-merger image embeddings vLLM hands it.

    The target's language model runs on its input embeddings with the image embeddings written at
    the `<|image_pad|>` positions and the target's own M-RoPE positions over the prompt (text after
    the prompt continues them), exactly as transformers' `Qwen2_5_VLForConditionalGeneration`
    with `pixel_values` and `image_grid_thw` does (and as vLLM serves it). MSD's released Qwen2-VL
    data script runs this forward without `pixel_values`; here the image is always seen. Image
    embeddings come from a :class:`TargetImageEncoder` (same loading, same on-disk cache); with
    `cache_dir`, the hidden states of each sequence are cached too (keyed by target, dtype,
    layers, token ids and image bytes).

    Args:
        target: target checkpoint directory.
        layers: which hidden states to return, in order: :data:`FINAL` (post-final-norm last
            layer, the default) or a decoder-layer index i (0-based, that layer's raw output;
            EAGLE-3 style auxiliary states).
        dtype, device: compute dtype/device of the frozen target.
        cache_dir: optional feature cache directory (shared with the image encoder's).
    Attributes:
        embed_tokens: the target's token embedding (`nn.Embedding`, frozen).
        lm_head: the target's LM head (`nn.Linear`, frozen).
    Raises:
        MassvConfigError: a target that is not Qwen2-VL / Qwen2.5-VL.
    """

    def __init__(self, target: str | Path, *, layers: tuple[int | str, ...] = (FINAL,),
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 cache_dir: str | Path | None = None) -> None:
        from transformers import AutoConfig, AutoModelForImageTextToText

        self.target = Path(target)
        config = AutoConfig.from_pretrained(self.target)
        if config.model_type not in ("qwen2_vl", "qwen2_5_vl"):
            raise MassvConfigError(f"{self.target}: target hidden states need a Qwen2-VL / "
                                   f"Qwen2.5-VL target, not {config.model_type!r}")
        self.config = config
        self.layers = tuple(layers)
        model = AutoModelForImageTextToText.from_pretrained(self.target, dtype=dtype)
        model.model.visual = None   # image embeddings come from the shared encoder (and cache)
        self.language_model = model.model.language_model.to(device).eval().requires_grad_(False)
        self.lm_head = model.lm_head.to(device).eval().requires_grad_(False)
        self.embed_tokens = self.language_model.embed_tokens
        n = len(self.language_model.layers)
        for layer in self.layers:
            if layer != FINAL and not (isinstance(layer, int) and 0 <= layer < n):
                raise ValueError(f"layers: {layer!r} is neither {FINAL!r} nor in [0, {n})")
        self.encoder = TargetImageEncoder(self.target, dtype=dtype, device=device,
                                          cache_dir=cache_dir)
        self.image_token_id = int(config.image_token_id)
        self.dtype, self.device = dtype, torch.device(device)
        self.cache_dir = self.encoder.cache_dir
        self._salt = hashlib.sha256(
            f"{self.encoder._cache_salt}:{self.layers}".encode()).hexdigest()

    @property
    def hidden_size(self) -> int:
        return int(self.config.get_text_config().hidden_size)

    @torch.no_grad()
    def __call__(self, sequences: list[list[int]], images: list[list], prompt_lens: list[int]
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Hidden states and image embeddings of each sequence.

        Args:
            sequences: token ids (prompt + response), image placeholders expanded.
            images: per sequence, its PIL images in placeholder order.
            prompt_lens: per sequence, the prompt length; image placeholders count only there
                (generated text never takes an image embedding).
        Returns:
            Per sequence `(hidden [len(layers), L, H], image_embeds [n_placeholders, H])`, CPU,
            in `dtype`.
        Raises:
            ValueError: placeholder counts that do not match the images.
        """
        keys = [self._key(s, im) for s, im in zip(sequences, images)] if self.cache_dir \
            else [None] * len(sequences)
        out: list = [self._load(k) for k in keys]
        todo = [i for i, o in enumerate(out) if o is None]
        if todo:
            for i, result in zip(todo, self._forward([sequences[i] for i in todo],
                                                     [images[i] for i in todo],
                                                     [prompt_lens[i] for i in todo])):
                out[i] = result
                if keys[i]:
                    torch.save(result, self.cache_dir / f"h-{keys[i]}.pt")  # type: ignore[operator]
        return out

    def for_examples(self, batch: list, max_pixels: int | None
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`__call__` on training examples (`examples.Example`: token ids, prompt length,
        image paths), their images loaded at `max_pixels`.

        Raises:
            ValueError: an image that can no longer be read (training data must stay readable
                once `massv generate` accepted it).
        """
        images = []
        for e in batch:
            own = [load_image(p, max_pixels) for p in e.images]
            if any(im is None for im in own):
                raise ValueError(f"{e.id}: an image is no longer readable")
            images.append(own)
        return self([e.input_ids for e in batch], images, [e.prompt_len for e in batch])

    def _forward(self, sequences, images, prompt_lens):
        width = max(len(s) for s in sequences)
        ids = torch.zeros(len(sequences), width, dtype=torch.long)
        attention = torch.zeros_like(ids)
        positions = torch.zeros(3, len(sequences), width, dtype=torch.long)
        image_mask = torch.zeros_like(ids, dtype=torch.bool)
        flat_images, counts = [], []
        for i, (seq, ims, p) in enumerate(zip(sequences, images, prompt_lens)):
            ids[i, : len(seq)] = torch.tensor(seq)
            attention[i, : len(seq)] = 1
            image_mask[i, :p] = ids[i, :p] == self.image_token_id
            counts.append(int(image_mask[i].sum()))
            prompt_pos = mrope_positions(seq[:p], self.image_token_id,
                                         [self.encoder.grid(im) for im in ims])
            start = int(prompt_pos.max()) + 1 if p else 0
            positions[:, i, :p] = prompt_pos
            positions[:, i, p:] = start + torch.arange(width - p)
            flat_images += ims
        embeds = self.embed_tokens(ids.to(self.device))
        image_embeds = self.encoder.encode(flat_images).to(self.device, embeds.dtype)
        if image_embeds.shape[0] != sum(counts):
            raise ValueError(f"{image_embeds.shape[0]} image embeddings for {sum(counts)} "
                             "image placeholders")
        if flat_images:
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1).to(self.device), image_embeds)
        captured: dict[int, torch.Tensor] = {}
        hooks = [self.language_model.layers[i].register_forward_hook(
            lambda _m, _a, o, i=i: captured.__setitem__(i, o[0] if isinstance(o, tuple) else o))
            for i in {layer for layer in self.layers if layer != FINAL}]
        try:
            final = self.language_model(inputs_embeds=embeds, attention_mask=attention.to(
                self.device), position_ids=positions.to(self.device), use_cache=False
            ).last_hidden_state
        finally:
            for h in hooks:
                h.remove()
        stacked = torch.stack([final if layer == FINAL else captured[layer]
                               for layer in self.layers], dim=1).cpu()   # [B, n, W, H]
        per_image = torch.split(image_embeds.cpu(), counts)
        return [(stacked[i, :, : len(seq)].clone(), per_image[i].clone())
                for i, seq in enumerate(sequences)]

    def _key(self, seq: list[int], images: list) -> str:
        h = hashlib.sha256(self._salt.encode())
        h.update(json.dumps(list(seq)).encode())
        for im in images:
            h.update(self.encoder._key(im).encode())
        return h.hexdigest()[:32]

    def _load(self, key: str | None):
        if key is None:
            return None
        path = self.cache_dir / f"h-{key}.pt"  # type: ignore[operator]
        return torch.load(path) if path.is_file() else None
