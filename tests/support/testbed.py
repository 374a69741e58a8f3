"""The checked-in CPU testbed (`benchmarks/testbed/`) for the tests: its models and held-out
questions."""

from __future__ import annotations

from pathlib import Path

from benchmarks.harness import prompts as bench_prompts
from benchmarks.testbed import assets, task
from tests.support.engine import prompt_images

TARGET = assets.MODELS / "target"
QWEN3_VL_MODELS = assets.QWEN3_VL_MODELS


def held_out_prompts(data_dir: Path, n: int, target: Path = TARGET) -> dict[str, dict]:
    """The first `n` test-split questions (scenes never seen in training; image and text) as vLLM
    prompts rendered with `target`'s chat template, by "<id>:<kind>"."""
    from transformers import AutoTokenizer

    task.build_splits(data_dir, seed=0, **assets.TEST_SPLIT)
    items = bench_prompts.render_prompts(bench_prompts.testbed_prompts(data_dir, n),
                                         AutoTokenizer.from_pretrained(target))
    return {f"{i.id}:{i.kind}": i.inputs for i in items}


def image_tau(outputs: dict, prompts: dict, eos: set[int]) -> tuple[float, float]:
    """tau (1 + accepted / verify steps, vLLM's convention) over the image questions: over the
    answers (the verify steps that start at or before the answer's first EOS token: what a
    request that stops at EOS sees) and over all generated tokens (the tests generate past EOS,
    where the trained target continues out of distribution)."""
    answer = [0, 0]
    whole = [0, 0]
    for name, out in outputs.items():
        if not prompt_images(prompts[name]):
            continue
        tokens = list(out.outputs[0].token_ids)
        end = next((i for i, t in enumerate(tokens) if t in eos), len(tokens))
        m = 1
        for a in out.outputs[0].spec_decode_metrics.per_step_accepted:
            if m <= end:
                answer[0], answer[1] = answer[0] + a, answer[1] + 1
            whole[0], whole[1] = whole[0] + a, whole[1] + 1
            m += a + 1
    return 1 + answer[0] / answer[1], 1 + whole[0] / whole[1]


def image_tau_vs_text_only(massv: dict, text_only: dict, prompts: dict, target: Path,
                           text_only_dir: Path) -> tuple[tuple[float, float], tuple[float, float]]:
    """:func:`image_tau` of a MASSV run and of its text-only control's run on the same prompts,
    ((answers, all tokens) each), after checking that the control sees no image."""
    import json

    cfg = json.loads((text_only_dir / "config.json").read_text())
    assert cfg["massv"]["projector"] == "none"  # the control sees no image
    eos = eos_ids(target)
    return image_tau(massv, prompts, eos), image_tau(text_only, prompts, eos)


def eos_ids(target: Path) -> set[int]:
    """The target's EOS token ids (generation_config.json)."""
    from transformers import GenerationConfig

    eos = GenerationConfig.from_pretrained(target).eos_token_id
    return set(eos if isinstance(eos, list) else [eos])
