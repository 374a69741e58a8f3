"""The startup warnings of the engine-config hook (`vllm_massv/patches/engine_config.py`), on
stand-in configs (no engine, no model files):

* a drafter whose context is shorter than the target's: both lengths, what this engine does past
  the drafter's length (V1: drafting stops for the whole batch; MRV2: max_model_len lowered, by
  vLLM 0.33/0.34 or, on 0.32, by the plugin), and the fix; for MASSV and MSD configs only;
* a drafter served with another target than the one it records (`recorded_target_mismatch`).

The same warnings through vLLM's real config path: `tests/massv/test_errors.py`.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_massv.drafters.massv.config import MassvConfig, model_basename, recorded_target_mismatch
from vllm_massv.drafters.msd.config import MsdConfig
from vllm_massv.patches import engine_config
from vllm_massv.patches.engine_config import context_length_warning

QWEN25_VL = "Qwen2_5_VLForConditionalGeneration"
QWEN2_VL = "Qwen2VLForConditionalGeneration"
MASSV_BLOCK = {"vision_feature_dim": 3584, "orig_vocab_size": 151936, "image_token_id": 151655,
               "video_token_id": 151656, "target": "Qwen/Qwen2.5-VL-7B-Instruct",
               "target_architecture": QWEN25_VL}


class Captured:
    """The lines the engine-config hook emits, by level."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str]] = []

    def at(self, level: str) -> list[str]:
        return [m for lv, m in self.records if lv == level]


@pytest.fixture
def massv_log(monkeypatch: pytest.MonkeyPatch) -> Captured:
    """What the hook logs on vLLM's "vllm.massv" logger (read where it is emitted: vLLM resets
    its loggers' handlers while it builds a config)."""
    captured, stock_emit = Captured(), engine_config.emit

    def emit(level: str, message: str) -> None:
        captured.records.append((level, message))
        stock_emit(level, message)

    engine_config.LOGGED.clear()  # each message is logged once per process
    monkeypatch.setattr(engine_config, "emit", emit)
    return captured


# --- (a) drafter context shorter than the target's -----------------------------------------------
def test_context_warning_texts() -> None:
    """README's recipe pair: Qwen2.5-1.5B (32768) drafting for Qwen2.5-VL-7B (128000), k = 4."""
    v1 = context_length_warning("MASSV", 32768, 128000, 4, "v1_skip")
    assert v1 == (
        "MASSV drafter context is shorter than the target's: the drafter's max_model_len is "
        "32768, the target's 128000. vLLM's V1 runner drafts a step only when the longest "
        "sequence in the batch plus k = 4 fits in the drafter "
        "(GPUModelRunner._input_fits_in_drafter): once any request is longer than 32764 "
        "tokens, speculative decoding stops for every request in its batch until that request "
        "finishes (τ = 1; output unchanged). To keep drafting, serve with --max-model-len 32768 "
        "(or less), or give the drafter a longer context if its RoPE allows it: raise "
        "max_position_embeddings in the drafter's config.json, with a RoPE scaling (e.g. YaRN) "
        "that its base LM supports (see the LM's model card).")
    by_vllm = context_length_warning("MASSV", 32768, 128000, 4, "lowered_by_vllm")
    assert "vLLM lowered the served max_model_len to 32768 " \
           "(VllmConfig._limit_max_model_len_to_draft): longer requests are refused." in by_vllm
    by_plugin = context_length_warning("MASSV", 32768, 128000, 4, "lowered_by_plugin")
    assert "vLLM 0.32's Model Runner V2 does not check the drafter's length" in by_plugin
    assert "lowered to 32768, as vLLM 0.33/0.34 do" in by_plugin
    unchecked = context_length_warning("MSD", 2048, 4096, 3, "mrv2_unchecked")
    assert unchecked.startswith("MSD drafter context is shorter than the target's: the "
                                "drafter's max_model_len is 2048, the target's 4096.")
    assert "--max-model-len 2048 (or less)" in unchecked
    for text in (by_vllm, by_plugin, unchecked):
        assert "raise max_position_embeddings in the drafter's config.json" in text


