"""The Gemma3 family end to end with MASSV, on tiny Gemma3 models built locally.

The models
(`vllm_massv.testing.gemma3`: a `Gemma3ForConditionalGeneration` target with sliding and full
layers, 16 image tokens per image, vocab 1088; a `gemma3_text` draft LM with vocab 1024, so the
image token 1024 is out of its vocabulary, as Gemma3-1B's 262144 is).

massv init -> massv generate (the target answers a mixed set: text-only, one image, two images)
-> the sanity drafter serves it losslessly -> massv train (align, sdvit) -> the trained drafter
serves it losslessly, and its per-step acceptance inside vLLM equals a transformers replay.
Four engines in all (~3 min on 2 CPU cores).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from tests.support import recorders
from tests.support.data import COLOURS, shape_records
from tests.support.engine import engine, spec_config
from tests.support.profile import ENGINE_ARGS, cli_flags
from tests.support.replay import (emitted_accepted, massv_replay,
                                  prompt_logprobs_vs_transformers)
from vllm_massv.cli import main as massv
from vllm_massv.drafters.massv.config import MassvConfigError
from vllm_massv.drafters.massv.init import init_drafter
from vllm_massv.testing import gemma3 as g3

pytestmark = pytest.mark.slow
K = 3
MAX_TOKENS = 24
GEMMA3_ENGINE = {"limit_mm_per_prompt": {"image": 2}}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gemma3")
    target = g3.build_gemma3_target(root / "target")
    text_lm = g3.build_gemma3_text_lm(root / "text_lm")
    sanity = init_drafter(target, target, root / "sanity", projector="identity").out_dir
    return {"root": root, "target": target, "text_lm": text_lm, "sanity": sanity}


@pytest.fixture(scope="module")
def data(models) -> dict:
    """`massv generate` on a mixed LLaVA set: 36 one-image shape prompts, 6 two-image prompts,
    2 skimage photos, 3 text-only prompts. The target's greedy answers are the reference."""
    from vllm_massv import testing as mt

    root = models["root"] / "llava"
    root.mkdir()
    records = shape_records(root)
    for i, (a, b) in enumerate(zip(list(COLOURS)[:6], list(COLOURS)[1:] + ["red"])):
        records.append({"id": f"pair_{i}", "image": [f"big_{a}_circle.png", f"small_{b}_square.png"],
                        "conversations": [{"from": "human",
                                           "value": "<image>\n<image>\nCompare the two images."}]})
    for name in ("astronaut", "chelsea"):
        mt.sample_images()[name].save(root / f"{name}.png")
        records.append({"id": name, "image": f"{name}.png", "conversations": [
            {"from": "human", "value": "What is in this photo? <image>"}]})
    for i, text in enumerate(("Count from one to ten.", "Name three colours.",
                              "What shape has three sides?")):
        records.append({"id": f"text_{i}", "conversations": [{"from": "human", "value": text}]})
    (root / "data.json").write_text(json.dumps(records))
    out = models["root"] / "data"
    assert massv(["generate", "--target", str(models["target"]), "--llava-json",
                  str(root / "data.json"), "--out", str(out), "--max-tokens", str(MAX_TOKENS),
                  *cli_flags(), "--max-model-len", "2048",
                  "--max-num-seqs", "4", "--max-num-batched-tokens", "64", "--no-progress",
                  "--engine-arg=block_size=32", "--engine-arg=seed=0",
                  f"--engine-arg=limit_mm_per_prompt={json.dumps({'image': 2})}"]) == 0
    rows = [r for f in sorted((out / "train").glob("part-*.parquet"))
            for r in pq.read_table(f).to_pylist()]
    return {"dir": out, "rows": sorted(rows, key=lambda r: r["id"]), "n": len(records)}


def prompts_of(rows) -> dict[str, dict]:
    from PIL import Image

    out = {}
    for r in rows:
        p = {"prompt": r["prompt"]}
        if r["images"]:
            p["multi_modal_data"] = {"image": [Image.open(x).convert("RGB") for x in r["images"]]}
        out[r["id"]] = p
    return out


