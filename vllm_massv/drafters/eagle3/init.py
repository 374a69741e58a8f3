"""`massv init --method eagle3`: an untrained EAGLE-3 head for a Qwen2-VL / Qwen2.5-VL target, in
the checkpoint layout of :mod:`vllm_massv.drafters.eagle3.config` (stock vLLM serves it, method `eagle3`).

As speculators initialises one (`speculators/model.py::DraftVocabMixin.load_verifier_weights`):
fc and the decoder layer ~ N(0, initializer_range), norms 1, the `lm_head` a frozen copy of the
target's LM head rows for the draft vocabulary. With `draft_vocab_size` smaller than the target's
vocabulary, the draft vocabulary is the most frequent response tokens of `massv generate` data
(speculators' `build_vocab_mappings_from_distribution`: by count, ties by id; unseen ids fill up
from 0), stored as `d2t`/`t2d`.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_massv.checkpoint import copy_tokenizer_files, local_dir
from vllm_massv.drafters.eagle3.config import (EAGLE3_TARGET_TYPES, Eagle3Config,
                                               Eagle3ConfigError, default_aux_layer_ids)
from vllm_massv.drafters.eagle3.hf_model import Eagle3Drafter
from vllm_massv.speculators import serve_hint


@dataclass
class Eagle3InitReport:
    """What :func:`init_eagle3_drafter` built (printed by the CLI)."""
    out_dir: Path
    cfg: Eagle3Config
    params: int
    trainable: int


def response_token_counts(data: str | Path) -> Counter:
    """Token counts over the response tokens (`token_ids`) of a `massv generate` output."""
    # the training side's reader of `massv generate` output (pyarrow: the [train] extra)
    import pyarrow.parquet as pq

    from vllm_massv.training.examples import data_files

    counts: Counter = Counter()
    for f in data_files(data):
        for ids in pq.read_table(f, columns=["token_ids"]).column("token_ids").to_pylist():
            counts.update(ids or [])
    return counts


def draft_vocab_mapping(counts: Counter, draft_vocab_size: int, vocab_size: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2t [draft_vocab_size] int64, t2d [vocab_size] bool) for the `draft_vocab_size` most
    frequent ids (speculators' rule; ids in the draft vocabulary are kept in increasing order, so
    draft id i maps to target id `i + d2t[i]`)."""
    ranked = sorted((t for t in counts if 0 <= t < vocab_size), key=lambda t: (-counts[t], t))
    chosen = set(ranked[:draft_vocab_size])
    for t in range(vocab_size):
        if len(chosen) >= draft_vocab_size:
            break
        chosen.add(t)
    ids = torch.tensor(sorted(chosen), dtype=torch.long)
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[ids] = True
    return ids - torch.arange(draft_vocab_size), t2d


