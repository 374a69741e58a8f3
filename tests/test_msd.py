"""MSD served by vLLM (issue 11): lossless, and vLLM's drafts equal the transformers twin's.

Engines (tiny random Qwen2.5-VL target, CPU, fp32, eager, chunked prefill of 64 tokens, prefix
caching; `conftest.ENGINE_ARGS`): the MSD drafter with decoupled visual tokens, and the ablation
without them, both `{"method": "eagle", k=3}`, on the mixed batch (text-only, one image, two
images, image mid-prompt, a long chunked prompt; run concurrently).

The drafters are untrained (seeded random weights, `vllm_massv.testing.msd.build_msd_drafter`),
so acceptance is ~0; the checks therefore compare *every* draft vLLM proposes (recorded inside
the worker) with the transformers twin (`vllm_massv.msd.hf_model.MsdQwen2Drafter`) fed the same
target hidden states and image embeddings (`training.features.TargetHiddenStates`, a
transformers forward of the target with its images), 1-D absolute positions. Any error in the
token shift, the image-row mask, decoupling, positions or draft KV slots changes drafts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import IMAGE_PROMPTS, emitted_accepted, engine, generate, mixed_batch, token_ids
from vllm_massv.testing import eagle3 as te
from vllm_massv.testing import msd as tm

K = 3
ENV = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}  # LLM.collective_rpc with functions


def run_msd(target: Path, drafter: Path, env: dict | None = None, rerun: bool = False) -> dict:
    """Serve `drafter` for `target` on the mixed batch; outputs, recorded drafts, worker facts.
    With `rerun`, the image prompts run a second time (prefix-cache hits) into `rerun`."""
    with engine(target, {"method": "eagle", "model": str(drafter), "num_speculative_tokens": K},
                env={**ENV, **(env or {})}) as llm:
        llm.collective_rpc(tm.install_draft_recorder)
        llm.collective_rpc(te.install_logit_recorder)   # for the partial-prefill chunk ends
        outputs = generate(llm, mixed_batch(target))
        result = {"outputs": outputs, "log": llm.collective_rpc(tm.read_draft_log)[0],
                  "rows": te.chunk_end_overrides(llm.collective_rpc(te.read_chunk_ends)[0],
                                                 outputs),
                  "proposer": llm.collective_rpc(tm.proposer_class)[0],
                  "cpu_sampler_fix": llm.collective_rpc(tm.cpu_sampler_fix_active)[0]}
        if rerun:
            llm.collective_rpc(tm.install_draft_recorder)   # clears the log
            llm.collective_rpc(te.install_logit_recorder)
            prompts = {n: p for n, p in mixed_batch(target).items() if n in IMAGE_PROMPTS}
            rerun = generate(llm, prompts)
            result["rerun"] = {"outputs": rerun, "log": llm.collective_rpc(tm.read_draft_log)[0],
                               "rows": te.chunk_end_overrides(
                                   llm.collective_rpc(te.read_chunk_ends)[0], rerun)}
        return result


@pytest.fixture(scope="module")
def drafters(models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("msd")
    return {"on": tm.build_msd_drafter(models.target, root / "on"),
            "off": tm.build_msd_drafter(models.target, root / "off", decouple=False)}


@pytest.fixture(scope="module")
def features(models, tmp_path_factory):
    from vllm_massv.training.features import TargetHiddenStates

    return TargetHiddenStates(models.target, cache_dir=tmp_path_factory.mktemp("features"))


@pytest.fixture(scope="module")
def twin(drafters):
    from vllm_massv.msd.hf_model import MsdQwen2Drafter

    return {k: MsdQwen2Drafter.from_pretrained(d).eval() for k, d in drafters.items()}


@pytest.fixture(scope="module")
def msd_on(models, drafters):
    return run_msd(models.target, drafters["on"], rerun=True)


@pytest.fixture(scope="module")
def msd_off(models, drafters):
    return run_msd(models.target, drafters["off"])


def _compare(run, models, features, drafter, **kwargs):
    result = tm.draft_mismatches(run["log"], run["outputs"], mixed_batch(models.target),
                                 features, drafter, row_tokens=run["rows"], **kwargs)
    for name, r in result.items():
        print(f"{name}: {r['steps']} steps, mismatches per draft position {r['mismatches']}, "
              f"ties {r['ties']}")
    return result


def test_lossless_decoupled(msd_on, reference):
    assert token_ids(msd_on["outputs"]) == reference


def test_lossless_ablation(msd_off, reference):
    assert token_ids(msd_off["outputs"]) == reference


def test_msd_engine_proposer_and_cpu_sampler_fix(msd_on):
    """The plugin's proposer serves MSD, and the CPU rejection-sampler fix is installed in the
    worker (as for MASSV engines)."""
    assert msd_on["proposer"] == "MsdEagleProposer"
    assert msd_on["cpu_sampler_fix"] is True


def test_drafts_match_transformers_twin(msd_on, models, features, twin):
    result = _compare(msd_on, models, features, twin["on"])
    assert all(r["steps"] >= 20 for r in result.values())
    assert all(sum(r["mismatches"]) == 0 for r in result.values()), result
    assert sum(r["ties"] for r in result.values()) <= 3  # near-equal logits (< 0.01 apart)


def test_prefix_cache_rerun(msd_on, models, features, twin, reference):
    """The image prompts again in the same engine: prompt blocks come from the prefix cache
    (target and draft KV), output lossless, drafts still equal the twin's."""
    rerun = msd_on["rerun"]
    for name, out in rerun["outputs"].items():
        assert out.num_cached_tokens and out.num_cached_tokens >= 32, name  # >= one KV block
    assert token_ids(rerun["outputs"]) == {n: reference[n] for n in IMAGE_PROMPTS}
    result = _compare(rerun, models, features, twin["on"])
    assert all(sum(r["mismatches"]) == 0 for r in result.values()), result


