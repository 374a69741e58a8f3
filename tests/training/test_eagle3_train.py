"""EAGLE-3 head training and checkpoints on tiny models, without a vLLM engine.

The checkpoint contract vLLM reads, the draft
vocabulary mapping, the training-time-test unroll against a step-by-step chain, and
`massv train --method eagle3` (loss decrease, export, resume) on tiny models."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from test_msd_train import dataset  # noqa: F401  (the shared tiny `massv generate` data set)
from test_train import assert_same_loss_curve
from vllm_massv.drafters.eagle3.config import Eagle3Config, Eagle3ConfigError, default_aux_layer_ids
from vllm_massv.drafters.eagle3.init import draft_vocab_mapping, init_eagle3_drafter
from vllm_massv.drafters.eagle3.hf_model import Eagle3Drafter
from vllm_massv.drafters.eagle3 import train as eagle3
from vllm_massv.training.loop import TrainConfig, train


def _tiny_cfg(**kw) -> Eagle3Config:
    base = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=256,
                vocab_size=50, draft_vocab_size=50, eagle_aux_hidden_state_layer_ids=[1, 2, 3],
                target_num_layers=4, verifier="t", verifier_architecture="X")
    return Eagle3Config(**(base | kw))


def test_default_aux_layers() -> None:
    """vLLM/speculators' (2, L//2, L-3) where distinct; low/mid/high on shallow targets."""
    assert default_aux_layer_ids(28) == [2, 14, 25]      # Qwen2.5-VL-7B
    assert default_aux_layer_ids(6) == [1, 3, 5]         # the CPU testbed target
    assert default_aux_layer_ids(4) == [1, 2, 3]
    with pytest.raises(Eagle3ConfigError, match=">= 3 decoder layers"):
        default_aux_layer_ids(2)


@pytest.mark.parametrize("kw, message", [
    (dict(eagle_aux_hidden_state_layer_ids=[0, 2, 3]), r"outside \[1, 4\]"),
    (dict(eagle_aux_hidden_state_layer_ids=[1, 2, 5]), r"outside \[1, 4\]"),
    (dict(eagle_aux_hidden_state_layer_ids=[1, 1, 3]), "distinct"),
    (dict(draft_vocab_size=60), "draft_vocab_size 60 > "),
])
def test_config_rejects_bad_heads(kw, message) -> None:
    with pytest.raises((Eagle3ConfigError, ValueError), match=message):
        _tiny_cfg(**kw)


def test_draft_vocab_mapping() -> None:
    """The most frequent ids (ties by id), filled up from id 0; d2t maps draft id i to target
    id i + d2t[i] in increasing order (vLLM's `compute_logits`), t2d marks them."""
    counts = Counter({7: 10, 3: 10, 40: 5, 11: 1})
    d2t, t2d = draft_vocab_mapping(counts, 6, 50)
    targets = (torch.arange(6) + d2t).tolist()
    assert targets == [0, 1, 3, 7, 11, 40]
    assert t2d.nonzero().flatten().tolist() == targets
    d2t, _ = draft_vocab_mapping(counts, 3, 50)
    assert (torch.arange(3) + d2t).tolist() == [3, 7, 40]


def test_unroll_equals_the_draft_chain() -> None:
    """Training-time test: step j's output at row t equals the chain vLLM runs when it drafts
    from context row t -- a causal pass over rows 0..t (hidden fc(a)) followed by one appended
    row per earlier step (hidden: the previous output; token: the one step j consumed) at
    positions t+1..t+j. Fails for a wrong attention mask, position offset or hidden feedback."""
    torch.manual_seed(0)
    model = Eagle3Drafter(_tiny_cfg(draft_vocab_size=20, vocab_size=50))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    length, steps = 9, 3
    aux = torch.randn(1, length, 3 * 32)
    embeds = [torch.randn(1, length, 32) for _ in range(steps)]
    with torch.no_grad():
        outs = model.unroll(aux, embeds)
        g = model.combine_hidden_states(aux)
        for t in (0, 4, length - 1):
            hidden, emb = g[:, : t + 1], embeds[0][:, : t + 1]
            for j in range(steps):
                o = model.causal_forward(hidden, emb)[:, -1]
                assert torch.allclose(o, outs[j][:, t], atol=1e-5), (t, j)
                if j + 1 < steps:
                    hidden = torch.cat([hidden, o[:, None]], dim=1)
                    emb = torch.cat([emb, embeds[j + 1][:, t: t + 1]], dim=1)


