"""One-argument serving config of MASSV and MSD drafters (`vllm_massv/speculators.py`), no engine.

Without an engine: what `massv init` writes, how vLLM's speculators
detection maps it, and the errors for a verifier that is missing or is not the drafter's target.
The served form is tested
in tests/serving/test_serve_one_arg.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vllm_massv.drafters.massv.config import MassvConfigError

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
    from vllm_massv.patches.drafters import draft_is_massv

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


# --- MSD drafters: `speculators_model_type: "msd"` -> method eagle ------------------------------
REPO = Path(__file__).resolve().parents[2]
TESTBED_MSD = ("benchmarks/testbed/models/drafter-msd",
               "benchmarks/testbed/models/drafter-msd-no-decouple")


@pytest.fixture(scope="module")
def msd_drafter(models, tmp_path_factory) -> Path:
    from vllm_massv.drafters.msd.init import init_msd_drafter

    return init_msd_drafter(models.target, tmp_path_factory.mktemp("msd") / "msd",
                            num_speculative_tokens=3).out_dir


def test_msd_init_writes_speculators_block(models, msd_drafter) -> None:
    cfg = json.loads((msd_drafter / "config.json").read_text())
    assert cfg["speculators_model_type"] == "msd"
    spec = cfg["speculators_config"]
    assert spec["algorithm"] == "msd"
    assert spec["proposal_methods"][0]["speculative_tokens"] == 3
    assert spec["verifier"] == {"name_or_path": str(models.target),
                                "architectures": [TARGET_ARCH]}
    from vllm.transformers_utils.configs.speculators.algos import SUPPORTED_SPECULATORS_TYPES

    from vllm_massv.speculators import update_massv

    assert SUPPORTED_SPECULATORS_TYPES["msd"] is update_massv


def test_msd_one_argument_maps_to_eagle(models, msd_drafter) -> None:
    model, tokenizer, spec = _override(msd_drafter)
    assert model == tokenizer == str(models.target)
    assert spec == {"method": "eagle", "num_speculative_tokens": 3, "model": str(msd_drafter)}
    # k from the user's --speculative-config; method and model stay the checkpoint's
    _, _, spec = _override(msd_drafter, {"num_speculative_tokens": 5, "method": "draft_model"})
    assert spec == {"method": "eagle", "num_speculative_tokens": 5, "model": str(msd_drafter)}


@pytest.mark.parametrize("drafter", TESTBED_MSD)
def test_msd_engine_config_from_one_argument(drafter, monkeypatch) -> None:
    """`vllm serve benchmarks/testbed/models/drafter-msd` (from the repo root, as the testbed's
    relative target path needs): the target with method eagle, the drafter dir and k = 4; the
    MSD pairing checks pass; a --speculative-config k overrides the checkpoint's."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_massv.patches.drafters import draft_is_msd

    monkeypatch.chdir(REPO)
    args = dict(model=drafter, dtype="float32", max_model_len=2048, enforce_eager=True)
    config = EngineArgs(**args).create_engine_config()
    spec = config.speculative_config
    assert config.model_config.model == "benchmarks/testbed/models/target"
    assert (spec.method, spec.model, spec.num_speculative_tokens) == ("eagle", drafter, 4)
    assert draft_is_msd(spec)
    config = EngineArgs(**args, speculative_config={"num_speculative_tokens": 2}
                        ).create_engine_config()
    assert (config.speculative_config.method, config.speculative_config.num_speculative_tokens
            ) == ("eagle", 2)


def test_msd_verifier_not_found(msd_drafter, tmp_path: Path) -> None:
    gone = str(tmp_path / "moved-target")

    def edit(c):
        c["msd"]["target"] = gone
        c["speculators_config"]["verifier"]["name_or_path"] = gone

    draft = _copy(msd_drafter, tmp_path / "d", edit)
    with pytest.raises(MassvConfigError, match="cannot be found.*two arguments"):
        _override(draft)


def test_msd_verifier_is_not_msd_target(models, msd_drafter, tmp_path: Path) -> None:
    draft = _copy(msd_drafter, tmp_path / "d", lambda c: c["speculators_config"]["verifier"]
                  .update(name_or_path=str(models.text_lm)))
    with pytest.raises(MassvConfigError, match="is not the target it was built for, msd.target="):
        _override(draft)


def test_msd_verifier_of_another_architecture(models, msd_drafter, tmp_path: Path) -> None:
    def edit(c):
        c["msd"]["target"] = str(models.text_lm)
        c["speculators_config"]["verifier"]["name_or_path"] = str(models.text_lm)

    draft = _copy(msd_drafter, tmp_path / "d", edit)
    with pytest.raises(MassvConfigError, match="is a Qwen2ForCausalLM model"):
        _override(draft)


def test_msd_verifier_missing(msd_drafter, tmp_path: Path) -> None:
    draft = _copy(msd_drafter, tmp_path / "d",
                  lambda c: c["speculators_config"].pop("verifier"))
    with pytest.raises(MassvConfigError, match="needs verifier.name_or_path"):
        _override(draft)
    from vllm_massv.drafters.msd.config import MsdConfigError

    no_block = _copy(msd_drafter, tmp_path / "e", lambda c: c.pop("msd"))
    with pytest.raises(MsdConfigError, match="no 'msd' block"):
        _override(no_block)
