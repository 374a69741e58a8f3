"""The model card (`README.md`) `massv train` writes into a drafter directory (MASSV or MSD).

A Hugging Face Hub model card (`huggingface_hub.ModelCard`): YAML front matter (base model,
license, tags, library) and a body that says which target the drafter serves, what it was
trained on, each training phase with its steps and final metrics, the held-out agreement, and the
speculative config to serve it with.

Phase history: every phase's `train_summary.json` carries `phases`, the phases of its input
drafter (read from that directory's `train_summary.json`) plus its own, so the card of a
phase-2 drafter lists phase 1 too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vllm_massv.drafters.massv.config import MassvConfig
from vllm_massv.drafters.msd.config import MsdConfig

PHASE_NAMES = {"align": "phase 1, align (projector only, LM frozen; reference answers)",
               "sdvit": "phase 2, sdvit (projector + LM; the target's own responses)",
               "msd": "msd (fc + decoder layer; the target's own responses, image curriculum)"}
CARD_TAGS = ["massv", "speculative-decoding", "speculators", "vision-language", "vllm"]
MSD_CARD_TAGS = ["msd", "eagle", "speculative-decoding", "speculators", "vision-language", "vllm"]


def phase_history(drafter_dir: str | Path) -> list[dict[str, Any]]:
    """Phases recorded in a drafter directory's `train_summary.json` (empty if untrained)."""
    path = Path(drafter_dir) / "train_summary.json"
    if not path.is_file():
        return []
    summary = json.loads(path.read_text())
    return list(summary.get("phases", []))


def phase_record(phase: str, data: str, final: dict[str, Any], hyper: dict[str, Any]
                 ) -> dict[str, Any]:
    """One row of the phase history: what ran, on what, and its final metrics."""
    keep = ("steps", "seconds", "train_examples", "eval_examples", "loss", "agreement",
            "eval_loss", "eval_agreement")
    return {"phase": phase, "data": data, **{k: final[k] for k in keep if k in final},
            **{k: hyper[k] for k in ("batch_size", "grad_accum", "lr", "loss_kind") if k in hyper}}


def _is_hub_name(name: str) -> bool:
    return name.count("/") == 1 and not Path(name).exists() and not name.startswith((".", "/"))


def _fmt(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) else ("-" if x is None else str(x))


def _about(block: MassvConfig | MsdConfig) -> tuple[str, str, str]:
    """(title, description paragraph, vLLM method) of a MASSV or MSD drafter."""
    if isinstance(block, MsdConfig):
        decouple = ("on: rows whose next token is an image placeholder take the target's image "
                    "embedding" if block.decouple_visual_tokens else "off (EAGLE-1-style ablation)")
        return ("MSD drafter", f"""An MSD drafter ([arXiv 2505.14260](https://arxiv.org/abs/2505.14260))
for speculative decoding of the vision-language model **{block.target}** (`{block.target_architecture}`), made with
vllm-massv: one Qwen2 decoder layer over fc([token embedding; the target's last hidden state])
({block.target_hidden_size} wide), 1-D positions, the target's embedding and LM head reused.
Decoupled visual tokens: {decouple}. Served through vLLM's EAGLE proposer (method `eagle`).""",
                "eagle")
    return ("MASSV drafter", f"""A multimodal drafter for speculative decoding of the vision-language model **{block.target}**
(`{block.target_architecture}`), made with vllm-massv (MASSV,
[arXiv 2505.10526](https://arxiv.org/abs/2505.10526)): a small text LM with a `{block.projector}` projector from the target's
image embeddings ({block.vision_feature_dim} wide) into its embedding space, positions
`{block.positions}`. It shares the target's tokenizer (vocabulary padded from
{block.orig_vocab_size} to the target's).""", "draft_model")


def build_model_card(out: str | Path, massv: MassvConfig | MsdConfig,
                     num_speculative_tokens: int, phases: list[dict[str, Any]],
                     license: str | None = None):
    """The card of the drafter in `out`.

    Args:
        out: the drafter directory (named in the serving commands).
        massv: its `massv` block, or the `msd` block of an MSD drafter (served with method
            `eagle`).
        num_speculative_tokens: k of its `speculators_config`.
        phases: :func:`phase_history` rows, oldest first; the last one gives the held-out
            agreement.
        license: Hub license id; default "other" (not recorded).
    Returns:
        `huggingface_hub.ModelCard`.
    """
    from huggingface_hub import ModelCard, ModelCardData

    target = massv.target
    data = ModelCardData(
        base_model=target if _is_hub_name(target) else None,
        license=license or "other",
        library_name="vllm",
        pipeline_tag="image-text-to-text",
        tags=list(MSD_CARD_TAGS if isinstance(massv, MsdConfig) else CARD_TAGS))
    title, about, method = _about(massv)
    out = str(out)
    last = phases[-1] if phases else {}
    rows = "\n".join(
        f"| {PHASE_NAMES.get(p['phase'], p['phase'])} | {p.get('steps', '-')} | "
        f"{p.get('train_examples', '-')} / {p.get('eval_examples', '-')} | "
        f"{_fmt(p.get('loss'))} | {_fmt(p.get('eval_loss'))} | {_fmt(p.get('eval_agreement'))} |"
        for p in phases) or "| (untrained) | 0 | - | - | - | - |"
    datasets = sorted({p["data"] for p in phases if p.get("data")})
    two_arg = json.dumps({"method": method, "model": out,
                          "num_speculative_tokens": num_speculative_tokens})
    agreement = last.get("eval_agreement")
    text = f"""---
{data.to_yaml()}
---

# {title} for {target or 'its target'}

{about}

## Serve it

With the vllm-massv plugin installed (`pip install vllm-massv[cuda]`, or `[cpu]`):

```bash
vllm serve {out}          # serves {target} with this drafter, k = {num_speculative_tokens}
# the same, two arguments (any field can be changed here):
vllm serve {target} --speculative-config '{two_arg}'
```

## Training

Data: {', '.join(f'`{d}`' for d in datasets) or 'none recorded'} (`massv generate` output: prompts,
their reference answers and the target's own answers).

| phase | steps | examples (train / held-out) | train loss | held-out loss | held-out agreement |
|---|---|---|---|---|---|
{rows}

Held-out agreement (top-1 drafter token equal to the target's, on the held-out split, after the
last phase): **{_fmt(agreement, 3) if agreement is not None else 'not measured'}**. Acceptance in
serving (τ = 1 + accepted / drafts) depends on k and the prompts; vLLM reports it on `/metrics`
(`vllm:spec_decode_num_accepted_tokens_total`, `vllm:spec_decode_num_drafts_total`).
"""
    return ModelCard(text)


def write_model_card(out: str | Path, massv: MassvConfig | MsdConfig, num_speculative_tokens: int,
                     phases: list[dict[str, Any]], license: str | None = None) -> Path:
    """Write `out/README.md` (see :func:`build_model_card`); returns its path."""
    path = Path(out) / "README.md"
    build_model_card(out, massv, num_speculative_tokens, phases, license).save(path)
    return path
