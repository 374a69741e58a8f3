"""Shared fixtures: tiny local models (built once per session) and vLLM engine helpers.

Engine settings come from ONE place, the test profile (`PROFILE`, `ENGINE_ARGS`, `cli_flags`):

* `cpu` (default without CUDA): fp32, eager; vLLM forces async scheduling off on CPU.
* `gpu` (`MASSV_TEST_PROFILE=gpu`, or CUDA detected): bf16, compiled with CUDA graphs, async
  scheduling at vLLM's default (on) -- the path a GPU user serves. The prompt-logprob parity
  helper (fp32 vLLM vs fp32 transformers) pins `FP32`; the replay tests (exact per-step
  acceptance vs a transformers drafter) run at the profile's dtype and have only run on `cpu`.

All engines use small chunks (`max_num_batched_tokens=64`, so long prompts and images are split
across prefill chunks) and 32-token KV blocks (so prefix caching hits at block granularity). Each
test module starts at most a few engines; an engine start costs 25-60 s on a 2-core CPU.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")

from vllm_massv import testing as mt  # noqa: E402
from vllm_massv.init_drafter import init_drafter  # noqa: E402

PROFILES: dict[str, dict[str, Any]] = {
    "cpu": dict(dtype="float32", enforce_eager=True),
    "gpu": dict(dtype="bfloat16", enforce_eager=False),
}


def _profile() -> str:
    name = os.environ.get("MASSV_TEST_PROFILE", "").strip().lower()
    if not name:
        return "gpu" if torch.cuda.is_available() else "cpu"
    if name not in PROFILES:
        raise pytest.UsageError(f"MASSV_TEST_PROFILE={name!r}: use one of {sorted(PROFILES)}")
    return name


PROFILE = _profile()
ENGINE_ARGS: dict[str, Any] = dict(
    **PROFILES[PROFILE], max_model_len=2048, max_num_seqs=4, block_size=32,
    max_num_batched_tokens=64, limit_mm_per_prompt={"image": 2, "video": 0}, seed=0,
    disable_log_stats=False, enable_prefix_caching=True,
)
FP32: dict[str, Any] = {"dtype": "float32"}


def cli_flags(**overrides: Any) -> list[str]:
    """The profile's dtype / eager settings as `vllm serve` / `massv generate` flags."""
    args = {**PROFILES[PROFILE], **overrides}
    return ["--dtype", args["dtype"], *(["--enforce-eager"] if args["enforce_eager"] else [])]


def pytest_report_header(config) -> str:
    return f"massv test profile: {PROFILE} ({PROFILES[PROFILE]})"
MAX_TOKENS = 24


@dataclass(frozen=True)
class TinyModels:
    target: Path          # Qwen2.5-VL target (random weights)
    text_lm: Path         # small Qwen2 text LM ("blind" base LM)
    sanity: Path          # target's own LM + identity projector, M-RoPE positions
    sanity_1d: Path       # same, 1-D positions
    sanity_zeroed: Path   # target's own LM, M-RoPE, projector outputs zeros (image features zeroed)
    blind: Path           # text LM + random mlp2x_gelu projector, 1-D positions
    stock: Path           # target's LM as a plain Qwen2ForCausalLM (stock vLLM draft_model)


def _zero_projector(src: Path, dst: Path) -> Path:
    """Copy a `linear`-projector drafter with its projector weights zeroed."""
    init_drafter(src, src, dst, projector="linear")
    state = load_file(dst / "model.safetensors")
    for k in state:
        if k.startswith("mm_projector."):
            state[k].zero_()
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    root = tmp_path_factory.mktemp("models")
    target = mt.build_target(root / "target")
    text_lm = mt.build_text_lm(root / "text_lm")
    sanity = init_drafter(target, target, root / "sanity", projector="identity").out_dir
    sanity_1d = init_drafter(target, target, root / "sanity_1d", projector="identity",
                             positions="1d").out_dir
    blind = init_drafter(target, text_lm, root / "blind", projector="mlp2x_gelu").out_dir
    return TinyModels(target, text_lm, sanity, sanity_1d,
                      _zero_projector(target, root / "sanity_zeroed"), blind,
                      mt.build_stock_drafter(target, root / "stock"))


