"""The testbed's files: checked-in models, the padded target and the data splits.

``benchmarks/testbed/models/`` holds the trained models (built once by
``benchmarks/testbed/build.sh``; small enough to live in git):

* ``target/``             -- the trained Qwen2.5-VL target (6 decoder layers);
* ``blind/``              -- the blind Qwen2 text LM (2 layers), trained on the same
                             conversations without pixels;
* ``drafter-distilled/``  -- ``massv init --projector none`` of the blind LM after
                             ``massv train --phase sdvit`` on the target's own answers: phrasing
                             alignment without vision (the control);
* ``drafter-phase1/``     -- MASSV after phase 1 (projector alignment, LM frozen);
* ``drafter-massv/``      -- MASSV after phases 1 + 2 (self-distilled visual instruction tuning);
* ``drafter-massv-mrope/`` -- the same recipe with the target's M-RoPE positions in the drafter
                             (the ablation; the others use 1-D positions).

The untrained text-only baseline, ``massv init --projector none`` of the blind LM, has no
trained weights of its own; :func:`ensure` derives it into the cache.

``benchmarks/testbed/qwen3-vl/models/`` is the Qwen3-VL testbed (issue 24; same task, same
tokenizer, ``build.sh`` with ``FAMILY=qwen3_vl``): a 4-layer Qwen3-VL ``target/`` with DeepStack,
a blind Qwen3 LM ``blind/``, ``drafter-phase1/``, ``drafter-massv/`` (the projector reads the
main image embedding and both DeepStack levels: chosen on the val split), ``drafter-massv-main/``
(the main embedding only) and ``drafter-distilled/``. :func:`ensure` takes either testbed
folder.

:func:`pad_target` makes the target as expensive per token, relative to the 2-layer drafter, as
Qwen2.5-VL-7B is to Qwen2.5-1.5B (c ≈ 0.2), without changing a single output: it appends decoder
layers whose attention output projection (``o_proj``) and MLP down projection (``down_proj``) are
all zeros. Each such layer computes its attention and MLP in full, then adds exactly ``0.0`` to
the residual stream, and ``x + 0.0 == x`` bit for bit in IEEE arithmetic, so hidden states,
logits and tokens are identical to the unpadded target's (``tests/serving/test_testbed_models.py``
checks the logits). The other weights of a padding layer are copies of the last real layer, so
the kernels see ordinary data.

:func:`ensure` materialises what the benchmark and the demo need under ``.cache/testbed``: the
padded target and the held-out test split (images + metadata).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTBED = Path(__file__).resolve().parent
MODELS = TESTBED / "models"
#: The Qwen3-VL testbed (issue 24): same task and tokenizer, its own models and cache.
QWEN3_VL_MODELS = TESTBED / "qwen3-vl" / "models"
CACHE = ROOT / ".cache" / "testbed"
#: Zero-output decoder layers appended to the 6-layer target (see module docstring). Chosen so
#: that a draft token costs about 0.2 target decode steps *inside vLLM's speculative loop* on the
#: 2-core CPU (``c_in_loop`` in the benchmark: 0.21-0.24 in the run that chose it, 0.06-0.14 in
#: a later one; timing on this shared machine varies between runs): there a draft pass costs
#: ~6.7 ms, mostly fixed proposer work, against the drafter's own ~1.2 ms decode step, while a
#: padding layer costs ~0.37 ms. The drafter's stand-alone ITL over the target's (``c`` in the
#: benchmark) is then 0.04-0.05.
PAD_LAYERS = 56
#: Held-out split sizes built by :func:`ensure` (train/val are not needed to benchmark).
TEST_SPLIT = {"n_train": 0, "n_val": 0, "n_test": 200}
#: Decoder-layer key prefixes: Qwen2.5-VL checkpoints (as the testbed's are saved) and Qwen3-VL.
_LAYER_PREFIXES = ("model.layers.", "model.language_model.layers.")
_ZEROED = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def pad_target(src: str | Path, dst: str | Path, extra_layers: int) -> Path:
    """Write ``src`` (a Qwen2.5-VL or Qwen3-VL checkpoint) to ``dst`` with ``extra_layers``
    zero-output decoder layers appended after the last one. Returns ``dst``.

    Raises:
        ValueError: ``extra_layers`` < 0 or ``src`` is not a single-file Qwen2.5-VL / Qwen3-VL
            checkpoint.
    """
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    if extra_layers < 0:
        raise ValueError(f"extra_layers must be >= 0, got {extra_layers}")
    config = json.loads((src / "config.json").read_text())
    text = config.get("text_config")
    if text is None or not (src / "model.safetensors").is_file():
        raise ValueError(f"{src} is not a single-file Qwen2.5-VL / Qwen3-VL checkpoint")
    n = text["num_hidden_layers"]
    tensors = load_file(str(src / "model.safetensors"))
    prefix = next((p for p in _LAYER_PREFIXES if f"{p}0.input_layernorm.weight" in tensors), None)
    if prefix is None:
        raise ValueError(f"{src}: no decoder layers under {_LAYER_PREFIXES}")
    last = f"{prefix}{n - 1}."
    template = {k[len(last):]: v for k, v in tensors.items() if k.startswith(last)}
    if not all(z in template for z in _ZEROED):
        raise ValueError(f"{src}: layer {n - 1} lacks {_ZEROED}")
    for i in range(n, n + extra_layers):
        for name, value in template.items():
            value = value.clone()
            if name in _ZEROED:
                value.zero_()
            tensors[f"{prefix}{i}.{name}"] = value
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors", "train_*"))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    total = n + extra_layers
    text["num_hidden_layers"] = total
    if "max_window_layers" in text:
        text["max_window_layers"] = total
    if "layer_types" in text:
        text["layer_types"] = (text["layer_types"] + [text["layer_types"][-1]] * extra_layers)
    config["massv_testbed_padding"] = {
        "real_layers": n, "zero_output_layers": extra_layers,
        "note": "layers >= real_layers have zero o_proj and down_proj: outputs are unchanged"}
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return dst


def ensure(testbed: str | Path = TESTBED, cache: str | Path | None = None,
           pad_layers: int = PAD_LAYERS) -> dict[str, Path]:
    """Paths of the testbed: ``models`` (checked in), ``target`` (padded, built into ``cache``
    when missing or stale), ``data`` (the test split) and ``drafter-blind`` (the text-only
    baseline), the last two built when missing. ``testbed``: this folder (Qwen2.5-VL) or
    ``qwen3-vl/``; ``cache`` defaults to ``.cache/testbed`` (``.cache/testbed/qwen3-vl`` for
    the Qwen3-VL testbed).

    Raises:
        FileNotFoundError: ``testbed/models/target`` does not exist (run build.sh first).
    """
    from benchmarks.testbed import task

    testbed = Path(testbed)
    if cache is None:
        cache = CACHE if testbed.resolve() == TESTBED else CACHE / testbed.name
    models, cache = testbed / "models", Path(cache)
    src = models / "target"
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} is missing: build the testbed models with "
                                "benchmarks/testbed/build.sh")
    padded = cache / f"target-pad{pad_layers}"
    stamp = padded / ".source-sha256"
    digest = hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
    if not stamp.is_file() or stamp.read_text() != digest:
        pad_target(src, padded, pad_layers)
        stamp.write_text(digest)
    data = cache / "data"
    if not (data / "metadata.jsonl").is_file():
        task.build_splits(data, seed=0, **TEST_SPLIT)
    blind = cache / "drafter-blind"
    if not (blind / "model.safetensors").is_file():
        from vllm_massv.drafters.massv.init import init_drafter

        init_drafter(src, models / "blind", blind, projector="none")
    stock = cache / "blind-stock"
    if not (stock / "model.safetensors").is_file():
        pad_vocab(models / "blind", stock, json.loads((src / "config.json").read_text())
                  ["text_config"]["vocab_size"])
    return {"models": models, "target": padded, "data": data, "drafter-blind": blind,
            "blind-stock": stock}


def pad_vocab(src: str | Path, dst: str | Path, vocab_size: int) -> Path:
    """Copy a tied-embedding Qwen2 LM with its embedding padded by zero rows to ``vocab_size``.

    Stock vLLM ``draft_model`` requires the target's vocabulary size (vLLM
    ``config/speculative.py::verify_equal_vocab_size_if_draft_model``); the extra ids have no
    tokenizer entries. Zero rows give logit 0 for those ids, so the stock drafter could in
    principle propose one (the target then rejects it: output stays lossless).
    """
    import torch
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    emb = tensors["model.embed_tokens.weight"]
    if not config.get("tie_word_embeddings") or emb.shape[0] > vocab_size:
        raise ValueError(f"{src}: expected a tied-embedding LM with at most {vocab_size} rows")
    pad = emb.new_zeros(vocab_size - emb.shape[0], emb.shape[1])
    tensors["model.embed_tokens.weight"] = torch.cat([emb, pad])
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors", "train_*"))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config["vocab_size"] = vocab_size
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return dst