def test_image_rows_bypass_fc(msd_on, models, features, twin):
    """Fails if image rows receive the fc mix while decoupling is on: the same vLLM drafts,
    compared with the twin forced to the fc mix at every row, disagree on every image prompt
    (and agree on the text-only one)."""
    result = _compare(msd_on, models, features, twin["on"], decouple=False)
    assert sum(result["text"]["mismatches"]) == 0
    for name in ("astronaut", "two_images", "mid_prompt", "gradient_long"):
        assert sum(result[name]["mismatches"]) >= result[name]["steps"] // 2, name


def test_ablation_drafts_match_transformers_twin(msd_off, models, features, twin):
    result = _compare(msd_off, models, features, twin["off"])
    assert all(sum(r["mismatches"]) == 0 for r in result.values()), result


def test_accepted_counts_equal_replay(msd_on, models, features, twin):
    """vLLM's per-step accepted counts equal a greedy replay with the twin's own drafts."""
    batch = mixed_batch(models.target)
    for name, out in msd_on["outputs"].items():
        images = batch[name].get("multi_modal_data", {}).get("image")
        images = [] if images is None else (images if isinstance(images, list) else [images])
        prompt, tokens = list(out.prompt_token_ids), list(out.outputs[0].token_ids)
        seq = prompt + tokens
        (hidden, image_embeds), = features([seq], [images], [len(prompt)])
        metrics, expected, m = out.outputs[0].spec_decode_metrics, [], 1
        for drafted in metrics.per_step_drafted:
            drafts, _ = tm.twin_drafts(twin["on"], features.embed_tokens, features.lm_head, seq,
                                       hidden[0], image_embeds if images else None, len(prompt),
                                       len(prompt) + m, drafted, features.image_token_id,
                                       row_tokens=msd_on["rows"][name])
            a = 0
            while a < drafted and m + a < len(tokens) and drafts[a] == tokens[m + a]:
                a += 1
            expected.append(a)
            m += a + 1
        assert emitted_accepted(metrics.per_step_accepted, len(tokens)) == expected, name
