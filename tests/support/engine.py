"""vLLM engine helpers for the tests: an `LLM` on a tiny model with the test profile, the mixed
prompt batch, greedy generation and the spec-decode numbers read from its outputs.

vLLM is imported inside the helpers that start or configure an engine, so that engine-free test
modules importing this one collect without loading it.
"""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path
from typing import Any

from benchmarks.harness.engine import shutdown
from benchmarks.harness.metrics import engine_metrics
from tests.support.profile import ENGINE_ARGS
from vllm_massv import testing as mt

MAX_TOKENS = 24
#: The names of `mixed_batch`'s prompts that hold images.
IMAGE_PROMPTS = ("astronaut", "two_images", "mid_prompt", "gradient_long")


def spec_config(draft: Path, k: int) -> dict[str, Any]:
    """A `draft_model` speculative config for `draft` with `k` speculative tokens."""
    return {"method": "draft_model", "model": str(draft), "num_speculative_tokens": k}


@contextlib.contextmanager
def engine(target: Path, speculative_config: dict | None = None, env: dict | None = None,
           **overrides: Any):
    """A vLLM `LLM` on the tiny target; shut down (worker processes included) on exit."""
    from vllm import LLM

    llm = None
    try:
        with mt.scoped_env(env or {}):
            if speculative_config is not None:
                overrides.setdefault("per_request_spec_decode_metrics", "detailed")
            llm = LLM(model=str(target), speculative_config=speculative_config,
                      **{**ENGINE_ARGS, **overrides})
            yield llm
    finally:
        if llm is not None:
            shutdown(llm)
            del llm
        gc.collect()


def mixed_batch(target: Path) -> dict[str, dict[str, Any]]:
    """The lossless-test batch: text-only, 1 image, 2 images, image mid-prompt, different sizes
    (incl. real photos from skimage.data), a prompt long enough to be chunked."""
    imgs = mt.sample_images()
    long_text = " ".join(["Describe every colour and shape you can see, then count them."] * 12)
    return {
        "text": {"prompt": mt.text_prompt(target, "Count from one to ten, please.")},
        "astronaut": {"prompt": mt.image_prompt(target, "Describe this image."),
                      "multi_modal_data": {"image": imgs["astronaut"]}},
        "two_images": {"prompt": mt.image_prompt(target, "Compare the two images.", num_images=2),
                       "multi_modal_data": {"image": [imgs["red"], imgs["noise"]]}},
        "mid_prompt": {"prompt": mt.image_prompt(target, "What animal is in this photo?",
                                                 image_first=False),
                       "multi_modal_data": {"image": imgs["chelsea"]}},
        "gradient_long": {"prompt": mt.image_prompt(target, long_text),
                          "multi_modal_data": {"image": imgs["gradient"]}},
    }


def prompt_images(prompt: dict[str, Any]) -> list:
    """The images of a vLLM prompt dict as a list (empty for a text-only prompt)."""
    images = prompt.get("multi_modal_data", {}).get("image")
    return [] if images is None else (images if isinstance(images, list) else [images])


def greedy(max_tokens: int = MAX_TOKENS):
    """Greedy `SamplingParams` for `max_tokens` tokens, EOS ignored."""
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def generate(llm, prompts: dict[str, dict], params=None) -> dict[str, Any]:
    """name -> vLLM CompletionOutput, in the order given."""
    outs = llm.generate(list(prompts.values()), params or greedy(), use_tqdm=False)
    return {name: o for name, o in zip(prompts, outs)}


def token_ids(outputs: dict[str, Any]) -> dict[str, list[int]]:
    """name -> the output token ids."""
    return {n: list(o.outputs[0].token_ids) for n, o in outputs.items()}


def acceptance(outputs: dict[str, Any], names=None) -> float:
    """Accepted / drafted tokens over the named requests (vLLM per-request spec metrics)."""
    acc = drafted = 0
    for n in names or outputs:
        m = outputs[n].outputs[0].spec_decode_metrics
        acc += sum(m.per_step_accepted)
        drafted += sum(m.per_step_drafted)
    return acc / drafted if drafted else 0.0


def spec_counters(llm) -> dict[str, Any]:
    """vLLM's global spec-decode counters (cumulative; take differences): the repository's
    reader, `benchmarks.harness.metrics.engine_metrics`."""
    return engine_metrics(llm)


def first_draft_acceptance(outputs: dict[str, Any], temperature: float, max_tokens: int,
                           vocab: int) -> tuple[float, float, int]:
    """At temperature T > 0 a greedy draft d is accepted with probability p_T(d). For a drafter
    whose first draft of a verify step is the target's argmax at the next output position (the
    target's own LM with the target's positions), the share of steps that accept it must match
    the mean of max_x p_T(x) at those positions, computed from the target's full raw logprobs
    (p_T = softmax(logprob / T); the requests need `logprobs=-1`).

    Returns:
        (share of verify steps whose first draft was accepted, mean max_x p_T(x), steps).
    Raises:
        AssertionError: a request stopped early, emitted an id outside `vocab`, or drafted
            nothing.
    """
    import torch

    expected, first_accepted = [], []
    for name, out in outputs.items():
        ids = list(out.outputs[0].token_ids)
        assert len(ids) == max_tokens or out.outputs[0].finish_reason == "stop", name
        assert all(0 <= t < vocab for t in ids), name
        metrics = out.outputs[0].spec_decode_metrics
        assert metrics.num_draft_tokens > 0, name
        m = 1  # tokens emitted before the step (the prefill emits one)
        for accepted in metrics.per_step_accepted:
            if m >= len(ids):
                break
            lp = torch.tensor([x.logprob for x in out.outputs[0].logprobs[m].values()])
            expected.append(torch.softmax(lp / temperature, -1).max().item())
            first_accepted.append(float(accepted >= 1))
            m += accepted + 1
    n = len(expected)
    return sum(first_accepted) / n, sum(expected) / n, n
