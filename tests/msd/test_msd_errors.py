"""MSD drafters: every broken setup fails before serving, with a message naming the fix.

Like `tests/massv/test_errors.py`, the cases go through vLLM's real config path (`vllm.LLM(...)` /
`EngineArgs.create_engine_config()`): the plugin's `SpeculativeConfig` check
(`vllm_massv.drafters.msd.config.validate` + `check_checkpoint_weights`) and the V1-runner pin raise while
the config is built, before any engine process starts. No engine runs in this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
from safetensors.torch import load_file, save_file

from tests.support.models import TinyModels, copy_model
from tests.support.profile import ENGINE_ARGS
from vllm_massv.cli import main as massv_main
from vllm_massv.testing import build_msd_drafter


@pytest.fixture(scope="module")
def msd(models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_msd_drafter(models.target, tmp_path_factory.mktemp("msd") / "msd")


def _spec(draft: Path, method: str = "eagle") -> dict[str, Any]:
    return {"method": method, "model": str(draft), "num_speculative_tokens": 3}




def _edit_weights(draft: Path, edit: Callable[[dict], dict]) -> None:
    state = edit(load_file(draft / "model.safetensors"))
    save_file(state, draft / "model.safetensors", metadata={"format": "pt"})


def _engine_config(target: Path, draft: Path, method: str = "eagle"):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(target), speculative_config=_spec(draft, method),
                      **ENGINE_ARGS).create_engine_config()


def _refused(target: Path, draft: Path, *fragments: str, method: str = "eagle") -> str:
    with pytest.raises(ValueError) as info:
        _engine_config(target, draft, method)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    return message


# --- positive control --------------------------------------------------------------------------
def test_msd_drafter_passes_config_creation(models: TinyModels, msd: Path) -> None:
    from vllm_massv.patches.drafters import draft_is_massv, draft_is_msd

    cfg = _engine_config(models.target, msd)
    spec = cfg.speculative_config
    assert spec.method == "eagle" and draft_is_msd(spec) and not draft_is_massv(spec)
    assert spec.draft_model_config.hf_config.architectures == ["EagleMsdQwen2ForCausalLM"]
    assert not spec.draft_model_config.uses_mrope
    assert cfg.use_v2_model_runner is False


# --- pair and checkpoint checks ----------------------------------------------------------------
def test_wrong_method(models: TinyModels, msd: Path) -> None:
    _refused(models.target, msd, "serve them with method 'eagle'", "got 'draft_model'",
             method="draft_model")


def test_hidden_size_differs(models: TinyModels, msd: Path, tmp_path: Path) -> None:
    draft = copy_model(msd, tmp_path / "d", lambda c: (c.update(hidden_size=128),
                                                   c["msd"].update(target_hidden_size=128)))
    _refused(models.target, draft, "hidden_size=128", "!= the target's hidden size 256",
             "massv init --method msd")


def test_missing_weights(models: TinyModels, msd: Path, tmp_path: Path) -> None:
    draft = copy_model(msd, tmp_path / "d")
    _edit_weights(draft, lambda s: {k: v for k, v in s.items() if k != "model.fc.bias"})
    _refused(models.target, draft, "missing MSD weights", "model.fc.bias")


def test_own_lm_head_refused(models: TinyModels, msd: Path, tmp_path: Path) -> None:
    import torch

    draft = copy_model(msd, tmp_path / "d")
    _edit_weights(draft, lambda s: {**s, "lm_head.weight": torch.zeros(2112, 256)})
    _refused(models.target, draft, "unexpected weights ['lm_head.weight']",
             "reuses the target's embedding and LM head")


def test_fc_shape(models: TinyModels, msd: Path, tmp_path: Path) -> None:
    draft = copy_model(msd, tmp_path / "d")
    _edit_weights(draft, lambda s: {**s,
                                    "model.fc.weight": s["model.fc.weight"][:, :256].contiguous()})
    _refused(models.target, draft, "model.fc.weight has shape [256, 256]", "expected [256, 512]")


def test_truncated_weights(models: TinyModels, msd: Path, tmp_path: Path) -> None:
    draft = copy_model(msd, tmp_path / "d")
    weights = draft / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    _refused(models.target, draft, "truncated or corrupt")


def test_invalid_msd_block(models: TinyModels, msd: Path, tmp_path: Path) -> None:
    draft = copy_model(msd, tmp_path / "d", lambda c: c["msd"].update(decouple="yes please"))
    _refused(models.target, draft, "invalid 'msd' block", "decouple")


def test_image_token_id_differs(models: TinyModels, msd: Path, tmp_path: Path) -> None:
    draft = copy_model(msd, tmp_path / "d", lambda c: c["msd"].update(image_token_id=99))
    _refused(models.target, draft, "image/video token ids differ", "image=99")


def test_mrope_drafter_refused(models: TinyModels, msd: Path, tmp_path: Path) -> None:
    draft = copy_model(msd, tmp_path / "d",
                  lambda c: c["rope_parameters"].update(mrope_section=[8, 12, 12]))
    _refused(models.target, draft, "mrope_section", "1-D RoPE positions")


def test_decoupling_needs_a_multimodal_target(models: TinyModels, msd: Path,
                                              tmp_path: Path) -> None:
    """A text-only Qwen2 target: decoupling on is refused; off (a plain EAGLE-1 head) passes
    the pair checks (dims edited to the text LM's)."""
    from transformers import AutoConfig

    lm = AutoConfig.from_pretrained(models.text_lm)

    def to_lm(c, decouple):
        c.update(hidden_size=lm.hidden_size, vocab_size=lm.vocab_size)
        c["msd"].update(target_hidden_size=lm.hidden_size, decouple_visual_tokens=decouple)

    on = copy_model(msd, tmp_path / "on", lambda c: to_lm(c, True))
    _refused(models.text_lm, on, "decouple_visual_tokens is on", "text-only",
             "set decouple_visual_tokens to false")
    off = copy_model(msd, tmp_path / "off", lambda c: to_lm(c, False))
    _refused(models.text_lm, off, "model.fc.weight has shape [256, 512]")  # weights: next check


def test_wrong_target_family(msd: Path, tmp_path: Path) -> None:
    from vllm_massv.testing.gemma3 import build_gemma3_target

    target = build_gemma3_target(tmp_path / "gemma3")
    _refused(target, msd, "model_type 'gemma3'", "qwen2_vl, qwen2_5_vl")


@pytest.mark.mrv2
def test_msd_drafter_configures_on_mrv2(models: TinyModels, msd: Path) -> None:
    """MSD runs on the runner vLLM picks: Model Runner V2 here (no V1 pin, no refusal)."""
    from vllm_massv.patches.engine_config import uses_model_runner_v2

    assert uses_model_runner_v2(_engine_config(models.target, msd))


def test_pipeline_parallel_and_parallel_drafting_refused(models: TinyModels, msd: Path) -> None:
    """The encoder runs on the first pipeline stage, the drafter on the last; parallel drafting
    breaks the one-slot-per-request layout of the decoupled rows. Both refused before serving."""
    from vllm.engine.arg_utils import EngineArgs

    for spec_extra, overrides, fragment in (
            ({}, {"pipeline_parallel_size": 2}, "Encoder cache miss"),
            ({"parallel_drafting": True}, {}, "parallel_drafting")):
        with pytest.raises(ValueError, match="MSD drafter: unsupported vLLM mode") as info:
            EngineArgs(model=str(models.target),
                       speculative_config={**_spec(msd, "eagle"), **spec_extra},
                       **{**ENGINE_ARGS, **overrides}).create_engine_config()
        assert fragment in str(info.value), str(info.value)


# --- massv init --method msd ------------------------------------------------------------------
def test_init_msd_layout(models: TinyModels, tmp_path: Path, capsys) -> None:
    """The drafter directory follows the checkpoint contract and loads in the transformers
    twin."""
    from vllm_massv.drafters.msd.config import expected_weight_names
    from vllm_massv.drafters.msd.hf_model import MsdQwen2Drafter

    out = tmp_path / "msd"
    assert massv_main(["init", "--method", "msd", "--target", str(models.target), "--out",
                       str(out), "--no-decouple", "--num-speculative-tokens", "2"]) == 0
    printed = capsys.readouterr().out
    assert '"method": "eagle"' in printed and f"vllm serve {out}" in printed
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["EagleMsdQwen2ForCausalLM"] and cfg["model_type"] == "qwen2"
    assert cfg["num_hidden_layers"] == 1 and cfg["tie_word_embeddings"] is False
    assert "mrope_section" not in cfg["rope_parameters"]
    assert cfg["msd"]["decouple_visual_tokens"] is False and cfg["msd"]["target_hidden_size"] == 256
    assert sorted(load_file(out / "model.safetensors")) == sorted(expected_weight_names(1, True))
    assert (out / "tokenizer.json").is_file()
    assert not MsdQwen2Drafter.from_pretrained(out).decouple_visual_tokens
    # `vllm serve DIR` (tests/unit/test_speculators.py)
    assert cfg["speculators_model_type"] == "msd"
    assert cfg["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 2


def test_init_msd_text_only_target(models: TinyModels, tmp_path: Path, capsys) -> None:
    assert massv_main(["init", "--method", "msd", "--target", str(models.text_lm), "--out",
                       str(tmp_path / "x")]) == 2
    assert "text-only 'qwen2' model" in capsys.readouterr().err
