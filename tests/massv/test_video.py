"""Video prompts (Qwen2.5-VL): lossless, and the drafter gets the video embeddings at the right
positions.

The tiny Qwen2.5-VL target takes videos as vLLM takes them: `multi_modal_data={"video": (frames
[T, H, W, 3] uint8, metadata)}` with fps in the metadata (`vllm_massv.testing.video_item`).
Every engine here overrides the test profile's `limit_mm_per_prompt` (video 0 elsewhere).

The batch (run concurrently: `max_num_seqs` 4 and a 64-token budget per step, so prompts are
cut into prefill chunks inside their videos): three video prompts -- a 4-frame video first, a
6-frame video mid-prompt (fps 1), two videos (5 + 4 frames, fps 4 and 2) -- a video and an
image in one prompt, an image prompt and a text prompt.

* The M-RoPE identity drafter (`models.sanity`: the target's own LM, identity projector, the
  target's M-RoPE positions) computes what the target computes when it gets the target's video
  embeddings at the video positions with the target's M-RoPE positions (time-scaled temporal
  index, `second_per_grid_ts` = 2 / fps): acceptance >= 0.99, as on images
  (`test_sanity_drafter.py`); measured on V1: 80 of 80 drafts on the video prompts, again on
  prefix-cache hits. Any misplaced embedding or position collapses acceptance
  (greedy output stays lossless either way). V1 only: Model Runner V2 refuses `positions: mrope`
  drafters before serving (`config.py::MRV2_MROPE_REFUSAL`, tested in `test_errors.py`).
* The 1-D identity drafter (`models.sanity_1d`) gets the same embeddings but 1-D positions, where
  the target has M-RoPE ones: after a video its positions disagree with the target's, so it is
  not the target there and accepts ~nothing (measured on both runners: 6 of 344 drafts on the
  video prompts, 1.1% on the image prompt, 100% on text; images alike, `test_reference_1d.py`).
  Acceptance cannot show its inputs are right, so every draft token vLLM proposed (recorded in
  the worker) must equal a transformers replay (`vllm_massv.drafters.massv.hf_model`) fed the
  video embeddings of transformers' own Qwen2.5-VL vision tower at the video positions -- on
  both runners -- and the same replay with the video embeddings zeroed must disagree (the
  comparison sees them). Measured: 452 of 452 drafts equal on V1 and on Model Runner V2; 342
  of the 344 drafts on video prompts differ from the zeroed-video replay.
* MSD (an untrained head, `{"method": "eagle"}`, acceptance ~0): lossless on video prompts, and
  it drafts for them (vLLM's EAGLE path hands it the video embeddings like image ones; its
  video rows are decoupled, `MsdConfig.video_token_id`). Its drafts are not compared with the
  transformers twin here: the twin's target forward (`training/features.py::
  TargetHiddenStates`) reads images only.
"""

from __future__ import annotations

import time

import pytest
import torch

from tests.support import recorders
from tests.support.engine import acceptance, engine, generate, spec_config, token_ids
from tests.support.profile import ENGINE_ARGS, RUNNER
from tests.support.replay import emitted_accepted, greedy_acceptance
from vllm_massv import testing as mt

pytestmark = pytest.mark.both_runners

K = 4
#: Per-engine override of the profile's `limit_mm_per_prompt` (video 0 there).
VIDEO_LIMITS = {"limit_mm_per_prompt": {**ENGINE_ARGS["limit_mm_per_prompt"], "video": 2}}
#: The batch's prompts that hold a video.
VIDEO_PROMPTS = ("pan", "zoom_mid", "two_videos", "video_and_image")


def video_batch(target) -> dict[str, dict]:
    """name -> vLLM prompt dict (see the module docstring)."""
    vids, imgs = mt.sample_videos(), mt.sample_images()
    return {
        "pan": {"prompt": mt.video_prompt(target, "What happens in this video?"),
                "multi_modal_data": {"video": vids["pan"]}},
        "zoom_mid": {"prompt": mt.video_prompt(target, "Which animal comes closer in this clip?",
                                               video_first=False),
                     "multi_modal_data": {"video": vids["zoom"]}},
        "two_videos": {"prompt": mt.video_prompt(target, "Compare the two videos.",
                                                 num_videos=2),
                       "multi_modal_data": {"video": [vids["blocks"], vids["pan"]]}},
        "video_and_image": {"prompt": mt.video_prompt(target, "Is the square in the picture?",
                                                      num_images=1),
                            "multi_modal_data": {"video": vids["blocks"],
                                                 "image": imgs["red"]}},
        "image": {"prompt": mt.image_prompt(target, "Describe this image."),
                  "multi_modal_data": {"image": imgs["astronaut"]}},
        "text": {"prompt": mt.text_prompt(target, "Count from one to ten, please.")},
    }


def _drafted(outputs, names) -> tuple[int, int]:
    """(accepted, drafted) draft tokens over the named requests."""
    acc = drafted = 0
    for n in names:
        m = outputs[n].outputs[0].spec_decode_metrics
        acc += sum(m.per_step_accepted)
        drafted += sum(m.per_step_drafted)
    return acc, drafted


