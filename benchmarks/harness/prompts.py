"""Benchmark prompts: :class:`PromptItem`, read from the testbed or a LLaVA JSON file, then
rendered with the target's chat template (:func:`render_prompts`) into what vLLM's engine takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.testbed import task


@dataclass
class PromptItem:
    """One request: ``inputs`` is what vLLM's ``generate`` accepts; ``kind`` groups results."""

    id: str
    kind: str
    inputs: dict[str, Any]
    has_image: bool


def testbed_prompts(data_dir: Path, n: int, split: str = "test") -> list[PromptItem]:
    """The first ``n`` samples of a testbed split (``benchmarks/testbed/task.py`` output)."""
    samples = task.load_split(data_dir, split)[:n]
    if not samples:
        raise ValueError(f"{data_dir} has no {split!r} samples (build it with "
                         "benchmarks/testbed/task.py)")
    return [_chat_item(s.id, s.kind, task.messages(s), task.render(s.scene) if s.has_image
                       else None) for s in samples]


def llava_prompts(path: Path, n: int, image_root: Path | None = None) -> list[PromptItem]:
    """The first ``n`` usable entries of a LLaVA JSON file (kind: ``image`` or ``text``); entries
    with an unreadable image are skipped."""
    # lazy: the training package (and vllm_massv with it) loads only for LLaVA prompts
    from vllm_massv.training.data import load_image, read_llava_json

    items = []
    for rec in read_llava_json(path, image_root=image_root):
        if len(items) >= n:
            break
        images = [load_image(p) for p in rec.images]
        if any(im is None for im in images):
            continue
        items.append(_chat_item(rec.id, "image" if images else "text", rec.messages,
                                images or None))
    return items


def _chat_item(item_id: str, kind: str, messages: list[dict[str, Any]], image: Any) -> PromptItem:
    """``image``: one PIL image, a list of them (in prompt order), or None."""
    inputs: dict[str, Any] = {"messages": messages}
    if image is not None:
        inputs["image"] = image
    return PromptItem(item_id, kind, inputs, image is not None)


def render_prompts(items: list[PromptItem], tokenizer: Any) -> list[PromptItem]:
    """Apply the target's chat template: ``inputs`` becomes ``{"prompt", "multi_modal_data"}``."""
    out = []
    for it in items:
        prompt = tokenizer.apply_chat_template(it.inputs["messages"], tokenize=False,
                                               add_generation_prompt=True)
        inputs: dict[str, Any] = {"prompt": prompt}
        if "image" in it.inputs:
            inputs["multi_modal_data"] = {"image": it.inputs["image"]}
        out.append(PromptItem(it.id, it.kind, inputs, it.has_image))
    return out
