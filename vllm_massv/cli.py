"""`massv` console script: `massv init` (build a drafter); training commands live in
`vllm_massv.training`."""

from __future__ import annotations

import argparse
import sys

from vllm_massv.config import MassvConfigError
from vllm_massv.msd.config import MsdConfigError
from vllm_massv.speculators import DEFAULT_NUM_SPECULATIVE_TOKENS


def _serve_hint(out_dir, target, method: str, k: int) -> str:
    """The two ways to serve a freshly built drafter (one argument; target + speculative config)."""
    return (f"Serve: vllm serve {out_dir}   (serves {target}, method {method}, k = {k})\n"
            f"   or: vllm serve {target} --speculative-config '{{\"method\": \"{method}\", "
            f"\"model\": \"{out_dir}\", \"num_speculative_tokens\": {k}}}'")


def _cmd_init(args: argparse.Namespace) -> int:
    if args.method == "msd":
        return _cmd_init_msd(args)
    if args.method == "eagle3":
        return _cmd_init_eagle3(args)
    if args.draft_lm is None:
        raise MassvConfigError("--draft-lm is required for --method massv")
    from vllm_massv.init_drafter import init_drafter

    report = init_drafter(args.target, args.draft_lm, args.out, projector=args.projector,
                          positions=args.positions, projector_hidden_size=args.projector_hidden,
                          seed=args.seed, num_speculative_tokens=args.num_speculative_tokens)
    m = report.massv
    print(f"MASSV drafter written to {report.out_dir}\n"
          f"  projector {m.projector} ({report.projector_params:,} params), positions {m.positions}\n"
          f"  LM params {report.drafter_params:,}, vocab {m.orig_vocab_size} padded by "
          f"{report.padded_rows} rows\n  image token id {m.image_token_id}, "
          f"vision feature dim {m.vision_feature_dim}\n"
          + _serve_hint(report.out_dir, m.target, "draft_model", args.num_speculative_tokens))
    return 0


def _cmd_init_msd(args: argparse.Namespace) -> int:
    from vllm_massv.msd.init import init_msd_drafter

    report = init_msd_drafter(args.target, args.out, decouple=not args.no_decouple,
                              seed=args.seed, num_speculative_tokens=args.num_speculative_tokens)
    m = report.msd
    print(f"MSD drafter written to {report.out_dir}\n"
          f"  1 decoder layer + fc, {report.params:,} params, hidden {m.target_hidden_size}, "
          f"decoupled visual tokens {'on' if m.decouple_visual_tokens else 'off'}\n"
          + _serve_hint(report.out_dir, m.target, "eagle", args.num_speculative_tokens))
    return 0


def _cmd_init_eagle3(args: argparse.Namespace) -> int:
    from vllm_massv.eagle3.init import init_eagle3_drafter

    layers = [int(x) for x in args.aux_layers.split(",")] if args.aux_layers else None
    report = init_eagle3_drafter(args.target, args.out, aux_layer_ids=layers,
                                 draft_vocab_size=args.draft_vocab_size, data=args.data,
                                 num_speculative_tokens=args.num_speculative_tokens,
                                 seed=args.seed)
    c = report.cfg
    print(f"EAGLE-3 head written to {report.out_dir}\n"
          f"  fc over target layers {c.eagle_aux_hidden_state_layer_ids} + 1 decoder layer, "
          f"{report.params:,} params ({report.trainable:,} trainable), draft vocab "
          f"{c.draft_vocab_size}/{c.vocab_size}\n"
          + _serve_hint(report.out_dir, c.verifier, "eagle3", args.num_speculative_tokens))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="massv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init", help="build an untrained drafter: MASSV (a text LM + target VLM) "
                       "MSD (--method msd: an EAGLE-style head for the target) or EAGLE-3 (--method eagle3)")
    p.add_argument("--method", choices=["massv", "msd", "eagle3"], default="massv",
                   help="massv: MASSV drafter from --draft-lm; msd: 1-layer MSD head (arXiv "
                   "2505.14260) for a Qwen2-VL/Qwen2.5-VL target, served with method 'eagle'; "
                   "eagle3: vLLM's EAGLE-3 head (speculators format), served with method 'eagle3'")
    p.add_argument("--target", required=True, help="target VLM directory or hub name (Qwen2-VL/Qwen2.5-VL or Gemma3)")
    p.add_argument("--draft-lm", default=None,
                   help="(massv) text LM of the target's family (Qwen2 for Qwen targets, "
                   "gemma3_text for Gemma3), or the target itself (sanity drafter)")
    p.add_argument("--out", required=True, help="output drafter directory")
    p.add_argument("--projector", default="mlp2x_gelu",
                   choices=["mlp2x_gelu", "linear", "identity", "none"])
    p.add_argument("--projector-hidden", type=int, default=None,
                   help="hidden width of mlp2x_gelu (default: drafter hidden size)")
    p.add_argument("--positions", choices=["1d", "mrope"], default=None,
                   help="drafter positions (default: 1d for a text LM; the target's own scheme, "
                   "mrope for Qwen2-VL, for the target's LM)")
    p.add_argument("--no-decouple", action="store_true",
                   help="(msd) turn decoupled visual tokens off: the EAGLE-1-style ablation")
    p.add_argument("--aux-layers", default=None, metavar="A,B,C",
                   help="(eagle3) target aux layer ids, vLLM convention (id a = output of layer "
                   "a-1); default (2, L//2, L-3), or (1, L//2, L-1) where those collide")
    p.add_argument("--draft-vocab-size", type=int, default=None,
                   help="(eagle3) draft vocabulary (default: the target's); smaller needs --data")
    p.add_argument("--data", default=None,
                   help="(eagle3) massv generate output whose response tokens pick the draft "
                   "vocabulary")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-speculative-tokens", type=int, default=DEFAULT_NUM_SPECULATIVE_TOKENS,
                   help="k recorded in config.json's speculators_config (what `vllm serve "
                   "DRAFTER` uses; --speculative-config overrides it)")
    p.set_defaults(func=_cmd_init)

    from vllm_massv.training.cli import add_commands
    add_commands(sub)
    return parser



def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (MassvConfigError, MsdConfigError) as e:
        print(f"massv {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
