"""Token positions shared by serving and training: does a config use M-RoPE, 1-D rope
parameters, the target's M-RoPE positions of a sequence (Qwen2-VL), and 1-D absolute positions of
a flattened query batch.

A leaf module (torch only): the vLLM side and the transformers side both import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def has_mrope(hf_config: Any) -> bool:
    """True when a (text) config's rope parameters have an `mrope_section` (Qwen2-VL style
    M-RoPE). Reads `rope_parameters` (transformers >= 5) and `rope_scaling` (older configs), as
    attributes or, for a config object that keeps them only in `to_dict()`, from there."""
    for key in ("rope_parameters", "rope_scaling"):
        params = getattr(hf_config, key, None)
        if params is None and hasattr(hf_config, "to_dict"):
            params = hf_config.to_dict().get(key)
        if isinstance(params, dict) and params.get("mrope_section"):
            return True
    return False


def rope_parameters_1d(config: dict[str, Any]) -> dict[str, Any]:
    """A config dict's rope parameters without M-RoPE (`mrope_section`, `mrope_interleaved`
    dropped; default RoPE at its `rope_theta` when it has none): 1-D positions."""
    rope = dict(config.get("rope_parameters") or {})
    if not rope:
        rope = {"rope_type": "default", "rope_theta": config.get("rope_theta", 10000.0)}
    rope.pop("mrope_section", None)
    rope.pop("mrope_interleaved", None)
    return rope


def mrope_positions(input_ids: Sequence[int], image_token_id: int,
                    grids: Sequence[tuple[int, int, int]]) -> torch.Tensor:
    """Qwen2-VL M-RoPE positions of one token sequence, as the target computes them.

    Text tokens get (p, p, p) with p counting on from the previous maximum + 1; the n-th run of
    `t*h*w` image placeholders gets (s + t_i, s + h_i, s + w_i) for its `grids[n] = (t, h, w)`
    (in merged-token units; images have t = 1), s being the next free position. Source: vLLM
    `models/qwen2_5_vl.py::get_mrope_input_positions`, transformers `get_rope_index`.

    Args:
        input_ids: the sequence (prompt + response), image placeholders expanded.
        image_token_id: the `<|image_pad|>` id.
        grids: one (t, h, w) per image, in order.
    Returns:
        [3, len(input_ids)] int64.
    Raises:
        ValueError: the placeholder runs do not match `grids`.
    """
    ids = list(input_ids)
    out = torch.empty(3, len(ids), dtype=torch.long)
    i = nxt = 0
    grid_iter = iter(grids)
    while i < len(ids):
        if ids[i] != image_token_id:
            out[:, i] = nxt
            i, nxt = i + 1, nxt + 1
            continue
        try:
            t, h, w = next(grid_iter)
        except StopIteration:
            raise ValueError("more image placeholder runs than image grids") from None
        n = t * h * w
        if ids[i:i + n] != [image_token_id] * n:
            raise ValueError(f"image placeholder run at {i} is shorter than its grid {(t, h, w)}")
        idx = torch.arange(n)
        out[0, i:i + n] = nxt + idx // (h * w)
        out[1, i:i + n] = nxt + (idx // w) % h
        out[2, i:i + n] = nxt + idx % w
        nxt = int(out[:, i:i + n].max()) + 1
        i += n
    if next(grid_iter, None) is not None:
        raise ValueError("more image grids than image placeholder runs")
    return out


def absolute_positions(query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                       num_tokens: int) -> torch.Tensor:
    """1-D absolute positions of a flattened query batch.

    Args:
        query_start_loc: [batch + 1] int32, cumulative query lengths (device).
        seq_lens: [batch] int32, tokens per request including this query (device).
        num_tokens: total query tokens (query_start_loc[-1]).
    Returns:
        [num_tokens] int64: token i of request r at `seq_lens[r] - q_len[r] + (i - qsl[r])`.
    """
    qsl = query_start_loc.long()
    q_lens = qsl[1:] - qsl[:-1]
    batch = q_lens.shape[0]
    req = torch.repeat_interleave(torch.arange(batch, device=qsl.device), q_lens,
                                  output_size=num_tokens)
    start = seq_lens[:batch].long() - q_lens
    return torch.arange(num_tokens, device=qsl.device) - qsl[req] + start[req]
