"""Target image embeddings computed with transformers, exactly what vLLM caches and hands the
drafter at serving time: the Qwen2(.5)-VL vision tower *including the patch merger*
(vLLM `models/qwen2_5_vl.py::embed_multimodal`), one [n_tokens, out_hidden_size] row block per
image, where n_tokens = grid_t * grid_h * grid_w / spatial_merge_size**2.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def qwen_vl_image_embeds(target_model, pixel_values: torch.Tensor,
                         image_grid_thw: torch.Tensor) -> torch.Tensor:
    """Post-merger image embeddings of a transformers Qwen2-VL / Qwen2.5-VL model.

    Args:
        target_model: `Qwen2_5_VLForConditionalGeneration` (or its inner `.model`).
        pixel_values: [num_patches, C*T*P*P] from the target's image processor.
        image_grid_thw: [num_images, 3] int64.
    Returns:
        [sum_i n_tokens_i, out_hidden_size] in the vision tower's dtype, images in order.
    """
    inner = getattr(target_model, "model", target_model)
    visual = inner.visual
    out = inner.get_image_features(pixel_values.to(visual.dtype), image_grid_thw,
                                   return_dict=True)
    feats = out.pooler_output
    return torch.cat(list(feats), dim=0) if isinstance(feats, (list, tuple)) else feats
