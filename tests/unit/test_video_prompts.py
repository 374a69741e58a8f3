"""The video test helpers (`vllm_massv.testing.prompts`): prompt form, vLLM's video item form and
the sample videos' token counts through the tiny target's own processor (no engine)."""

from __future__ import annotations

import numpy as np
import pytest

from vllm_massv import testing as mt


def test_video_item_form():
    frames = np.zeros((3, 28, 56, 3), dtype=np.uint8)
    item = mt.video_item(frames, fps=1.5)
    assert item[0] is frames
    assert item[1] == {"total_num_frames": 3, "fps": 1.5, "duration": 2.0,
                       "video_backend": "opencv", "frames_indices": [0, 1, 2],
                       "do_sample_frames": False}
    with pytest.raises(ValueError, match="uint8"):
        mt.video_item(frames.astype(np.float32), fps=1.0)
    with pytest.raises(ValueError, match="fps"):
        mt.video_item(frames, fps=0)


def test_sample_videos_through_the_target_processor(models):
    """Shapes, fps and the placeholder counts the docstring of `sample_videos` states, with
    Qwen2.5-VL's `second_per_grid_ts` = temporal_patch_size / fps."""
    from transformers import AutoProcessor
    from transformers.video_utils import VideoMetadata

    processor = AutoProcessor.from_pretrained(models.target)
    expected = {"pan": ((4, 112, 112, 3), 2.0, 32), "zoom": ((6, 84, 140, 3), 1.0, 45),
                "blocks": ((5, 112, 84, 3), 4.0, 36)}
    videos = mt.sample_videos()
    assert set(videos) == set(expected)
    for name, (frames, meta) in videos.items():
        shape, fps, tokens = expected[name]
        assert frames.shape == shape and frames.dtype == np.uint8 and meta["fps"] == fps, name
        prompt = mt.video_prompt(models.target, "What happens?")
        assert prompt.count("<|video_pad|>") == 1
        md = VideoMetadata(**{k: v for k, v in meta.items() if k != "do_sample_frames"})
        out = processor(text=[prompt], videos=[frames], video_metadata=[md], return_tensors="pt")
        assert out["input_ids"][0].tolist().count(mt.VIDEO_TOKEN_ID) == tokens, name
        assert out["second_per_grid_ts"].tolist() == [2.0 / fps], name
    mixed = mt.video_prompt(models.target, "Is it in both?", num_videos=2, num_images=1,
                            video_first=False)
    assert mixed.count("<|video_pad|>") == 2 and mixed.count("<|image_pad|>") == 1
    assert mixed.index("Is it ") < mixed.index("<|video_pad|>") < mixed.index("in both?")