def init_eagle3_drafter(target: str | Path, out: str | Path, *,
                        aux_layer_ids: list[int] | None = None,
                        draft_vocab_size: int | None = None, data: str | Path | None = None,
                        token_counts: Counter | None = None, num_speculative_tokens: int = 4,
                        seed: int = 0) -> Eagle3InitReport:
    """Build an untrained EAGLE-3 head directory at `out`.

    Args:
        target: the target VLM directory (or hub name).
        out: output directory (created; existing files are overwritten).
        aux_layer_ids: target aux layer ids (vLLM convention, 1..L); default
            :func:`~vllm_massv.drafters.eagle3.config.default_aux_layer_ids`.
        draft_vocab_size: rows of the head's lm_head (default: the target's vocabulary, no
            mapping). Smaller needs `data` (token counts).
        data: `massv generate` output to count response tokens in.
        token_counts: the counts themselves (instead of `data`).
        num_speculative_tokens: k in the speculators block (and the default TTT depth).
        seed: initialisation seed.
    Raises:
        Eagle3ConfigError: an unsupported target, bad layer ids or vocabulary size, or a reduced
            vocabulary without `data`.
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    target, out = local_dir(target), Path(out)
    tc = AutoConfig.from_pretrained(target)
    if tc.model_type not in EAGLE3_TARGET_TYPES:
        raise Eagle3ConfigError(f"target {target} is a {tc.model_type!r} model; massv trains "
                                f"EAGLE-3 heads for {', '.join(EAGLE3_TARGET_TYPES)} targets")
    text = tc.get_text_config()
    n_layers, vocab = int(text.num_hidden_layers), int(text.vocab_size)
    heads = int(text.num_attention_heads)
    rope = text.to_dict().get("rope_parameters") or {}
    cfg = Eagle3Config(
        hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_attention_heads=heads, num_key_value_heads=text.num_key_value_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        rms_norm_eps=text.rms_norm_eps,
        rope_theta=rope.get("rope_theta", getattr(text, "rope_theta", 10000.0)),
        max_position_embeddings=text.max_position_embeddings, hidden_act=text.hidden_act,
        vocab_size=vocab, draft_vocab_size=draft_vocab_size or vocab,
        eagle_aux_hidden_state_layer_ids=aux_layer_ids or default_aux_layer_ids(n_layers),
        target_num_layers=n_layers, num_speculative_tokens=num_speculative_tokens,
        verifier=str(target), verifier_architecture=(tc.architectures or [""])[0],
        dtype=str(text.dtype or tc.dtype or "float32").removeprefix("torch."))
    torch.manual_seed(seed)
    model = Eagle3Drafter(cfg)
    std = float(getattr(text, "initializer_range", 0.02))
    for name, p in model.named_parameters():
        if p.dim() == 2 and not name.startswith("lm_head"):
            torch.nn.init.normal_(p, std=std)
    lm_head = None
    for f in sorted(target.glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            if "lm_head.weight" in fh.keys():
                lm_head = fh.get_tensor("lm_head.weight").float()
    if lm_head is None:
        raise Eagle3ConfigError(f"{target}: no lm_head.weight (tied embeddings are not supported)")
    if cfg.reduced_vocab:
        if data is None and token_counts is None:
            raise Eagle3ConfigError("a draft vocabulary smaller than the target's needs --data "
                                    "(massv generate output) to pick the most frequent tokens")
        counts = token_counts if token_counts is not None else response_token_counts(data)
        d2t, t2d = draft_vocab_mapping(counts, cfg.draft_vocab_size, vocab)
        model.d2t.copy_(d2t)
        model.t2d.copy_(t2d)
        lm_head = lm_head[t2d]
    model.lm_head.weight.data.copy_(lm_head)
    dtype = getattr(torch, cfg.dtype, torch.float32)
    model.to(dtype).save_pretrained(out)
    copy_tokenizer_files(target, out)
    return Eagle3InitReport(out, cfg, sum(p.numel() for p in model.parameters()),
                            sum(p.numel() for p in model.parameters() if p.requires_grad))


def read_config(path: str | Path) -> Eagle3Config:
    """The :class:`Eagle3Config` of a head directory."""
    return Eagle3Config.from_config_json(json.loads((Path(path) / "config.json").read_text()))


def init_from_args(args: argparse.Namespace) -> str:
    """`massv init --method eagle3`: build the head from the CLI's arguments.

    Returns:
        The report the CLI prints.
    Raises:
        Eagle3ConfigError: as :func:`init_eagle3_drafter`.
    """
    layers = [int(x) for x in args.aux_layers.split(",")] if args.aux_layers else None
    report = init_eagle3_drafter(args.target, args.out, aux_layer_ids=layers,
                                 draft_vocab_size=args.draft_vocab_size, data=args.data,
                                 num_speculative_tokens=args.num_speculative_tokens,
                                 seed=args.seed)
    c = report.cfg
    return (f"EAGLE-3 head written to {report.out_dir}\n"
            f"  fc over target layers {c.eagle_aux_hidden_state_layer_ids} + 1 decoder layer, "
            f"{report.params:,} params ({report.trainable:,} trainable), draft vocab "
            f"{c.draft_vocab_size}/{c.vocab_size}\n"
            + serve_hint(report.out_dir, c.verifier, "eagle3", args.num_speculative_tokens))