def _report(label: str, outputs, seconds: float) -> None:
    acc, drafted = _drafted(outputs, VIDEO_PROMPTS)
    print(f"[{RUNNER}] {label}: video prompts {acc}/{drafted} drafts accepted "
          f"({acceptance(outputs, VIDEO_PROMPTS):.4f}); image {acceptance(outputs, ['image']):.4f}"
          f"; text {acceptance(outputs, ['text']):.4f}; engine + batch {seconds:.0f} s")


@pytest.fixture(scope="module")
def video_reference(models) -> dict:
    """The target alone: greedy outputs of the batch, plus the `pan` prompt with another video
    (`pan_other`) to show the video content steers the output."""
    prompts = video_batch(models.target)
    other = {"pan_other": {**prompts["pan"],
                           "multi_modal_data": {"video": mt.sample_videos()["blocks"]}}}
    with engine(models.target, **VIDEO_LIMITS) as llm:
        return token_ids(generate(llm, {**prompts, **other}))


@pytest.fixture(scope="module")
def sanity_run(models):
    """M-RoPE identity drafter (V1): the batch, then its video prompts again (prefix-cache
    hits), on one engine."""
    if RUNNER == "mrv2":
        pytest.skip("Model Runner V2 refuses `positions: mrope` MASSV drafters before serving "
                    "(tests/massv/test_errors.py)")
    start = time.monotonic()
    with engine(models.target, spec_config(models.sanity, K), **VIDEO_LIMITS) as llm:
        first = generate(llm, video_batch(models.target))
        _report("M-RoPE identity drafter (sanity)", first, time.monotonic() - start)
        rerun = generate(llm, {n: p for n, p in video_batch(models.target).items()
                               if n in VIDEO_PROMPTS})
    return first, rerun


@pytest.fixture(scope="module")
def sanity_1d_run(models):
    """1-D identity drafter: (outputs, the drafts recorded in the worker)."""
    start = time.monotonic()
    with engine(models.target, spec_config(models.sanity_1d, K), env=recorders.ENV,
                **VIDEO_LIMITS) as llm:
        llm.collective_rpc(recorders.install_recorder)
        out = generate(llm, video_batch(models.target))
        record = llm.collective_rpc(recorders.read_record)[0]
    _report("1-D identity drafter (sanity_1d)", out, time.monotonic() - start)
    return out, record["drafts"]


def proposed_rows(log: list, out) -> list[list[int]]:
    """The draft ids vLLM proposed for one request per verify step: the recorded proposals after
    its prompt, less the last (made in the step that finished the request, never verified)."""
    req = out.request_id.split("-")[0]
    return [row for r, in_prefill, row in log if r.split("-")[0] == req and not in_prefill][:-1]


def replay_1d(target, drafter_dir, prompt: dict, out, zero_video: bool = False
              ) -> tuple[list[int], list[list[int]]]:
    """Greedy speculative decoding along the target's output with the transformers twin of a
    1-D MASSV drafter (`hf_model.drafter_class`), fed the visual embeddings transformers'
    Qwen2.5-VL computes: the processor (`AutoProcessor` of the target, videos with their
    `VideoMetadata`) and the vision tower + merger (`TargetImageEncoder.visual`, the weights
    vLLM loads), video and image rows written at their placeholders in sequence order.

    Returns:
        (accepted per verify step, the draft ids per verify step), for the drafted counts vLLM
        reports (`per_step_drafted`).
    """
    from transformers import AutoProcessor
    from transformers.video_utils import VideoMetadata

    from vllm_massv.drafters.massv.hf_model import drafter_class
    from vllm_massv.training.features import TargetImageEncoder

    processor = AutoProcessor.from_pretrained(target)
    visual = TargetImageEncoder(target).visual
    drafter = drafter_class(drafter_dir).from_pretrained(drafter_dir, dtype=torch.float32).eval()
    mm = prompt.get("multi_modal_data", {})
    videos = mm.get("video")
    videos = [] if videos is None else videos if isinstance(videos, list) else [videos]
    images = mm.get("image")
    images = [] if images is None else images if isinstance(images, list) else [images]
    kwargs = {}
    if videos:
        kwargs["videos"] = [frames for frames, _ in videos]
        kwargs["video_metadata"] = [VideoMetadata(**{k: v for k, v in meta.items()
                                                     if k != "do_sample_frames"})
                                    for _, meta in videos]
    inputs = processor(text=[prompt["prompt"]], images=images or None, return_tensors="pt",
                       **kwargs)
    prompt_ids = inputs["input_ids"][0].tolist()
    assert prompt_ids == list(out.prompt_token_ids)
    ids = torch.tensor(prompt_ids)
    width = int(visual.config.out_hidden_size)
    embeds = torch.zeros(len(prompt_ids), width)
    with torch.no_grad():
        for token, pixels, grid in ((mt.VIDEO_TOKEN_ID, "pixel_values_videos", "video_grid_thw"),
                                    (mt.IMAGE_TOKEN_ID, "pixel_values", "image_grid_thw")):
            if pixels in inputs:
                rows = visual(inputs[pixels], grid_thw=inputs[grid]).pooler_output
                if token == mt.VIDEO_TOKEN_ID and zero_video:
                    rows = torch.zeros_like(rows)
                embeds[ids == token] = rows
    is_mm = (ids == mt.VIDEO_TOKEN_ID) | (ids == mt.IMAGE_TOKEN_ID)
    mm_embeds = embeds[is_mm]
    tokens = list(out.outputs[0].token_ids)

    def propose(m: int, drafted: int) -> list[int]:
        ctx = prompt_ids + tokens[:m]
        proposals: list[int] = []
        for _ in range(drafted):
            seq = torch.tensor([ctx + proposals])
            mask = torch.zeros_like(seq, dtype=torch.bool)
            mask[0, :len(prompt_ids)] = is_mm   # generated text never takes an embedding
            with torch.no_grad():
                logits = drafter(input_ids=seq, image_embeds=mm_embeds, image_mask=mask).logits
            proposals.append(int(logits[0, -1].argmax()))
        return proposals

    rows: list[list[int]] = []
    drafted = list(out.outputs[0].spec_decode_metrics.per_step_drafted)
    return greedy_acceptance(tokens, drafted, propose, rows), rows