def test_init_writes_what_vllm_reads(models, tmp_path) -> None:
    """`massv init --method eagle3`: vLLM's speculators parser turns the config into
    `Eagle3LlamaForCausalLM` with the head's aux layers and draft vocabulary; the tensors are
    the contract's (no embed_tokens: vLLM shares the target's); the lm_head is the target's,
    restricted to the draft vocabulary; the twin reloads it."""
    from safetensors.torch import load_file
    from vllm.transformers_utils.configs.speculators.base import SpeculatorsConfig

    counts = Counter({t: 1000 - t for t in range(100, 1100)})
    report = init_eagle3_drafter(models.target, tmp_path / "head", draft_vocab_size=512,
                                 token_counts=counts, num_speculative_tokens=3)
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    parsed = SpeculatorsConfig.extract_transformers_pre_trained_config(config)
    assert parsed["architectures"] == ["Eagle3LlamaForCausalLM"]
    assert parsed["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    assert parsed["draft_vocab_size"] == 512 and parsed["norm_before_fc"] is True
    assert "mrope_section" not in parsed["rope_parameters"]   # 1-D RoPE head
    assert SpeculatorsConfig.extract_vllm_speculative_config(config) == {
        "method": "eagle3", "num_speculative_tokens": 3}
    state = load_file(tmp_path / "head" / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in state.items()} == report.cfg.weight_shapes()
    assert not any("embed_tokens" in k for k in state)
    target = load_file(models.target / "model.safetensors")["lm_head.weight"]
    assert torch.equal(state["lm_head.weight"], target[state["t2d"]])
    assert (torch.arange(512) + state["d2t"]).tolist() == list(range(100, 612))
    twin = Eagle3Drafter.from_pretrained(tmp_path / "head")
    assert twin.cfg == report.cfg
    assert not twin.lm_head.weight.requires_grad


def test_init_refuses_reduced_vocab_without_data(models, tmp_path) -> None:
    with pytest.raises(Eagle3ConfigError, match="needs --data"):
        init_eagle3_drafter(models.target, tmp_path / "head", draft_vocab_size=512)
    with pytest.raises(Eagle3ConfigError, match="qwen2_vl"):
        init_eagle3_drafter(models.text_lm, tmp_path / "head2")


@pytest.fixture(scope="module")
def head(models, tmp_path_factory) -> Path:
    return init_eagle3_drafter(models.target, tmp_path_factory.mktemp("e3") / "init",
                               num_speculative_tokens=3).out_dir


def _cfg(models, head, data, out, **kw) -> TrainConfig:
    base = dict(phase=None, method="eagle3", drafter=str(head), data=str(data),
                target=str(models.target), out=str(out), max_steps=6, batch_size=4, lr=3e-3,
                eval_fraction=0.2, save_every=3, seed=0)
    return TrainConfig(**(base | kw))


def test_eagle3_training_lowers_loss_and_exports(models, head, dataset,  # noqa: F811
                                                 tmp_path) -> None:
    """Loss (TTT over k = 3 steps, KL) falls, first-draft agreement rises, only trainable
    weights change (lm_head frozen), and the export reloads as the same head."""
    from safetensors.torch import load_file

    out = tmp_path / "trained"
    final = train(_cfg(models, head, dataset, out, max_steps=12, save_every=0))
    log = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["eval_loss"] < 0.7 * log[0]["eval_loss"]
    assert log[-1]["eval_agreement"] > log[0]["eval_agreement"]
    before, after = load_file(head / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "fc.weight" in changed and "layers.0.self_attn.q_proj.weight" in changed
    assert "lm_head.weight" not in changed
    assert final["trainable_params"] == sum(
        v.numel() for k, v in after.items() if k != "lm_head.weight")
    assert Eagle3Drafter.from_pretrained(out).cfg == Eagle3Drafter.from_pretrained(head).cfg


def test_eagle3_resume_equals_uninterrupted(models, head, dataset, tmp_path) -> None:  # noqa: F811
    train(_cfg(models, head, dataset, tmp_path / "straight"))
    interrupted = tmp_path / "resumed"
    assert train(_cfg(models, head, dataset, interrupted, stop_after=4)) == {"stopped_at": 4}
    train(_cfg(models, head, dataset, interrupted))
    assert_same_loss_curve(tmp_path / "straight", interrupted, steps=6)


def test_loss_rows_cover_response_drafts() -> None:
    """Step j's loss rows t in [P-2, L-3-j]: the rows whose drafted token x_{t+2+j} is a
    response token of the sequence."""
    rows = eagle3.loss_rows(torch.tensor([4]), torch.tensor([10]), 12, 0)[0]
    assert rows.nonzero().flatten().tolist() == list(range(2, 8))
    rows = eagle3.loss_rows(torch.tensor([4]), torch.tensor([10]), 12, 2)[0]
    assert rows.nonzero().flatten().tolist() == list(range(2, 6))


@pytest.mark.parametrize("argv, message", [
    (["--method", "eagle3", "--phase", "sdvit"], "--phase is a MASSV option"),
    (["--method", "massv", "--phase", "sdvit", "--ttt-steps", "2"], "EAGLE-3 options"),
    (["--method", "eagle3", "--loss", "kl"], "--loss is a MASSV option"),
    (["--method", "eagle3", "--ttt-steps", "0"], "--ttt-steps must be >= 1"),
])
def test_train_cli_rejects_mixed_options(argv, message, capsys) -> None:
    from vllm_massv.cli import main

    assert main(["train", *argv, "--drafter", "d", "--data", "d", "--target", "t",
                 "--out", "o"]) == 2
    assert message in capsys.readouterr().err