def copy_model(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None] | None = None
               ) -> Path:
    """Copy a model directory; `edit` mutates its config.json dict in place."""
    shutil.copytree(src, dst)
    if edit is not None:
        cfg = json.loads((dst / "config.json").read_text())
        edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def spec_config(draft: Path, k: int) -> dict[str, Any]:
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
            llm.llm_engine.engine_core.shutdown()
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


IMAGE_PROMPTS = ("astronaut", "two_images", "mid_prompt", "gradient_long")


def greedy(max_tokens: int = MAX_TOKENS):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def generate(llm, prompts: dict[str, dict], params=None) -> dict[str, Any]:
    """name -> vLLM CompletionOutput, in the order given."""
    outs = llm.generate(list(prompts.values()), params or greedy(), use_tqdm=False)
    return {name: o for name, o in zip(prompts, outs)}


def token_ids(outputs: dict[str, Any]) -> dict[str, list[int]]:
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
    """vLLM's global spec-decode counters (cumulative; take differences)."""
    out = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            out[m.name] = list(m.values) if hasattr(m, "values") else m.value
    return out


@pytest.fixture(scope="session")
def reference(models: TinyModels) -> dict[str, list[int]]:
    """Greedy token ids of the target alone (no speculation) on the mixed batch."""
    with engine(models.target) as llm:
        return token_ids(generate(llm, mixed_batch(models.target)))


def replay(drafter, prompt_ids, output_ids, image_embeds, drafted_per_step,
           proposals_out: list | None = None) -> list[int]:
    """Accepted draft count per verify step of greedy speculative decoding, simulated with a
    transformers drafter (`vllm_massv.hf`) along the target's output: what vLLM's per-request
    `spec_decode_metrics.per_step_accepted` must equal. `proposals_out` gets each step's draft
    token ids."""
    accepted, m = [], 1  # the prefill step samples the first output token
    for drafted in drafted_per_step:
        ctx = list(prompt_ids) + list(output_ids[:m])
        proposals = []
        for _ in range(drafted):
            ids = torch.tensor([ctx + proposals])
            # image positions are the prompt's placeholders only (generated text may contain the
            # placeholder token id; vLLM does not treat it as an image position either)
            mask = (ids == drafter.massv_config.image_token_id)
            mask[:, len(prompt_ids):] = False
            with torch.no_grad():
                logits = drafter(input_ids=ids, image_embeds=image_embeds, image_mask=mask).logits
            proposals.append(int(logits[0, -1].argmax()))
        if proposals_out is not None:
            proposals_out.append(proposals)
        a = 0
        while a < drafted and m + a < len(output_ids) and proposals[a] == output_ids[m + a]:
            a += 1
        accepted.append(a)
        m += a + 1
    return accepted


def assert_replay_equal(target: Path, drafter_dir: Path, outputs: dict[str, Any],
                        prompts: dict[str, dict], drafts: dict[str, list] | None = None
                        ) -> tuple[int, int]:
    """Every request's per-step accepted counts (vLLM) equal the transformers replay of its
    drafter (`replay`, image features from the transformers vision tower), fp32 eager: what a
    TP = 1 eager engine gives (tests/test_reference_1d.py); with `drafts` (request name -> the
    draft ids vLLM proposed per verify step, empty where k = 0) also every draft token, and the
    steps without drafts that vLLM's per-request metrics leave out are put back from it.
    Returns (verify steps, accepted drafts) over all requests; tau = 1 + accepted / steps."""
    from transformers import AutoProcessor

    from vllm_massv.hf import drafter_class
    from vllm_massv.training.features import TargetImageEncoder

    processor = AutoProcessor.from_pretrained(target)
    encoder = TargetImageEncoder(target)
    drafter = drafter_class(drafter_dir).from_pretrained(drafter_dir, dtype=torch.float32).eval()
    total_steps = total_accepted = 0
    for name, prompt in prompts.items():
        images = prompt.get("multi_modal_data", {}).get("image")
        images = [images] if images is not None and not isinstance(images, list) else images
        inputs = processor(text=[prompt["prompt"]], images=images, return_tensors="pt")
        out = outputs[name]
        assert inputs["input_ids"][0].tolist() == list(out.prompt_token_ids), name
        embeds = encoder.encode(images) if images else None
        metrics, tokens = out.outputs[0].spec_decode_metrics, list(out.outputs[0].token_ids)
        drafted, accepted = list(metrics.per_step_drafted), list(metrics.per_step_accepted)
        if drafts is not None:
            assert [len(row) for row in drafts[name] if row] == drafted, name
            vllm_accepted = iter(accepted)
            drafted = [len(row) for row in drafts[name]]
            accepted = [next(vllm_accepted) if d else 0 for d in drafted]
        proposals: list = []
        expected = replay(drafter, out.prompt_token_ids, tokens, embeds, drafted, proposals)
        assert emitted_accepted(accepted, len(tokens)) == expected, name
        if drafts is not None:
            assert drafts[name] == proposals, name
        total_steps += len(expected)
        total_accepted += sum(expected)
    return total_steps, total_accepted