def _massv_hf_config(**block) -> SimpleNamespace:
    return SimpleNamespace(architectures=["MassvQwen2ForCausalLM"],
                           massv={**MASSV_BLOCK, **block})


def _vllm_config_class(v2_runner: bool, vllm_lowers: bool) -> type:
    """A stand-in `VllmConfig` (vLLM 0.32/0.33 shape) whose stock `__post_init__` lowers
    max_model_len to the draft's when `vllm_lowers` (vLLM 0.33/0.34 on MRV2)."""

    class VllmConfig:
        def __init__(self, spec, target_len: int) -> None:
            self.speculative_config = spec
            self.model_config = SimpleNamespace(max_model_len=target_len, hf_text_config=None)
            self.parallel_config = SimpleNamespace(pipeline_parallel_size=1)
            self.scheduler_config = SimpleNamespace(disable_hybrid_kv_cache_manager=None)

        @property
        def use_v2_model_runner(self) -> bool:
            return v2_runner

        def __post_init__(self) -> None:
            draft = self.speculative_config.draft_model_config
            if vllm_lowers and draft.max_model_len < self.model_config.max_model_len:
                self.model_config.max_model_len = draft.max_model_len

    engine_config.apply_engine_policy(SimpleNamespace(VllmConfig=VllmConfig))
    return VllmConfig


def _spec(hf_config, draft_len: int, method: str = "draft_model", **extra) -> SimpleNamespace:
    draft = SimpleNamespace(hf_config=hf_config, max_model_len=draft_len,
                            hf_text_config=SimpleNamespace(sliding_window=None))
    return SimpleNamespace(**{"method": method, "draft_model_config": draft,
                              "num_speculative_tokens": 4, "max_model_len": None, **extra})


@pytest.mark.parametrize("v2_runner, vllm_lowers, outcome, served_len", [
    (False, False, "v1_skip", 128000),             # V1 runner (0.32/0.33)
    (True, True, "lowered_by_vllm", 32768),        # MRV2 on 0.33/0.34
    (True, False, "lowered_by_plugin", 32768),     # MRV2 on 0.32
], ids=["v1", "mrv2-vllm-lowers", "mrv2-0.32"])
def test_context_warning_on_massv_config(massv_log, v2_runner, vllm_lowers, outcome,
                                         served_len) -> None:
    cls = _vllm_config_class(v2_runner, vllm_lowers)
    cfg = cls(_spec(_massv_hf_config(), 32768), 128000)
    cfg.__post_init__()
    assert massv_log.at("warning") == [
        context_length_warning("MASSV", 32768, 128000, 4, outcome)]
    assert cfg.model_config.max_model_len == served_len


def test_no_context_warning_when_it_fits_or_the_user_chose(massv_log) -> None:
    cls = _vllm_config_class(False, False)
    for cfg in (cls(_spec(_massv_hf_config(), 32768), 32768),          # --max-model-len 32768
                cls(_spec(_massv_hf_config(), 128000), 32768),
                cls(_spec(_massv_hf_config(), 1024, max_model_len=1024), 4096)):  # spec's own
        cfg.__post_init__()
    assert massv_log.at("warning") == []


def test_no_context_warning_or_change_for_other_drafters(massv_log) -> None:
    """A stock draft model (or an EAGLE head) with a shorter context: vLLM's own behaviour, no
    plugin warning and no plugin change of max_model_len (also on vLLM 0.32's MRV2)."""
    stock_lm = SimpleNamespace(architectures=["Qwen2ForCausalLM"])
    eagle = SimpleNamespace(architectures=["Eagle3LlamaForCausalLM"])
    for v2_runner in (False, True):
        cls = _vllm_config_class(v2_runner, False)
        for spec in (_spec(stock_lm, 32768), _spec(eagle, 2048, method="eagle3")):
            cfg = cls(spec, 128000)
            cfg.__post_init__()
            assert cfg.model_config.max_model_len == 128000
    assert massv_log.records == []


