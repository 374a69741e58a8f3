"""MASSV training phases on tiny models, without a vLLM engine.

Training phases on tiny models without a vLLM engine: resume, phase semantics, export, and the
parity of the transformers drafter with vLLM's (the logits test lives in test_pipeline.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vllm_massv import testing as mt
from vllm_massv.training.loop import TrainConfig, train


@pytest.fixture(scope="module")
def dataset(models, tmp_path_factory) -> Path:
    """A small `massv generate`-format data set: image prompts; the 'target' responses name the
    image, so a drafter can learn them only through the projector."""
    from transformers import AutoProcessor

    root = tmp_path_factory.mktemp("data")
    (root / "train").mkdir()
    processor = AutoProcessor.from_pretrained(models.target)
    images = mt.sample_images()
    rows = []
    for i in range(24):
        name = ["astronaut", "chelsea", "red", "gradient", "noise"][i % 5]
        path = root / f"{name}.png"
        if not path.exists():
            images[name].save(path)
        prompt = mt.image_prompt(models.target, f"Question number {i}: what is shown?")
        ids = processor(text=[prompt], images=[images[name]])["input_ids"][0]
        reference = f"A picture of a {name}."
        response = processor.tokenizer(reference, add_special_tokens=False)["input_ids"] + [2]
        rows.append({"id": f"s{i:03d}", "prompt_token_ids": list(map(int, ids)),
                     "images": [str(path)], "token_ids": response,
                     "reference": reference, "prompt": prompt})
    pq.write_table(pa.Table.from_pylist(rows), root / "train" / "part-00000-000000.parquet")
    return root


def _cfg(models, dataset, out, **kw) -> TrainConfig:
    base = dict(phase="sdvit", drafter=str(models.blind), data=str(dataset),
                target=str(models.target), out=str(out), max_steps=6, batch_size=4, lr=3e-3,
                eval_fraction=0.2, save_every=3, seed=0)
    return TrainConfig(**(base | kw))


def _log(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]


def assert_same_loss_curve(a_dir: Path, b_dir: Path, steps: int) -> None:
    """Two runs' `train_log.jsonl`: steps 0..`steps`, equal loss, eval loss and agreement."""
    a, b = _log(a_dir), _log(b_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(steps + 1))
    for ra, rb in zip(a, b):
        for key in ("loss", "eval_loss", "agreement"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (ra, rb)


def test_resume_continues_the_same_loss_curve(models, dataset, tmp_path):
    straight = train(_cfg(models, dataset, tmp_path / "straight"))
    interrupted = tmp_path / "resumed"
    assert train(_cfg(models, dataset, interrupted, stop_after=4)) == {"stopped_at": 4}
    resumed = train(_cfg(models, dataset, interrupted))   # continues from checkpoints/step-3
    assert_same_loss_curve(tmp_path / "straight", interrupted, steps=6)
    assert resumed["steps"] == straight["steps"] == 6


def test_align_trains_only_the_projector(models, dataset, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "align"
    train(_cfg(models, dataset, out, phase="align", max_steps=3, save_every=0))
    before = load_file(models.blind / "model.safetensors")
    after = load_file(out / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("mm_projector.") for k in changed), changed
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MassvQwen2ForCausalLM"]
    assert config["massv"] == json.loads((models.blind / "config.json").read_text())["massv"]
    assert (out / "tokenizer.json").is_file()


def test_sdvit_raises_heldout_agreement(models, dataset, tmp_path):
    out = tmp_path / "sdvit"
    final = train(_cfg(models, dataset, out, max_steps=40, save_every=0, lr=5e-3,
                       eval_fraction=0.0))
    log = _log(out)
    # no held-out split here (eval_fraction 0): training agreement must rise on memorizable data
    assert log[-1]["agreement"] > log[1]["agreement"] + 0.2, (log[1], log[-1])
    assert final["steps"] == 40


# ------------------------------------------------------------------------------------------
# M-RoPE drafters (massv.positions == "mrope") on the transformers side
# ------------------------------------------------------------------------------------------


def test_mrope_positions_match_transformers(models) -> None:
    """Our M-RoPE positions equal transformers' Qwen2.5-VL `get_rope_index` (two images of
    different grids, text before, between and after), and the encoder's grids equal the
    processor's."""
    from PIL import Image
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from vllm_massv.rope import mrope_positions
    from vllm_massv.training.features import TargetImageEncoder

    processor = AutoProcessor.from_pretrained(models.target)
    target = Qwen2_5_VLForConditionalGeneration.from_pretrained(models.target)
    prompt = mt.image_prompt(models.target, "compare these two", num_images=2,
                             image_first=False) + "an answer"
    images = [Image.new("RGB", (451, 300)), Image.new("RGB", (140, 140))]
    batch = processor(text=[prompt], images=images, return_tensors="pt",
                      return_mm_token_type_ids=True)
    ref, _ = target.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                         image_grid_thw=batch["image_grid_thw"],
                                         attention_mask=batch["attention_mask"])
    merge = torch.tensor([1, 2, 2])
    grids = [tuple((g // merge).tolist()) for g in batch["image_grid_thw"]]
    assert grids == [(1, 6, 9), (1, 5, 5)]
    encoder = TargetImageEncoder(models.target)
    assert [encoder.grid(im) for im in images] == grids
    ours = mrope_positions(batch["input_ids"][0].tolist(), mt.IMAGE_TOKEN_ID, grids)
    assert torch.equal(ours, ref[:, 0])
    with pytest.raises(ValueError, match="more image grids"):
        mrope_positions([1, 2, 3], mt.IMAGE_TOKEN_ID, grids[:1])


def test_mrope_drafter_on_text_equals_1d(models, tmp_path: Path) -> None:
    """With every axis equal (text), the M-RoPE drafter computes exactly the 1-D drafter's
    logits: the section split only matters where the axes differ (image tokens)."""
    from vllm_massv.drafters.massv.hf_model import MassvQwen2ForCausalLM
    from vllm_massv.drafters.massv.init import init_drafter

    one_d = init_drafter(models.target, models.text_lm, tmp_path / "d1").out_dir
    three_d = init_drafter(models.target, models.text_lm, tmp_path / "d3",
                           positions="mrope").out_dir
    ids = torch.tensor([[5, 300, 301, 302, 77, 2, 400]])
    with torch.no_grad():
        a = MassvQwen2ForCausalLM.from_pretrained(one_d).eval()(input_ids=ids).logits
        pos = torch.arange(ids.shape[1]).expand(3, 1, -1)
        b = MassvQwen2ForCausalLM.from_pretrained(three_d).eval()(
            input_ids=ids, position_ids=pos).logits
        pos_img = pos.clone()
        pos_img[1, 0, 3:] += 5  # axes that differ change the result
        c = MassvQwen2ForCausalLM.from_pretrained(three_d).eval()(
            input_ids=ids, position_ids=pos_img).logits
    assert torch.equal(a, b)
    assert not torch.allclose(b[0, 3:], c[0, 3:])


def test_train_mrope_drafter(models, dataset, tmp_path: Path) -> None:
    """sdvit trains an M-RoPE drafter (3-D positions from the image grids) and exports it with
    its mrope_section intact."""
    from vllm_massv.drafters.massv.init import init_drafter

    drafter = init_drafter(models.target, models.text_lm, tmp_path / "init",
                           positions="mrope").out_dir
    out = tmp_path / "out"
    final = train(_cfg(models, dataset, out, drafter=str(drafter), save_every=0, max_steps=4))
    assert final["step"] == 4 and final["eval_loss"] == final["eval_loss"]  # not NaN
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["massv"]["positions"] == "mrope"
    assert cfg["rope_parameters"]["mrope_section"] == [4, 6, 6]


def test_export_is_self_describing(models, dataset, tmp_path: Path) -> None:
    """Phase 1 then phase 2: each export carries a speculators_config with the input drafter's
    k (one-argument `vllm serve`), and a Hub model card (README.md) that parses and lists both
    phases, the data, the held-out agreement and the serving commands."""
    from huggingface_hub import ModelCard

    from vllm_massv.drafters.massv.init import init_drafter

    drafter = init_drafter(models.target, models.text_lm, tmp_path / "init",
                           num_speculative_tokens=3).out_dir
    p1, p2 = tmp_path / "phase1", tmp_path / "phase2"
    train(_cfg(models, dataset, p1, drafter=str(drafter), phase="align", max_steps=2,
               save_every=0))
    final = train(_cfg(models, dataset, p2, drafter=str(p1), max_steps=3, save_every=0,
                       license="apache-2.0"))
    cfg = json.loads((p2 / "config.json").read_text())
    assert cfg["speculators_model_type"] == "massv"
    assert cfg["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3
    assert cfg["speculators_config"]["verifier"]["name_or_path"] == str(models.target)
    assert [p["phase"] for p in final["phases"]] == ["align", "sdvit"]
    assert [p["steps"] for p in final["phases"]] == [2, 3]

    card = ModelCard.load(p2 / "README.md")
    assert card.data.license == "apache-2.0"
    assert {"massv", "speculative-decoding", "speculators"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local target path is not a Hub base model
    body = card.text
    assert f"vllm serve {p2} " in body and "num_speculative_tokens\": 3" in body
    assert "phase 1, align" in body and "phase 2, sdvit" in body
    assert str(dataset) in body
    agreement = final["phases"][-1]["eval_agreement"]
    assert f"**{agreement:.3f}**" in body
    assert ModelCard.load(p1 / "README.md").data.license == "other"


def test_model_card_hub_target() -> None:
    from vllm_massv.drafters.massv.config import MassvConfig
    from vllm_massv.training.model_card import build_model_card

    massv = MassvConfig(vision_feature_dim=3584, orig_vocab_size=151936, image_token_id=151655,
                        target="Qwen/Qwen2.5-VL-7B-Instruct",
                        target_architecture="Qwen2_5_VLForConditionalGeneration")
    card = build_model_card("org/massv-drafter", massv, 4, [])
    assert card.data.base_model == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert "vllm serve org/massv-drafter" in card.text
    assert "not measured" in card.text


def test_model_card_msd() -> None:
    """An MSD drafter's card (training/msd.py export) names MSD and serves with method eagle."""
    from vllm_massv.drafters.msd.config import MsdConfig
    from vllm_massv.training.model_card import build_model_card, phase_record

    msd = MsdConfig(target="Qwen/Qwen2.5-VL-7B-Instruct", image_token_id=151655,
                    target_architecture="Qwen2_5_VLForConditionalGeneration",
                    target_hidden_size=3584)
    phases = [phase_record("msd", "data/sdvit", {"steps": 7, "eval_agreement": 0.625}, {})]
    card = build_model_card("org/msd-drafter", msd, 3, phases)
    assert card.data.base_model == "Qwen/Qwen2.5-VL-7B-Instruct" and "msd" in card.data.tags
    assert card.text.lstrip().startswith("# MSD drafter for Qwen/Qwen2.5-VL-7B-Instruct")
    assert '"method": "eagle", "model": "org/msd-drafter", "num_speculative_tokens": 3' in card.text
    assert "| msd (fc + decoder layer" in card.text and "**0.625**" in card.text
    assert "`data/sdvit`" in card.text and "projector" not in card.text
