"""`massv` console script: `massv init` (build a drafter); training commands live in
`vllm_massv.training`."""

from __future__ import annotations

import argparse
import sys

from vllm_massv.config import MassvConfigError
from vllm_massv.speculators import DEFAULT_NUM_SPECULATIVE_TOKENS


def _cmd_init(args: argparse.Namespace) -> int:
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
          f"Serve: vllm serve {report.out_dir}   (target {m.target}, k="
          f"{args.num_speculative_tokens})\n"
          f"   or: vllm serve {m.target} --speculative-config '{{\"method\": \"draft_model\", "
          f"\"model\": \"{report.out_dir}\", \"num_speculative_tokens\": "
          f"{args.num_speculative_tokens}}}'")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="massv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init", help="build an untrained MASSV drafter from a text LM + target VLM")
    p.add_argument("--target", required=True, help="target VLM directory or hub name (Qwen2-VL/Qwen2.5-VL or Gemma3)")
    p.add_argument("--draft-lm", required=True,
                   help="text LM of the target's family (Qwen2 for Qwen targets, gemma3_text "
                   "for Gemma3), or the target itself (sanity drafter)")
    p.add_argument("--out", required=True, help="output drafter directory")
    p.add_argument("--projector", default="mlp2x_gelu",
                   choices=["mlp2x_gelu", "linear", "identity", "none"])
    p.add_argument("--projector-hidden", type=int, default=None,
                   help="hidden width of mlp2x_gelu (default: drafter hidden size)")
    p.add_argument("--positions", choices=["1d", "mrope"], default=None,
                   help="drafter positions (default: 1d for a text LM; the target's own scheme, "
                   "mrope for Qwen2-VL, for the target's LM)")
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
    except MassvConfigError as e:
        print(f"massv {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