# --- (b) the served target vs the target the drafter records ------------------------------------
def test_model_basename() -> None:
    for name in ("Qwen/Qwen2.5-VL-7B-Instruct", "/models/Qwen2.5-VL-7B-Instruct/",
                 "/root/.cache/huggingface/hub/models--Qwen--Qwen2.5-VL-7B-Instruct/snapshots/"
                 "cc594898137f460bfe9f0759e9844b3ce807cfb5", "qwen2.5-vl-7b-instruct"):
        assert model_basename(name) == "qwen2.5-vl-7b-instruct", name


def test_sibling_target_architecture_warns() -> None:
    """A drafter built for Qwen2-VL-7B served with Qwen2.5-VL-7B: same width (3584), vocabulary
    and image token id, so every pairing check passes."""
    block = MassvConfig.model_validate({**MASSV_BLOCK, "target": "Qwen/Qwen2-VL-7B-Instruct",
                                        "target_architecture": QWEN2_VL})
    served = SimpleNamespace(architectures=[QWEN25_VL])
    level, message = recorded_target_mismatch(block, served, "Qwen/Qwen2.5-VL-7B-Instruct")
    assert level == "warning"
    assert message == (
        "this MASSV drafter was built for Qwen/Qwen2-VL-7B-Instruct "
        "(Qwen2VLForConditionalGeneration), but the served target Qwen/Qwen2.5-VL-7B-Instruct "
        "is a Qwen2_5_VLForConditionalGeneration model. The pairing checks pass (same widths, "
        "vocabulary and image token ids), so the output stays identical to the target alone, "
        "but a drafter trained for another model drafts that model's answers: expect low "
        "acceptance. Serve the drafter's own target, or build and train one for this target "
        "(`massv init --target Qwen/Qwen2.5-VL-7B-Instruct ...`). If this drafter was trained "
        "for this target, record it in the drafter's config.json (massv.target and "
        "massv.target_architecture, and speculators_config.verifier) to silence this warning.")


def test_msd_sibling_target_warns() -> None:
    block = MsdConfig(target="Qwen/Qwen2-VL-7B-Instruct", target_architecture=QWEN2_VL,
                      target_hidden_size=3584, image_token_id=151655)
    level, message = recorded_target_mismatch(
        block, SimpleNamespace(architectures=[QWEN25_VL]), "/models/qwen25vl")
    assert level == "warning"
    assert message.startswith("this MSD drafter was built for Qwen/Qwen2-VL-7B-Instruct")
    assert "(msd.target and msd.target_architecture" in message


def test_recorded_target_matches_or_is_unknown() -> None:
    served = SimpleNamespace(architectures=[QWEN25_VL])
    block = MassvConfig.model_validate(MASSV_BLOCK)
    # hub name vs a local copy or the hub cache: the same model
    for name in ("Qwen/Qwen2.5-VL-7B-Instruct", "/data/models/Qwen2.5-VL-7B-Instruct",
                 "/hf/models--Qwen--Qwen2.5-VL-7B-Instruct/snapshots/abc123"):
        assert recorded_target_mismatch(block, served, name) is None, name
    # nothing recorded: nothing said
    empty = MassvConfig.model_validate({**MASSV_BLOCK, "target": "", "target_architecture": ""})
    assert recorded_target_mismatch(empty, served, "org/anything") is None
    # the served target declares no architecture: no architecture comparison
    assert recorded_target_mismatch(block, SimpleNamespace(architectures=None),
                                    "Qwen/Qwen2.5-VL-7B-Instruct") is None


def test_same_architecture_other_checkpoint_is_an_info_line() -> None:
    block = MassvConfig.model_validate(MASSV_BLOCK)
    level, message = recorded_target_mismatch(
        block, SimpleNamespace(architectures=[QWEN25_VL]), "org/Qwen2.5-VL-7B-finetuned")
    assert level == "info"
    assert message == (
        "this MASSV drafter records its target as Qwen/Qwen2.5-VL-7B-Instruct; serving it with "
        "org/Qwen2.5-VL-7B-finetuned (Qwen2_5_VLForConditionalGeneration). If that is another "
        "checkpoint than the one it was trained for (a fine-tune, another size), expect lower "
        "acceptance.")
