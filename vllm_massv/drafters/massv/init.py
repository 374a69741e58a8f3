"""`massv init`: build an untrained MASSV drafter from a base text LM and a target VLM.

The result is an HF-style directory the plugin serves and `massv train` trains: `config.json`
(the LM's config, vocab padded to the target's, a MASSV architecture, a `massv` block),
`model.safetensors` (LM weights, zero-padded embedding rows, a seeded projector) and the target's
tokenizer files. `--draft-lm` may be the target VLM itself (a "sanity drafter"). Families
(:data:`FAMILIES`) and the checkpoint: docs/design/massv.md.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vllm_massv.checkpoint import (copy_tokenizer_files, language_model_state, local_dir,
                                   qwen2_config_from_text_config, qwen3_config_from_text_config,
                                   read_safetensors_dir)
from vllm_massv.drafters.massv.config import (PROJECTOR_PREFIX, TRAINED_PROJECTORS, FeatureTap,
                                              MassvConfig, MassvConfigError, PositionScheme,
                                              ProjectorKind, deepstack_levels,
                                              target_image_embedding_dim, target_token_ids)
from vllm_massv.drafters.massv.projector import build_projector
from vllm_massv.rope import has_mrope, rope_parameters_1d
from vllm_massv.speculators import (DEFAULT_NUM_SPECULATIVE_TOKENS, serve_hint,
                                    speculators_fields)

@dataclass(frozen=True)
class DrafterFamily:
    """A target family and the drafter architecture that serves it."""
    target_types: tuple[str, ...]   # the target VLM's model_type
    lm_type: str                    # model_type of the draft text LM
    architecture: str               # MASSV drafter architecture (vllm_model.py)
    example: str                    # a draft LM to name in error messages


FAMILIES = {
    "qwen2": DrafterFamily(("qwen2_vl", "qwen2_5_vl"), "qwen2", "MassvQwen2ForCausalLM",
                           "Qwen2.5-1.5B-Instruct"),
    "gemma3": DrafterFamily(("gemma3",), "gemma3_text", "MassvGemma3ForCausalLM",
                            "gemma-3-1b-it"),
    "qwen3": DrafterFamily(("qwen3_vl",), "qwen3", "MassvQwen3ForCausalLM", "Qwen3-1.7B"),
}
def drafter_family(target_cfg: Any) -> DrafterFamily:
    """The drafter family for a target VLM config.

    Raises:
        MassvConfigError: an unsupported target family.
    """
    for family in FAMILIES.values():
        if target_cfg.model_type in family.target_types:
            return family
    supported = ", ".join(t for f in FAMILIES.values() for t in f.target_types)
    raise MassvConfigError(f"target model_type {target_cfg.model_type!r} is not supported; "
                           f"MASSV drafters are built for: {supported}.")


@dataclass
class InitReport:
    """What `init_drafter` built (printed by the CLI)."""
    out_dir: Path
    massv: MassvConfig
    drafter_params: int
    projector_params: int
    padded_rows: int


def init_drafter(target: str | Path, draft_lm: str | Path, out: str | Path, *,
                 projector: ProjectorKind = "mlp2x_gelu", positions: PositionScheme | None = None,
                 projector_hidden_size: int | None = None, seed: int = 0,
                 num_speculative_tokens: int = DEFAULT_NUM_SPECULATIVE_TOKENS,
                 deepstack: bool | None = None,
                 feature_tap: FeatureTap | None = None) -> InitReport:
    """Build an untrained MASSV drafter directory at `out`.

    Gemma3 drafters are saved with `sliding_window: null`: every layer attends over the whole
    context (each keeps its layer type's RoPE), because vLLM's V1 proposer needs all draft
    layers in one KV-cache group (docs/design/massv.md).

    Args:
        target: the target VLM (Qwen2-VL / Qwen2.5-VL, Qwen3-VL or Gemma3 family): a local
            directory or a hub name.
        draft_lm: a text LM of the target's family (Qwen2 / Qwen3 / Gemma3 `gemma3_text`), or
            the target VLM itself (sanity drafter); directory or name.
        out: output directory (created; existing files are overwritten).
        projector: projector kind; `identity` needs equal widths, `none` is text-only.
        positions: `1d` / `mrope`; default `1d` for a text LM, the target's own scheme (`mrope`
            for Qwen2-VL and Qwen3-VL -- interleaved for Qwen3-VL --, `1d` for Gemma3) when
            `draft_lm` is the VLM.
        projector_hidden_size: hidden width of `mlp2x_gelu` (default: drafter hidden size).
        seed: seed of the projector's initialization.
        num_speculative_tokens: k written to the `speculators_config` block, which makes
            `vllm serve <out>` serve the target with this drafter (`vllm_massv.speculators`).
        deepstack: `massv.deepstack` (add the target's DeepStack levels after the drafter's
            first layers); default true for an `identity` projector on a DeepStack target
            (Qwen3-VL: the sanity drafter then is the target), else false. True needs both.
        feature_tap: `massv.feature_tap`, the columns of vLLM's cached image embedding the
            projector reads: `post_merger` (the main embedding, every target) or
            `post_merger_deepstack` (Qwen3-VL: the main embedding and its DeepStack levels,
            a trained projector only). Default: `post_merger_deepstack` for a trained
            projector on a DeepStack target -- chosen on the Qwen3-VL testbed's validation
            split, image tau 4.63 against 4.40 for the main embedding alone
            (`benchmarks/results/cpu-testbed-qwen3-vl-val.md`) -- else `post_merger`.
    Raises:
        MassvConfigError: text-only or unsupported target, a draft LM of another family,
            tokenizers that disagree, a vocabulary larger than the target's, or an `mrope`
            request the LM cannot honour.
    """
    from transformers import AutoConfig

    target_name = str(target)  # a hub name stays a name (the verifier vLLM downloads)
    target, draft_lm, out = local_dir(target), local_dir(draft_lm), Path(out)
    target_cfg = AutoConfig.from_pretrained(target)
    levels = deepstack_levels(target_cfg)
    trained = projector in TRAINED_PROJECTORS
    if feature_tap is None:
        feature_tap = "post_merger_deepstack" if levels and trained else "post_merger"
    if feature_tap != "post_merger" and not trained:
        raise MassvConfigError(f"--feature-tap {feature_tap} needs a trained projector "
                               f"(mlp2x_gelu or linear), not --projector {projector}.")
    # raises for a text-only target, or DeepStack columns on a target without them
    feat_dim = target_image_embedding_dim(target_cfg, feature_tap)
    image_id, video_id = target_token_ids(target_cfg)
    target_text = target_cfg.get_text_config()
    family = drafter_family(target_cfg)
    lm_cfg = AutoConfig.from_pretrained(draft_lm)
    sanity = getattr(lm_cfg, "vision_config", None) is not None
    if sanity and lm_cfg.model_type not in family.target_types:
        raise MassvConfigError(f"--draft-lm {draft_lm} is a {lm_cfg.model_type!r} VLM, not the "
                               f"target's family ({target_cfg.model_type!r}).")
    if not sanity and lm_cfg.model_type != family.lm_type:
        raise MassvConfigError(
            f"--draft-lm {draft_lm} is a {lm_cfg.model_type!r} model; MASSV drafters for "
            f"{target_cfg.model_type!r} targets need a {family.lm_type!r} text LM (e.g. "
            f"{family.example}) or the target VLM itself.")
    check_tokenizers(target, draft_lm, image_token_id=image_id,
                     draft_vocab_size=int(lm_cfg.get_text_config().vocab_size))

    if sanity:
        text_cfg = lm_cfg.get_text_config()
        if family.lm_type == "qwen2":
            cfg = qwen2_config_from_text_config(text_cfg)
        elif family.lm_type == "qwen3":
            cfg = qwen3_config_from_text_config(text_cfg)
        else:
            cfg = text_cfg.to_dict()
        cfg["dtype"] = cfg.get("dtype") or str(lm_cfg.dtype).removeprefix("torch.")
        lm_state = language_model_state(draft_lm)
        positions = positions or ("mrope" if has_mrope(target_text) else "1d")
    else:
        cfg = lm_cfg.to_dict()
        lm_state = read_safetensors_dir(draft_lm)
        positions = positions or "1d"
    if family.lm_type in ("qwen2", "qwen3"):
        cfg["rope_parameters"] = _rope_for_positions(cfg, target_text, positions)
    else:
        if positions != "1d":
            raise MassvConfigError(f"--positions {positions}: {target_cfg.model_type!r} "
                                   "targets use 1-D positions; use --positions 1d.")
        cfg["sliding_window"] = None
    orig_vocab = int(cfg["vocab_size"])
    target_vocab = int(target_text.vocab_size)
    if orig_vocab > target_vocab:
        raise MassvConfigError(
            f"the draft LM's vocabulary ({orig_vocab}) is larger than the target's "
            f"({target_vocab}); the two cannot share token ids.")
    padded = target_vocab - orig_vocab
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in lm_state:
            w = lm_state[name]
            lm_state[name] = torch.cat([w, w.new_zeros(padded, w.shape[1])]) if padded else w
    if cfg.get("tie_word_embeddings"):
        lm_state.pop("lm_head.weight", None)

    if deepstack is None:
        deepstack = projector == "identity" and levels > 0
    if deepstack and not levels:
        raise MassvConfigError(f"--deepstack: the target ({target_cfg.model_type!r}) has no "
                               "DeepStack levels.")
    if deepstack and int(cfg["num_hidden_layers"]) < levels:
        raise MassvConfigError(f"--deepstack: the target adds {levels} DeepStack levels after "
                               f"its first {levels} layers; the draft LM has only "
                               f"{cfg['num_hidden_layers']}.")
    if deepstack and projector != "identity":
        raise MassvConfigError(f"--deepstack needs --projector identity (got {projector!r}): "
                               "the levels are added unprojected; a trained per-level "
                               "projector is not implemented.")
    massv = MassvConfig(
        vision_feature_dim=feat_dim, projector=projector,
        projector_hidden_size=projector_hidden_size if projector == "mlp2x_gelu" else None,
        orig_vocab_size=orig_vocab, image_token_id=image_id, video_token_id=video_id,
        positions=positions, target=target_name,
        target_architecture=(target_cfg.architectures or [""])[0], deepstack=deepstack,
        feature_tap=feature_tap)
    torch.manual_seed(seed)
    proj = build_projector(massv, int(cfg["hidden_size"]))
    proj_state = {} if proj is None else {
        f"{PROJECTOR_PREFIX}.{k}": v.detach().to(lm_state["model.embed_tokens.weight"].dtype)
        for k, v in proj.state_dict().items()}

    cfg.update(architectures=[family.architecture], model_type=family.lm_type,
               vocab_size=target_vocab, massv=massv.to_json_dict(),
               **speculators_fields(massv, num_speculative_tokens))
    for key in ("_name_or_path", "transformers_version", "auto_map"):
        cfg.pop(key, None)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    state = {k: v.contiguous() for k, v in {**lm_state, **proj_state}.items()}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    copy_tokenizer_files(target, out)
    return InitReport(out, massv, sum(v.numel() for v in lm_state.values()),
                      sum(v.numel() for v in proj_state.values()), padded)


def check_tokenizers(target: Path, draft_lm: Path, *, image_token_id: int,
                     draft_vocab_size: int | None = None) -> None:
    """Check that the draft LM's tokenizer maps every token to the target's id.

    The drafter reads the target's token ids, so any disagreement makes its proposals
    meaningless. A draft LM without tokenizer files is assumed to share the target's. The
    image token may be missing from the draft LM's tokenizer when its id is beyond the LM's
    vocabulary (`draft_vocab_size`; Gemma3-1B: 262144 rows, image token 262144): it lands in a
    padded row that only ever holds projected image embeddings.

    Raises:
        MassvConfigError: listing the first disagreements.
    """
    from transformers import AutoTokenizer

    target_tok = AutoTokenizer.from_pretrained(target)
    if not any((draft_lm / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        return
    draft_tok = AutoTokenizer.from_pretrained(draft_lm)
    t_vocab, d_vocab = target_tok.get_vocab(), draft_tok.get_vocab()
    wrong = [(tok, i, t_vocab.get(tok)) for tok, i in sorted(d_vocab.items(), key=lambda x: x[1])
             if t_vocab.get(tok) != i]
    if wrong:
        shown = ", ".join(f"{t!r}: draft {i} vs target {j}" for t, i, j in wrong[:5])
        raise MassvConfigError(
            f"tokenizers disagree on {len(wrong)} tokens ({shown}). A MASSV drafter must use "
            "the target's tokenizer; pick a draft LM from the target's model family.")
    image_token = target_tok.convert_ids_to_tokens(image_token_id)
    out_of_vocab = draft_vocab_size is not None and image_token_id >= draft_vocab_size
    if d_vocab.get(image_token) != image_token_id and not (
            out_of_vocab and image_token not in d_vocab):
        raise MassvConfigError(
            f"the draft LM's tokenizer has no {image_token!r} with id {image_token_id} "
            "(the target's image token).")
    for attr in ("eos_token", "pad_token"):
        t, d = getattr(target_tok, attr, None), getattr(draft_tok, attr, None)
        if t and d and t_vocab.get(t) != d_vocab.get(d):
            raise MassvConfigError(f"special token {attr} differs: target {t!r}, draft {d!r}")


def _rope_for_positions(cfg: dict[str, Any], target_text: Any,
                        positions: PositionScheme) -> dict[str, Any]:
    """The drafter's rope parameters for a position scheme (mrope_section only for `mrope`)."""
    rope = rope_parameters_1d(cfg)
    if positions == "1d":
        return rope
    section = (target_text.to_dict().get("rope_parameters") or {}).get("mrope_section")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if not section:
        raise MassvConfigError("--positions mrope needs an M-RoPE target (its rope_parameters "
                               "have no mrope_section); use --positions 1d.")
    rope["mrope_section"] = scale_mrope_section(section, head_dim // 2)
    if (target_text.to_dict().get("rope_parameters") or {}).get("mrope_interleaved"):
        rope["mrope_interleaved"] = True  # Qwen3-VL: t/h/w frequencies interleaved
    return rope


def scale_mrope_section(section: list[int], half_dim: int) -> list[int]:
    """The target's M-RoPE (temporal, height, width) split of the rotary half-dimension, scaled
    to a drafter whose head_dim is ``2 * half_dim`` (unchanged when the sizes agree, e.g.
    Qwen2.5-VL-7B [16, 24, 24] for Qwen2.5-1.5B, both head_dim 128). The position *values* are
    the target's either way; only the number of frequencies given to each axis changes.

    Raises:
        MassvConfigError: the scaled split would leave an axis without frequencies.
    """
    total = sum(section)
    if total == half_dim:
        return list(section)
    scaled = [round(s * half_dim / total) for s in section[:-1]]
    scaled.append(half_dim - sum(scaled))
    if min(scaled) < 1:
        raise MassvConfigError(
            f"--positions mrope: the target's mrope_section {section} cannot be scaled to the "
            f"draft LM's head_dim {2 * half_dim}; use --positions 1d for this LM.")
    return scaled


def init_from_args(args: argparse.Namespace) -> str:
    """`massv init --method massv`: build the drafter from the CLI's arguments.

    Returns:
        The report the CLI prints.
    Raises:
        MassvConfigError: `--draft-lm` missing, or as :func:`init_drafter`.
    """
    if args.draft_lm is None:
        raise MassvConfigError("--draft-lm is required for --method massv")
    report = init_drafter(args.target, args.draft_lm, args.out, projector=args.projector,
                          positions=args.positions, projector_hidden_size=args.projector_hidden,
                          seed=args.seed, num_speculative_tokens=args.num_speculative_tokens,
                          deepstack=getattr(args, "deepstack", None),
                          feature_tap=getattr(args, "feature_tap", None))
    m = report.massv
    return (f"MASSV drafter written to {report.out_dir}\n"
            f"  projector {m.projector} ({report.projector_params:,} params), positions "
            f"{m.positions}{', DeepStack levels injected' if m.deepstack else ''}\n"
            f"  LM params {report.drafter_params:,}, vocab {m.orig_vocab_size} padded by "
            f"{report.padded_rows} rows\n  image token id {m.image_token_id}, "
            f"vision feature dim {m.vision_feature_dim} ({m.feature_tap})\n"
            + serve_hint(report.out_dir, m.target, "draft_model", args.num_speculative_tokens))
