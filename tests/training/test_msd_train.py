"""MSD training (`massv train --method msd`) on tiny models, without a vLLM engine.

MSD training (`massv train --method msd`) on tiny models, no vLLM engine: the target features
see the image, the curriculum schedule, decoupling, loss decrease, resume and export."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from test_train import assert_same_loss_curve
from vllm_massv import testing as mt
from vllm_massv.drafters.msd import train as msd
from vllm_massv.drafters.msd.hf_model import MsdQwen2Drafter
from vllm_massv.testing import build_msd_drafter
from vllm_massv.training.examples import Example
from vllm_massv.training.loop import TrainConfig, train


@pytest.fixture(scope="module")
def msd_drafter(models, tmp_path_factory) -> Path:
    return build_msd_drafter(models.target, tmp_path_factory.mktemp("msd") / "init")


@pytest.fixture(scope="module")
def dataset(models, tmp_path_factory) -> Path:
    """A `massv generate`-format data set: image prompts (image first or mid-prompt) whose
    answers name the image, plus text-only prompts."""
    from transformers import AutoProcessor

    root = tmp_path_factory.mktemp("data")
    (root / "train").mkdir()
    processor = AutoProcessor.from_pretrained(models.target)
    images = mt.sample_images()
    rows = []
    for i in range(24):
        name = ["astronaut", "chelsea", "red", "gradient"][i % 4]
        path = root / f"{name}.png"
        if not path.exists():
            images[name].resize((112, 84)).save(path)
        text_only = i % 6 == 5
        question = f"Question number {i}: what is shown here?"
        if text_only:
            prompt = mt.text_prompt(models.target, question)
            ids = processor.tokenizer(prompt)["input_ids"]
        else:
            prompt = mt.image_prompt(models.target, question, image_first=i % 2 == 0)
            ids = processor(text=[prompt], images=[images[name].resize((112, 84))]
                            )["input_ids"][0]
        answer = f"A picture of a {name}, number {i % 3}."
        response = processor.tokenizer(answer, add_special_tokens=False)["input_ids"] + [2]
        rows.append({"id": f"s{i:03d}", "prompt_token_ids": list(map(int, ids)),
                     "images": [] if text_only else [str(path)], "token_ids": response,
                     "reference": answer, "prompt": prompt})
    pq.write_table(pa.Table.from_pylist(rows), root / "train" / "part-00000-000000.parquet")
    return root


def _cfg(models, msd_drafter, dataset, out, **kw) -> TrainConfig:
    base = dict(phase=None, method="msd", drafter=str(msd_drafter), data=str(dataset),
                target=str(models.target), out=str(out), max_steps=6, batch_size=4, lr=3e-3,
                eval_fraction=0.2, save_every=3, seed=0)
    return TrainConfig(**(base | kw))


def _log(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]


def test_curriculum_schedule() -> None:
    """MSD's released update_ratio: 40 epochs = 20 text-only, then 0.05 ... 0.95, then 1."""
    ratios = [msd.mm_ratio(e, 40) for e in range(1, 41)]
    assert ratios[:20] == [0.0] * 20
    assert ratios[20:39] == pytest.approx([k / 20 for k in range(1, 20)])
    assert ratios[39] == 1.0
    assert [msd.mm_ratio(e, 6) for e in range(1, 7)] == pytest.approx([0, 0, 0, 1 / 3, 2 / 3, 1])
    assert [msd.mm_ratio(e, 1) for e in (1, 2)] == [1.0, 1.0]
    assert [msd.mm_ratio(e, 2) for e in (1, 2)] == [0.0, 1.0]
    with pytest.raises(ValueError):
        msd.mm_ratio(0, 4)
    # the per-example draw follows the ratio and is reproducible
    kept = [msd.keeps_image(f"id{i}", 3, 4, seed=0) for i in range(2000)]   # ratio 0.5
    assert 0.45 < sum(kept) / len(kept) < 0.55
    assert kept == [msd.keeps_image(f"id{i}", 3, 4, seed=0) for i in range(2000)]
    assert not any(msd.keeps_image(f"id{i}", 2, 4, seed=0) for i in range(200))