def test_video_steers_the_target(video_reference):
    """Another video in the same prompt string changes the target's answer: a drafter that
    ignored the video embeddings could not accept ~everything."""
    assert video_reference["pan"] != video_reference["pan_other"]


def test_mrope_drafter_lossless(sanity_run, video_reference):
    first, _ = sanity_run
    assert token_ids(first) == {n: video_reference[n] for n in first}


def test_mrope_drafter_accepts_video(sanity_run):
    first, _ = sanity_run
    acc, drafted = _drafted(first, VIDEO_PROMPTS)
    assert drafted >= 4 * K * len(VIDEO_PROMPTS)  # >= 4 verify steps of k drafts each
    assert acc / drafted >= 0.99
    assert acceptance(first, ["image", "text"]) >= 0.99


def test_mrope_drafter_prefix_cache_rerun(sanity_run, video_reference):
    """The video prompts again on the same engine: prompt blocks holding video tokens come from
    the prefix cache (target and drafter KV), outputs and acceptance unchanged."""
    _, rerun = sanity_run
    for name, out in rerun.items():
        assert out.num_cached_tokens and out.num_cached_tokens >= 64, name  # >= two KV blocks
    assert token_ids(rerun) == {n: video_reference[n] for n in rerun}
    acc, drafted = _drafted(rerun, VIDEO_PROMPTS)
    print(f"[{RUNNER}] sanity drafter on prefix-cache hits: {acc}/{drafted} accepted")
    assert acc / drafted >= 0.99


def test_1d_drafter_lossless(sanity_1d_run, video_reference):
    out, _ = sanity_1d_run
    assert token_ids(out) == {n: video_reference[n] for n in out}
    assert acceptance(out, ["text"]) >= 0.99  # text: 1-D positions == the target's


def test_1d_drafter_drafts_equal_transformers(sanity_1d_run, models):
    """Every draft token vLLM proposed with the 1-D drafter == the transformers replay's, per
    verify step, and so are the accepted counts; with the video embeddings zeroed the replay
    disagrees with vLLM on every video prompt."""
    out, log = sanity_1d_run
    prompts = video_batch(models.target)
    total = 0
    for name, o in out.items():
        rows = proposed_rows(log, o)
        metrics = o.outputs[0].spec_decode_metrics
        assert [len(r) for r in rows if r] == list(metrics.per_step_drafted), name
        accepted, replayed = replay_1d(models.target, models.sanity_1d, prompts[name], o)
        assert rows == replayed, name
        assert emitted_accepted(list(metrics.per_step_accepted), len(o.outputs[0].token_ids)) \
            == accepted, name
        total += sum(len(r) for r in rows)
        if name in VIDEO_PROMPTS:
            _, blind = replay_1d(models.target, models.sanity_1d, prompts[name], o,
                                 zero_video=True)
            differing = sum(a != b for r, z in zip(rows, blind) for a, b in zip(r, z))
            print(f"[{RUNNER}] {name}: {sum(len(r) for r in rows)} drafts equal to the replay; "
                  f"{differing} differ from a replay with the video embeddings zeroed")
            assert differing > 0, name
    print(f"[{RUNNER}] 1-D drafter: {total} draft tokens, all equal to the transformers replay")


def test_msd_lossless_on_video(models, video_reference, tmp_path):
    """An untrained MSD head (acceptance ~0, so only losslessness and drafting are checked):
    the target's hidden states and video embeddings reach it through vLLM's EAGLE path."""
    drafter = mt.build_msd_drafter(models.target, tmp_path / "msd")
    start = time.monotonic()
    with engine(models.target, {"method": "eagle", "model": str(drafter),
                                "num_speculative_tokens": 3}, **VIDEO_LIMITS) as llm:
        out = generate(llm, video_batch(models.target))
    _report("MSD (untrained)", out, time.monotonic() - start)
    assert token_ids(out) == {n: video_reference[n] for n in out}
    assert _drafted(out, VIDEO_PROMPTS)[1] > 0
