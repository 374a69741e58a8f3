"""One-argument serving config (`vllm_massv/speculators.py`, patch 6 in `vllm_massv/patches.py`),
without an engine: what `massv init` writes, how vLLM's speculators detection maps it, and the
errors for a verifier that is missing or is not the drafter's target. The served form is tested
in tests/test_serve_one_arg.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vllm_massv.config import MassvConfigError

TARGET_ARCH = "Qwen2_5_VLForConditionalGeneration"


@pytest.fixture(scope="module", autouse=True)
def patched():
    from vllm_massv import patches

    patches.install()


def _override(model: Path | str, speculative_config: dict | None = None):
    """vLLM's own speculators detection (`EngineArgs.create_engine_config` calls it first)."""
    from vllm.transformers_utils.config import maybe_override_with_speculators

    return maybe_override_with_speculators(str(model), None, trust_remote_code=False,
                                           vllm_speculative_config=speculative_config)


def _copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_init_writes_speculators_block(models) -> None:
    cfg = json.loads((models.blind / "config.json").read_text())
    assert cfg["speculators_model_type"] == "massv"
    spec = cfg["speculators_config"]
    assert spec["proposal_methods"][0]["speculative_tokens"] == 4
    assert spec["verifier"] == {"name_or_path": str(models.target),
                                "architectures": [TARGET_ARCH]}
    assert cfg["massv"]["target"] == str(models.target)


def test_registered_with_vllm_speculators_registry() -> None:
    from vllm.transformers_utils.configs.speculators.algos import SUPPORTED_SPECULATORS_TYPES

    from vllm_massv.speculators import update_massv

    assert SUPPORTED_SPECULATORS_TYPES["massv"] is update_massv
    assert "eagle3" in SUPPORTED_SPECULATORS_TYPES  # stock entries stay


def test_one_argument_maps_to_massv_draft_model(models) -> None:
    model, tokenizer, spec = _override(models.blind)
    assert model == tokenizer == str(models.target)
    assert spec == {"method": "draft_model", "num_speculative_tokens": 4,
                    "model": str(models.blind)}


def test_speculative_config_overrides_k(models) -> None:
    model, _, spec = _override(models.blind, {"num_speculative_tokens": 2, "method": "eagle3"})
    assert model == str(models.target)
    # k from the user; method and model stay dictated by the checkpoint (vLLM's rule)
    assert spec == {"method": "draft_model", "num_speculative_tokens": 2,
                    "model": str(models.blind)}


def test_engine_config_from_one_argument(models) -> None:
    """The full config vLLM builds for `vllm serve <drafter>` (MASSV pairing checks included)."""
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(model=str(models.blind), dtype="float32", max_model_len=2048,
                        enforce_eager=True).create_engine_config()
    spec = config.speculative_config
    assert config.model_config.model == str(models.target)
    assert (spec.method, spec.model, spec.num_speculative_tokens) == (
        "draft_model", str(models.blind), 4)
    from vllm_massv.patches import draft_is_massv

    assert draft_is_massv(spec)


def test_verifier_not_found(models, tmp_path: Path) -> None:
    gone = str(tmp_path / "moved-target")

    def edit(c):
        c["massv"]["target"] = gone
        c["speculators_config"]["verifier"]["name_or_path"] = gone

    draft = _copy(models.blind, tmp_path / "d", edit)
    with pytest.raises(MassvConfigError, match="cannot be found.*two arguments"):
        _override(draft)


def test_verifier_is_not_massv_target(models, tmp_path: Path) -> None:
    draft = _copy(models.blind, tmp_path / "d", lambda c: c["speculators_config"]["verifier"]
                  .update(name_or_path=str(models.text_lm)))
    with pytest.raises(MassvConfigError, match="is not the target it was built for"):
        _override(draft)


def test_verifier_of_another_architecture(models, tmp_path: Path) -> None:
    def edit(c):
        c["massv"]["target"] = str(models.text_lm)
        c["speculators_config"]["verifier"]["name_or_path"] = str(models.text_lm)

    draft = _copy(models.blind, tmp_path / "d", edit)
    with pytest.raises(MassvConfigError, match="is a Qwen2ForCausalLM model"):
        _override(draft)


def test_malformed_block(models, tmp_path: Path) -> None:
    draft = _copy(models.blind, tmp_path / "d", lambda c: c["speculators_config"].update(
        proposal_methods=[{"proposal_type": "greedy"}]))
    with pytest.raises(MassvConfigError, match="speculative_tokens"):
        _override(draft)


def test_other_speculators_types_keep_stock_behaviour(models, tmp_path: Path) -> None:
    """A non-MASSV speculators checkpoint still goes through vLLM's own validation."""
    draft = _copy(models.blind, tmp_path / "d",
                  lambda c: c.update(speculators_model_type="eagle3"))
    with pytest.raises(ValueError, match="Must provide transformer_layer_config"):
        _override(draft)
    assert _override(models.target) == (str(models.target), None, None)  # no block: unchanged
