"""The checked-in CPU testbed (`benchmarks/testbed/`) for the tests: its models and held-out
questions."""

from __future__ import annotations

from pathlib import Path

from benchmarks.harness import prompts as bench_prompts
from benchmarks.testbed import assets, task

TARGET = assets.MODELS / "target"


def held_out_prompts(data_dir: Path, n: int) -> dict[str, dict]:
    """The first `n` test-split questions (scenes never seen in training; image and text) as vLLM
    prompts rendered with the target's chat template, by "<id>:<kind>"."""
    from transformers import AutoTokenizer

    task.build_splits(data_dir, seed=0, **assets.TEST_SPLIT)
    items = bench_prompts.render_prompts(bench_prompts.testbed_prompts(data_dir, n),
                                         AutoTokenizer.from_pretrained(TARGET))
    return {f"{i.id}:{i.kind}": i.inputs for i in items}
