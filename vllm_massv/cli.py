"""`massv` console script: `massv init` (build a drafter); training commands live in
`vllm_massv.training`."""

from __future__ import annotations

import argparse
import sys

from vllm_massv import methods
from vllm_massv.checkpoint import DrafterConfigError
from vllm_massv.speculators import DEFAULT_NUM_SPECULATIVE_TOKENS


def _cmd_init(args: argparse.Namespace) -> int:
    print(methods.resolve(methods.get(args.method).init)(args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="massv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init", help="build an untrained drafter: MASSV (a text LM + target VLM) "
                       "MSD (--method msd: an EAGLE-style head for the target) or EAGLE-3 (--method eagle3)")
    p.add_argument("--method", choices=list(methods.METHODS), default="massv",
                   help="massv: MASSV drafter from --draft-lm; msd: 1-layer MSD head (arXiv "
                   "2505.14260) for a Qwen2-VL/Qwen2.5-VL target, served with method 'eagle'; "
                   "eagle3: vLLM's EAGLE-3 head (speculators format), served with method 'eagle3'")
    p.add_argument("--target", required=True, help="target VLM directory or hub name "
                   "(Qwen2-VL/Qwen2.5-VL, Qwen3-VL or Gemma3)")
    p.add_argument("--draft-lm", default=None,
                   help="(massv) text LM of the target's family (Qwen2 for Qwen2(.5)-VL, Qwen3 for "
                   "Qwen3-VL, gemma3_text for Gemma3), or the target itself (sanity drafter)")
    p.add_argument("--out", required=True, help="output drafter directory")
    p.add_argument("--projector", default="mlp2x_gelu",
                   choices=["mlp2x_gelu", "linear", "identity", "none"])
    p.add_argument("--projector-hidden", type=int, default=None,
                   help="hidden width of mlp2x_gelu (default: drafter hidden size)")
    p.add_argument("--positions", choices=["1d", "mrope"], default=None,
                   help="drafter positions (default: 1d for a text LM; the target's own scheme, "
                   "mrope for Qwen2-VL, for the target's LM)")
    p.add_argument("--deepstack", action=argparse.BooleanOptionalAction, default=None,
                   help="(massv, Qwen3-VL targets) add the target's DeepStack levels after the "
                   "drafter's first layers (default: on for --projector identity, else off)")
    p.add_argument("--feature-tap", choices=["post_merger", "post_merger_deepstack"],
                   default=None,
                   help="(massv) what the projector reads of the target's cached image "
                   "embedding: the main post-merger embedding, or (Qwen3-VL) the main embedding "
                   "and its DeepStack levels (default: the latter for a trained projector on a "
                   "DeepStack target, chosen by testbed tau; else the former)")
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

    # the training commands' module imports the training side's dependencies only when used
    from vllm_massv.training.cli import add_commands
    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DrafterConfigError as e:
        print(f"massv {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
