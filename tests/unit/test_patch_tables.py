"""Which patches each vLLM series gets, and the engine-config patch on vLLM 0.34's `VllmConfig`
(which has no `use_v2_model_runner`: guarding it is what keeps the plugin from breaking vLLM's
own import there). No engine; vLLM 0.34 is not installed, so its class is a stand-in."""

from __future__ import annotations

from types import SimpleNamespace

from vllm_massv import patches
from vllm_massv.patches import engine_config

V1_MODULES = {"vllm.v1.spec_decode.draft_model", "vllm.v1.spec_decode.eagle",
              "vllm.v1.sample.rejection_sampler"}
MRV2_ROUTING = "vllm.v1.worker.gpu.spec_decode.standalone_ar.speculator"


def test_patch_table_per_series() -> None:
    for version in ("0.32.0", "0.33.1"):
        table = patches.patches_for(version)
        assert V1_MODULES <= set(table) and MRV2_ROUTING in table
    table = patches.patches_for("0.34.0")
    assert set(table) == set(patches.COMMON_PATCHES)
    assert not V1_MODULES & set(table) and MRV2_ROUTING not in table


def test_engine_policy_on_a_config_class_without_the_runner_switch() -> None:
    calls = []

    class VllmConfig:  # vLLM 0.34: no use_v2_model_runner; MRV2 is the only runner
        def __post_init__(self) -> None:
            calls.append("stock")

    engine_config.apply_engine_policy(SimpleNamespace(VllmConfig=VllmConfig))
    assert not hasattr(VllmConfig, "use_v2_model_runner")
    cfg = VllmConfig()
    cfg.speculative_config = None  # not a drafter of ours: stock behaviour only
    cfg.__post_init__()
    assert calls == ["stock"]
    assert engine_config.uses_model_runner_v2(cfg) is True


def test_engine_policy_keeps_vllms_runner_choice_for_other_configs() -> None:
    class VllmConfig:  # vLLM 0.32/0.33
        speculative_config = None

        @property
        def use_v2_model_runner(self) -> bool:
            return True

        def __post_init__(self) -> None:
            pass

    engine_config.apply_engine_policy(SimpleNamespace(VllmConfig=VllmConfig))
    assert VllmConfig().use_v2_model_runner is True
    assert engine_config.uses_model_runner_v2(VllmConfig()) is True