def check_engine_mode(label: str, models: "TinyModels", drafter_dir: Path, outputs: dict[str, Any],
                      mode_reference: dict[str, list[int]], reference: dict[str, list[int]]
                      ) -> None:
    """A MASSV engine in a non-default mode (TP = 2, compiled) on the mixed batch: lossless
    against the target alone *in the same mode* (the mode's own numerics may flip a near-tie of
    the target's argmax against TP = 1 eager, with or without speculation), and every verify
    step accepts what the transformers replay accepts (:func:`assert_replay_equal`), i.e. the
    same tau as the TP = 1 eager engine."""
    assert token_ids(outputs) == mode_reference
    same = [n for n in reference if reference[n] == mode_reference[n]]
    print(f"{label} target alone vs TP=1 eager target alone: {len(same)}/{len(reference)} "
          "outputs identical")
    steps, accepted = assert_replay_equal(models.target, drafter_dir, outputs,
                                          mixed_batch(models.target))
    print(f"{label}: {accepted} accepted over {steps} verify steps, "
          f"tau {1 + accepted / steps:.3f}, every step equal to the TP=1 eager replay")
    assert accepted > 0


def emitted_accepted(per_step_accepted: list[int], num_output_tokens: int) -> list[int]:
    """vLLM's per-step accepted counts, clipped to the tokens the request emitted: a step can
    accept drafts past `max_tokens` (they are verified, then cut), which a replay along the
    emitted output cannot see."""
    out, m = [], 1
    for a in per_step_accepted:
        out.append(min(a, max(num_output_tokens - m, 0)))
        m += a + 1
    return out


def prompt_logprobs_vs_transformers(drafter_dir: Path, prompt: str, top: int = 5):
    """Serve a MASSV drafter as a plain text model with prompt logprobs and compare them with its
    transformers twin (`vllm_massv.hf`), fp32. Returns (the vLLM output, the largest
    |vLLM - transformers| logprob over vLLM's top-`top` entries of every position)."""
    import tempfile

    from vllm import SamplingParams

    from vllm_massv.hf import drafter_class
    from vllm_massv.speculators import SPECULATORS_KEYS

    with tempfile.TemporaryDirectory() as tmp:
        # without its speculators block: vLLM would serve the drafter's verifier instead
        plain = copy_model(drafter_dir, Path(tmp) / "drafter",
                           lambda c: [c.pop(k, None) for k in SPECULATORS_KEYS])
        with engine(plain, max_model_len=512, limit_mm_per_prompt=None, **FP32) as llm:
            out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=top),
                               use_tqdm=False)[0]
    ids = list(out.prompt_token_ids)
    drafter = drafter_class(drafter_dir).from_pretrained(drafter_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(drafter(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    worst = max(abs(lp.logprob - logp[i - 1, token].item())
                for i in range(1, len(ids)) for token, lp in out.prompt_logprobs[i].items())
    return out, worst