def test_strip_images_keeps_text_and_response() -> None:
    vs, ve, img = mt.VISION_START_TOKEN_ID, mt.VISION_END_TOKEN_ID, mt.IMAGE_TOKEN_ID
    e = Example("x", [1, 5, vs, img, img, ve, 6, vs, img, ve, 7, 8, 9], 11, ["a", "b"])
    t = msd.strip_images(e, vs, ve)
    assert (t.input_ids, t.prompt_len, t.images) == ([1, 5, 6, 7, 8, 9], 4, [])
    view = msd.curriculum_view(e, 0, 2, 0, (vs, ve))          # epoch 1 of 2: text only
    assert view == t and msd.curriculum_view(e, 1, 2, 0, (vs, ve)) is e
    with pytest.raises(ValueError, match="unterminated"):
        msd.strip_images(Example("y", [vs, img, 3], 3, ["a"]), vs, ve)


def test_target_hidden_states_use_the_image(models) -> None:
    """TargetHiddenStates equals transformers' Qwen2.5-VL forward with pixel_values (post-norm
    last layer and a middle layer, image mid-prompt); text after the image differs from the
    forward without pixel_values that MSD's released Qwen2-VL script ran."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from vllm_massv.training.features import FINAL, TargetHiddenStates

    processor = AutoProcessor.from_pretrained(models.target)
    image = mt.sample_images()["chelsea"]
    prompt = mt.image_prompt(models.target, "what is in this picture", image_first=False)
    batch = processor(text=[prompt + "a cat"], images=[image], return_tensors="pt")
    ids = batch["input_ids"][0].tolist()
    prompt_len = len(ids) - 2
    target = Qwen2_5_VLForConditionalGeneration.from_pretrained(models.target).eval()
    with torch.no_grad():
        ref = target(**batch, output_hidden_states=True).hidden_states
        blind = target(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states
    features = TargetHiddenStates(models.target, layers=(FINAL, 1))
    (states, image_embeds), = features([ids], [[image]], [prompt_len])
    assert states.shape == (2, len(ids), 256)
    assert image_embeds.shape == (ids.count(mt.IMAGE_TOKEN_ID), 256)
    torch.testing.assert_close(states[0], ref[-1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(states[1], ref[2][0], rtol=1e-5, atol=1e-5)
    after = ids.index(mt.VISION_END_TOKEN_ID) + 1
    diff = (states[0, after:] - blind[-1][0, after:]).abs().amax(-1)
    assert bool((diff > 1e-2).all()), diff
    before = ids.index(mt.VISION_START_TOKEN_ID)
    torch.testing.assert_close(states[0, :before], blind[-1][0, :before], rtol=1e-5, atol=1e-5)


def test_decouple_changes_only_image_rows(msd_drafter) -> None:
    """Decoupling on vs off changes the decoder layer's input only at the image rows, where it is
    the image embedding itself; rows before the first image row give identical outputs."""
    on = MsdQwen2Drafter.from_pretrained(msd_drafter).eval()
    off = MsdQwen2Drafter.from_pretrained(msd_drafter).eval()
    off.msd = off.msd.model_copy(update={"decouple_visual_tokens": False})
    torch.manual_seed(0)
    e, f = torch.randn(2, 9, 256), torch.randn(2, 9, 256)
    rows = torch.zeros(2, 9, dtype=torch.bool)
    rows[0, 3:6] = True
    rows[1, 1] = True
    seen = {}
    for name, m in (("on", on), ("off", off)):
        hook = m.model.layers[0].register_forward_pre_hook(
            lambda _m, a, name=name: seen.__setitem__(name, a[0]))
        with torch.no_grad():
            seen[name + "_out"] = m(e, f, rows)
        hook.remove()
    assert torch.equal(seen["on"][~rows], seen["off"][~rows])
    assert torch.equal(seen["on"][rows], e[rows])
    assert not torch.isclose(seen["off"][rows], e[rows]).all(-1).any()
    assert torch.equal(seen["on_out"][0, :3], seen["off_out"][0, :3])
    assert not torch.allclose(seen["on_out"][0, 3:], seen["off_out"][0, 3:])


def test_msd_training_lowers_loss_and_exports(models, msd_drafter, dataset, tmp_path) -> None:
    """Loss and held-out loss fall; the export loads with MsdQwen2Drafter.from_pretrained and
    passes the serving-side checks; --no-decouple is recorded in the export."""
    from vllm_massv.drafters.msd.config import check_checkpoint_weights, validate
    from transformers import AutoConfig

    out = tmp_path / "msd"
    final = train(_cfg(models, msd_drafter, dataset, out, max_steps=30, save_every=0, lr=3e-3,
                       eval_fraction=0.2))
    log = _log(out)
    assert final["steps"] == 30
    # (the random target's next-token distributions are near uniform: agreement is measured on
    # the trained testbed target, benchmarks/testbed/build.sh)
    assert log[-1]["eval_loss"] < 0.6 * log[0]["eval_loss"], (log[0], log[-1])
    assert log[-1]["loss"] < 0.6 * log[1]["loss"], (log[1], log[-1])
    trained = MsdQwen2Drafter.from_pretrained(out)
    init = MsdQwen2Drafter.from_pretrained(msd_drafter)
    assert all(not torch.equal(a, b) for a, b in
               zip(trained.state_dict().values(), init.state_dict().values()))
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.architectures == ["EagleMsdQwen2ForCausalLM"] and cfg.msd["decouple_visual_tokens"]
    target_cfg = AutoConfig.from_pretrained(models.target)
    validate(cfg, target_cfg, method="eagle", target_vocab_size=target_cfg.text_config.vocab_size,
             draft_vocab_size=cfg.vocab_size)
    check_checkpoint_weights(out, cfg, trained.msd)
    assert (out / "tokenizer.json").is_file()
    # self-describing: the speculators block (k of the input drafter) and the model card
    raw = json.loads((out / "config.json").read_text())
    assert raw["speculators_model_type"] == "msd"
    assert raw["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 4
    assert raw["speculators_config"]["verifier"]["name_or_path"] == str(models.target)
    from vllm_massv.speculators import vllm_speculative_config

    assert vllm_speculative_config(raw) == {"method": "eagle", "num_speculative_tokens": 4}
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "- msd" in card and "license: other" in card
    assert f"vllm serve {out}" in card and '"method": "eagle"' in card
    assert '"draft_model"' not in card
    row = next(ln for ln in card.splitlines() if ln.startswith("| msd (fc + decoder layer"))
    assert f"| 30 | {final['train_examples']} / {final['eval_examples']} |" in row
    assert f"{final['eval_agreement']:.4f}" in row

    ablation = tmp_path / "msd-no-decouple"
    train(_cfg(models, msd_drafter, dataset, ablation, max_steps=1, save_every=0,
               decouple=False))
    assert MsdQwen2Drafter.from_pretrained(ablation).msd.decouple_visual_tokens is False


def test_msd_resume_equals_uninterrupted(models, msd_drafter, dataset, tmp_path) -> None:
    """Interrupted after step 4 (checkpoint at 3) and resumed: the same losses as a straight run,
    across the curriculum's text-only to image epochs and with input noise on."""
    straight = train(_cfg(models, msd_drafter, dataset, tmp_path / "straight"))
    interrupted = tmp_path / "resumed"
    assert train(_cfg(models, msd_drafter, dataset, interrupted, stop_after=4)) == \
        {"stopped_at": 4}
    resumed = train(_cfg(models, msd_drafter, dataset, interrupted))
    assert_same_loss_curve(tmp_path / "straight", interrupted, steps=6)
    assert resumed["steps"] == straight["steps"] == 6


@pytest.mark.parametrize("argv, message", [
    (["--method", "msd", "--phase", "sdvit"], "--phase is a MASSV option"),
    (["--no-decouple", "--phase", "sdvit"], "--no-decouple is an MSD option"),
    ([], "needs --phase"),
])
def test_train_cli_rejects_mixed_options(argv, message, capsys) -> None:
    from vllm_massv.cli import main

    rc = main(["train", "--drafter", "d", "--data", "x", "--target", "t", "--out", "o", *argv])
    assert rc == 2 and message in capsys.readouterr().err