def serve(target: Path, drafter: Path, rows, read_encoder_cache: bool = False) -> dict:
    """Greedy outputs of `rows` with `drafter` (k=K), and, if asked, vLLM's cached image
    embeddings afterwards."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    prompts = prompts_of(rows)
    env = recorders.ENV if read_encoder_cache else None
    with engine(target, spec_config(drafter, K), env=env, **GEMMA3_ENGINE) as llm:
        outs = llm.generate(list(prompts.values()), params, use_tqdm=False)
        cached = (list(llm.collective_rpc(recorders.vllm_encoder_cache)[0].values())
                  if read_encoder_cache else [])
    return {"outputs": dict(zip(prompts, outs)), "encoder_cache": cached}


def acceptance(outputs: dict, names) -> tuple[int, int]:
    acc = drafted = 0
    for n in names:
        m = outputs[n].outputs[0].spec_decode_metrics
        acc, drafted = acc + sum(m.per_step_accepted), drafted + sum(m.per_step_drafted)
    return acc, drafted


# --- no engine ---------------------------------------------------------------------------------
def test_init_builds_gemma3_drafter(models, tmp_path):
    """`massv init` for a Gemma3 pair: the architecture, the padded vocabulary (image token
    out of the LM's vocab), every layer full-attention, per-layer-type RoPE kept."""
    report = init_drafter(models["target"], models["text_lm"], tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["architectures"] == ["MassvGemma3ForCausalLM"]
    assert cfg["model_type"] == "gemma3_text" and cfg["sliding_window"] is None
    assert cfg["vocab_size"] == g3.TARGET_VOCAB_SIZE and report.padded_rows == 64
    assert report.massv.orig_vocab_size == g3.TEXT_VOCAB_SIZE == g3.IMAGE_TOKEN_ID
    assert report.massv.vision_feature_dim == 64 and report.massv.positions == "1d"
    assert set(cfg["rope_parameters"]) == {"full_attention", "sliding_attention"}
    with pytest.raises(MassvConfigError, match="1-D positions"):
        init_drafter(models["target"], models["text_lm"], tmp_path / "m", positions="mrope")
    from vllm_massv import testing as mt
    qwen_lm = mt.build_text_lm(tmp_path / "qwen_lm")
    with pytest.raises(MassvConfigError, match="gemma3_text"):
        init_drafter(models["target"], qwen_lm, tmp_path / "q")


def test_hf_drafter_scales_tokens_not_images(models, tmp_path):
    """Token rows are the LM's embedding × √hidden; image rows are the projector's output,
    unscaled (transformers `Gemma3Model.forward`, vLLM `Gemma3Model.embed_input_ids`); padded
    vocab rows get -inf logits."""
    from vllm_massv.drafters.massv.hf_model import MassvGemma3ForCausalLM, drafter_class

    init_drafter(models["target"], models["text_lm"], tmp_path / "d")
    assert drafter_class(tmp_path / "d") is MassvGemma3ForCausalLM
    model = MassvGemma3ForCausalLM.from_pretrained(tmp_path / "d", dtype=torch.float32).eval()
    n = g3.MM_TOKENS_PER_IMAGE
    ids = torch.tensor([[g3.BOS_ID, 300, g3.BOI_ID] + [g3.IMAGE_TOKEN_ID] * n + [g3.EOI_ID, 301]])
    feats = torch.randn(n, 64)
    with torch.no_grad():
        emb = model.embed(ids, feats)
        raw = model.model.embed_tokens.weight
        torch.testing.assert_close(emb[0, 1], raw[300] * model.config.hidden_size ** 0.5)
        torch.testing.assert_close(emb[0, 3:3 + n], model.mm_projector(feats))
        logits = model(input_ids=ids, image_embeds=feats).logits
    assert torch.isinf(logits[0, :, g3.TEXT_VOCAB_SIZE:]).all()
    assert torch.isfinite(logits[0, :, :g3.TEXT_VOCAB_SIZE]).all()


def test_hybrid_kv_cache_manager_turned_off_only_for_massv(models):
    """Gemma3 target + MASSV drafter: one KV-cache group needs the hybrid manager off; the
    same target without speculation keeps vLLM's default; an explicit enable is refused."""
    from vllm.engine.arg_utils import EngineArgs

    def build(**kw):
        return EngineArgs(model=str(models["target"]), dtype=ENGINE_ARGS["dtype"], block_size=32,
                          max_model_len=512, **kw).create_engine_config()

    spec = spec_config(models["sanity"], K)
    assert build(speculative_config=spec).scheduler_config.disable_hybrid_kv_cache_manager
    assert build().scheduler_config.disable_hybrid_kv_cache_manager is False
    with pytest.raises(Exception, match="hybrid KV-cache manager off"):
        build(speculative_config=spec, disable_hybrid_kv_cache_manager=False)


# --- engines -----------------------------------------------------------------------------------
def test_generate_wrote_every_prompt(data):
    assert len(data["rows"]) == data["n"]
    kinds = {sum(1 for r in data["rows"] if len(r["images"]) == k) for k in (0, 1, 2)}
    assert 0 not in kinds, "text-only, one-image and two-image prompts all present"


@pytest.fixture(scope="module")
def sanity_run(models, data):
    return serve(models["target"], models["sanity"], data["rows"], read_encoder_cache=True)


@pytest.mark.both_runners
def test_sanity_drafter_lossless_and_accepts_all(sanity_run, data):
    """The target's own language model as drafter (identity projector): greedy output equals
    the target alone on the mixed batch, and drafts on image prompts are accepted. On CPU the
    figure is 100%: vLLM's CPU attention ignores Gemma3's bidirectional attention over image
    tokens (`mm_req_doc_ranges`), so the target is causal there, like the drafter. On GPU
    (FlashAttention/Triton honour the ranges) the target attends bidirectionally within each
    image while the drafter stays causal, so acceptance there is expected below 100%."""
    outs = sanity_run["outputs"]
    for r in data["rows"]:
        assert list(outs[r["id"]].outputs[0].token_ids) == r["token_ids"], r["id"]
    image_ids = [r["id"] for r in data["rows"] if r["images"]]
    acc, drafted = acceptance(outs, image_ids)
    print(f"Gemma3 sanity drafter, image prompts: acceptance {acc}/{drafted} = "
          f"{acc / drafted:.3f} (k={K})")
    assert drafted > 0 and acc / drafted > 0.95


@pytest.mark.both_runners
def test_training_features_match_vllm(sanity_run, models, data):
    """The transformers Gemma3 image path (SigLIP + multimodal projector) == what vLLM caches
    and hands the drafter."""
    from PIL import Image

    from vllm_massv.training.features import TargetImageEncoder

    encoder = TargetImageEncoder(models["target"])
    assert encoder.feature_dim == 64
    cached = sanity_run["encoder_cache"]
    assert cached and all(c.shape == (g3.MM_TOKENS_PER_IMAGE, 64) for c in cached)
    worst = 0.0
    for r in data["rows"][:12]:
        for path in r["images"]:
            ours = encoder.encode([Image.open(path).convert("RGB")])
            errs = [(c - ours).abs().max().item() for c in cached]
            worst = max(worst, min(errs))
    print(f"Gemma3 image features: max |vLLM - transformers| = {worst:.2e}")
    assert worst < 1e-4


@pytest.fixture(scope="module")
def trained(models, data) -> dict:
    root = models["root"]
    assert massv(["init", "--target", str(models["target"]), "--draft-lm",
                  str(models["text_lm"]), "--out", str(root / "init"), "--seed", "0"]) == 0
    common = ["--data", str(data["dir"]), "--target", str(models["target"]), "--batch-size", "8",
              "--eval-fraction", "0.25", "--feature-cache", str(root / "features")]
    assert massv(["train", "--phase", "align", "--drafter", str(root / "init"), "--out",
                  str(root / "align"), "--max-steps", "30", "--lr", "3e-3", *common]) == 0
    assert massv(["train", "--phase", "sdvit", "--drafter", str(root / "align"), "--out",
                  str(root / "sdvit"), "--max-steps", "90", "--lr", "2e-3", *common]) == 0
    logs = {p: [json.loads(ln) for ln in (root / p / "train_log.jsonl").read_text().splitlines()]
            for p in ("align", "sdvit")}
    return {"drafter": root / "sdvit", "logs": logs}


def test_pipeline_improves_heldout_agreement(trained):
    align, sdvit = trained["logs"]["align"], trained["logs"]["sdvit"]
    print(f"Gemma3 held-out agreement: align (captions) {align[0]['eval_agreement']:.3f} -> "
          f"{align[-1]['eval_agreement']:.3f}; sdvit (target responses) "
          f"{sdvit[0]['eval_agreement']:.3f} -> {sdvit[-1]['eval_agreement']:.3f} "
          f"(train {sdvit[1]['agreement']:.3f} -> {sdvit[-1]['agreement']:.3f})")
    assert align[-1]["eval_agreement"] > align[0]["eval_agreement"] + 0.2
    assert sdvit[-1]["eval_agreement"] > sdvit[0]["eval_agreement"]
    assert sdvit[-1]["agreement"] > sdvit[1]["agreement"] + 0.3
    cfg = json.loads((trained["drafter"] / "config.json").read_text())
    assert cfg["architectures"] == ["MassvGemma3ForCausalLM"] and cfg["sliding_window"] is None


def test_trained_drafter_lossless_and_matches_transformers(models, data, trained):
    """Served by vLLM, the trained drafter keeps the output identical to the target alone, and
    its accepted count at every verify step equals a replay with the transformers drafter and
    transformers image features (positions, the image mask and √hidden scaling all agree)."""
    from PIL import Image

    from vllm_massv.drafters.massv.hf_model import MassvGemma3ForCausalLM
    from vllm_massv.training.features import TargetImageEncoder

    outs = serve(models["target"], trained["drafter"], data["rows"])["outputs"]
    drafter = MassvGemma3ForCausalLM.from_pretrained(trained["drafter"],
                                                     dtype=torch.float32).eval()
    encoder = TargetImageEncoder(models["target"])
    steps = 0
    for r in data["rows"]:
        out = outs[r["id"]]
        tokens = list(out.outputs[0].token_ids)
        assert tokens == r["token_ids"], r["id"]
        images = [Image.open(p).convert("RGB") for p in r["images"]]
        metrics = out.outputs[0].spec_decode_metrics
        expected = massv_replay(drafter, out.prompt_token_ids, tokens,
                                encoder.encode(images) if images else None,
                                metrics.per_step_drafted)
        assert emitted_accepted(metrics.per_step_accepted, len(tokens)) == expected, r["id"]
        steps += len(expected)
    acc, drafted = acceptance(outs, [r["id"] for r in data["rows"]])
    print(f"trained tiny Gemma3 drafter in vLLM: acceptance {acc}/{drafted} = "
          f"{acc / drafted:.3f} over {steps} steps, equal to the transformers replay")
    assert acc > 0


def test_drafter_logits_match_transformers(trained):
    """vLLM's `MassvGemma3ForCausalLM` and the transformers twin give the same next-token
    log-probabilities (fp32), the drafter served as a text model with prompt logprobs."""
    prompt = g3.gemma3_text_prompt("Count the red circles and the blue squares, please.")
    out, worst = prompt_logprobs_vs_transformers(trained["drafter"], prompt)
    print(f"Gemma3 drafter: max |vLLM - transformers| logprob over "
          f"{len(out.prompt_token_ids) - 1} positions: {worst:.2e}")
    assert worst < 1e-4
    assert all(t < g3.TEXT_VOCAB_SIZE for pos in out.prompt_logprobs[1:] for t in pos)
