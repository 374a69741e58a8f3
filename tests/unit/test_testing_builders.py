"""Tests of the tiny-model builders in ``vllm_massv.testing`` (no vLLM engine involved)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# Import the module, not its functions: pytest would collect a bare ``sample_images`` as a test.
from vllm_massv import testing as mt

IMAGE_PAD_ID = 12


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mt.build_target(tmp_path_factory.mktemp("target"))


@pytest.fixture(scope="module")
def text_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mt.build_text_lm(tmp_path_factory.mktemp("text_lm"))


@pytest.fixture(scope="module")
def images():
    return mt.sample_images()


def test_tokenizer_deterministic_and_special_ids(tmp_path: Path) -> None:
    tok_a = mt.build_tokenizer(tmp_path / "a")
    mt.build_tokenizer(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_bytes()
    assert len(tok_a) == 2048
    assert tok_a.convert_ids_to_tokens(list(range(14))) == list(mt.SPECIAL_TOKENS)
    assert mt.SPECIAL_TOKENS[0] == "<|endoftext|>" and mt.SPECIAL_TOKENS[13] == "<|video_pad|>"
    assert tok_a.eos_token == "<|im_end|>" and tok_a.eos_token_id == 2
    assert tok_a.pad_token == "<|endoftext|>" and tok_a.pad_token_id == 0
    # Special tokens are atomic; no bos is prepended.
    ids = tok_a("<|vision_start|><|image_pad|><|vision_end|>hi")["input_ids"]
    assert ids[:3] == [9, 12, 10]
    text = "The red circle sits on the table, 12.5 cm wide!"
    assert tok_a.decode(tok_a(text)["input_ids"]) == text


def test_tokenizer_files_and_chat_template(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    mt.build_tokenizer(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == mt.CHAT_TEMPLATE
    assert json.loads((tmp_path / "chat_template.json").read_text()) == {
        "chat_template": mt.CHAT_TEMPLATE
    }
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] == (
        mt.CHAT_TEMPLATE
    )
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tok) == 2048
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>What?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_prompts(target_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(target_dir))
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    first = mt.image_prompt(target_dir, "What is in the picture?")
    assert first == mt.image_prompt(tok, "What is in the picture?")
    assert first.endswith(
        f"<|im_start|>user\n{image}What is in the picture?<|im_end|>\n<|im_start|>assistant\n"
    )
    middle = mt.image_prompt(tok, "What is in the picture?", num_images=2, image_first=False)
    assert f"user\nWhat is {image}{image}in the picture?<|im_end|>" in middle
    plain = mt.text_prompt(tok, "Count the cats.")
    assert plain.endswith("<|im_start|>user\nCount the cats.<|im_end|>\n<|im_start|>assistant\n")
    assert "<|image_pad|>" not in plain


def test_test_images_deterministic(images) -> None:
    again = mt.sample_images()
    expected_sizes = {
        "red": (320, 240),
        "gradient": (200, 200),
        "noise": (150, 250),
        "astronaut": (224, 224),
        "chelsea": (451, 300),
    }
    assert {k: v.size for k, v in images.items()} == expected_sizes
    for name, img in images.items():
        assert img.mode == "RGB"
        assert img.tobytes() == again[name].tobytes()


def test_target_config(target_dir: Path) -> None:
    config = json.loads((target_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    text = config["text_config"]
    assert text["vocab_size"] == 2112
    assert text["hidden_size"] == 256 and text["num_hidden_layers"] == 4
    assert text["num_attention_heads"] == 4 and text["num_key_value_heads"] == 2
    assert text["rope_parameters"]["mrope_section"] == [8, 12, 12]
    assert config["tie_word_embeddings"] is False
    assert (config["image_token_id"], config["video_token_id"]) == (12, 13)
    assert (config["vision_start_token_id"], config["vision_end_token_id"]) == (9, 10)
    vision = config["vision_config"]
    assert vision["out_hidden_size"] == 256 and vision["fullatt_block_indexes"] == [1]
    for name in (
        "preprocessor_config.json",
        "chat_template.json",
        "tokenizer.json",
        "generation_config.json",
        "model.safetensors",
    ):
        assert (target_dir / name).is_file(), name


def test_target_and_text_lm_deterministic(
    tmp_path: Path, target_dir: Path, text_lm_dir: Path
) -> None:
    again_target = mt.build_target(tmp_path / "target")
    again_lm = mt.build_text_lm(tmp_path / "lm")
    for built, again in ((target_dir, again_target), (text_lm_dir, again_lm)):
        for name in ("model.safetensors", "tokenizer.json", "config.json"):
            assert (built / name).read_bytes() == (again / name).read_bytes(), (built, name)
    other_seed = mt.build_text_lm(tmp_path / "lm_seed2", seed=2)
    assert (other_seed / "model.safetensors").read_bytes() != (
        text_lm_dir / "model.safetensors"
    ).read_bytes()


def test_processor_expands_image_pads(target_dir: Path, images) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(target_dir))
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    prompt = mt.image_prompt(target_dir, "Describe the image.")
    grids = {}
    for name, img in images.items():
        inputs = processor(text=[prompt], images=[img], return_tensors="pt")
        grid = inputs["image_grid_thw"]
        assert grid.shape == (1, 3)
        num_pads = int((inputs["input_ids"] == IMAGE_PAD_ID).sum())
        assert num_pads == int(grid.prod()) // 4
        assert inputs["pixel_values"].shape[0] == int(grid.prod())
        assert int(inputs["mm_token_type_ids"].sum()) == num_pads
        grids[name] = tuple(grid[0].tolist())
    # 320x240 -> smart_resize (factor 28, max 224*224 pixels) -> 252x168 -> 18x12 patches.
    assert grids["red"] == (1, 12, 18)
    assert grids["astronaut"] == (1, 16, 16)


def test_target_generates_from_image_prompt(target_dir: Path, images) -> None:
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(str(target_dir))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(target_dir)).eval()
    prompt = mt.image_prompt(target_dir, "What is in the image?", num_images=2, image_first=False)
    inputs = processor(text=[prompt], images=[images["red"], images["noise"]], return_tensors="pt")
    # transformers 5: without mm_token_type_ids, Qwen2.5-VL silently falls back to 1-D positions.
    assert "mm_token_type_ids" in inputs
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(new) == 16
    assert len(set(new)) > 4, new  # the x4 weight scaling keeps greedy output from looping


def test_text_lm_generates(text_lm_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((text_lm_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["head_dim"] == 32 and config["tie_word_embeddings"] is True
    assert config["vocab_size"] == 2048
    tok = AutoTokenizer.from_pretrained(str(text_lm_dir))
    model = AutoModelForCausalLM.from_pretrained(str(text_lm_dir)).eval()
    inputs = tok(mt.text_prompt(tok, "Describe the red circle."), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(new) == 16 and len(set(new)) > 4, new
