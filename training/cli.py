"""`massv` training subcommands. `vllm_massv.cli.build_parser()` calls :func:`add_commands`; each
subcommand has an ``_add_<name>(subparsers)`` that registers its parser and a ``_cmd_<name>(args)``
that runs it (returns the exit status; raise ``MassvConfigError`` for a user error)."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

from vllm_massv import methods
from vllm_massv.drafters.massv.config import MassvConfigError
from vllm_massv.training import data
from vllm_massv.training import generate as generation

__all__ = ["add_commands", "engine_kwargs_from_args", "generate_kwargs_from_args",
           "records_from_args"]


def add_commands(subparsers: Any) -> None:
    """Register the training subcommands on the `massv` parser's subparsers."""
    _add_generate(subparsers)
    _add_train(subparsers)


# ----------------------------------------------------------------------------------------------
# massv generate
# ----------------------------------------------------------------------------------------------


def _add_generate(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "generate", help="self-distillation data: the target answers image prompts (vLLM)",
        description="The target VLM answers image prompts through vLLM's offline engine; the "
        "answers are written as Parquet parts under OUT/train/ (resumable, shardable).")
    p.add_argument("--target", required=True, help="target VLM (directory or hub name)")
    p.add_argument("--out", required=True, help="output directory (rerun to resume)")

    src = p.add_argument_group("input (one of)")
    ex = src.add_mutually_exclusive_group(required=True)
    ex.add_argument("--llava-json", metavar="FILE",
                    help="LLaVA conversation JSON/JSONL (first human turn, first gpt turn)")
    ex.add_argument("--dataset", metavar="PATH",
                    help="HF datasets save_to_disk folder, or a local file/folder that "
                    "datasets.load_dataset reads (parquet, json, csv, imagefolder...)")
    ex.add_argument("--image-folder", metavar="DIR",
                    help="folder of images (recursive) answered with --prompt templates")
    src.add_argument("--image-root", metavar="DIR",
                     help="base of relative image paths (default: the input's folder)")
    src.add_argument("--image-column", default="image")
    src.add_argument("--prompt-column", default="prompt",
                     help="a string or a LLaVA/OpenAI conversation (default: prompt)")
    src.add_argument("--reference-column", default=None)
    src.add_argument("--id-column", default=None, help="default: the row index")
    src.add_argument("--split", default=None, help="data set split (default: train or the first)")
    src.add_argument("--dataset-format", default=None,
                     help="datasets builder for --dataset (parquet, json, csv, imagefolder...)")
    src.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                     help="prompt template (repeatable); each image gets one chosen by a seeded "
                     "hash of its name (or all with --all-prompts)")
    src.add_argument("--all-prompts", action="store_true",
                     help="every template for every image")
    src.add_argument("--limit", type=int, default=None,
                     help="only the first N input entries (images for --image-folder)")
    src.add_argument("--max-image-pixels", type=int, default=data.DEFAULT_MAX_PIXELS,
                     help=f"downsize larger images (default {data.DEFAULT_MAX_PIXELS})")

    gen = p.add_argument_group("sampling")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--seed", type=int, default=0,
                     help="sampling seed (per request: seed + id), also picks prompt templates")
    gen.add_argument("--logprobs", type=int, default=0, metavar="K",
                     help="also keep the target's top-K log-probabilities per response token")

    run = p.add_argument_group("run")
    run.add_argument("--shard", type=int, default=None,
                     help="this worker's shard (0-based; default 0)")
    run.add_argument("--shards", default=None, metavar="A-B",
                     help="run shards A..B (inclusive) of --num-shards in parallel: one process "
                     "and one vLLM engine per shard, each on its own GPUs (--tensor-parallel-size "
                     "each) or CPU cores. Multi-node: a contiguous range per node")
    run.add_argument("--num-shards", type=int, default=1)
    run.add_argument("--shard-size", type=int, default=256,
                     help="records per chunk (one Parquet part each)")
    run.add_argument("--batch-size", type=int, default=None,
                     help="requests handed to vLLM at once (default: a whole chunk)")
    run.add_argument("--max-chunks", type=int, default=None,
                     help="stop after N chunks (rerun to continue)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    eng = p.add_argument_group("vLLM engine")
    eng.add_argument("--max-model-len", type=int, default=None)
    eng.add_argument("--dtype", default=None, help="auto, bfloat16, float16, float32")
    eng.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / compile")
    eng.add_argument("--max-num-seqs", type=int, default=None)
    eng.add_argument("--max-num-batched-tokens", type=int, default=None)
    eng.add_argument("--gpu-memory-utilization", type=float, default=None)
    eng.add_argument("--tensor-parallel-size", type=int, default=None)
    eng.add_argument("--trust-remote-code", action="store_true")
    eng.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                     help="any other vllm.LLM argument; VALUE is JSON if it parses "
                     "(e.g. --engine-arg enable_prefix_caching=false)")
    p.set_defaults(func=_cmd_generate)


def engine_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for name in ("max_model_len", "dtype", "max_num_seqs", "max_num_batched_tokens",
                 "gpu_memory_utilization", "tensor_parallel_size"):
        value = getattr(args, name)
        if value is not None:
            kwargs[name] = value
    if args.enforce_eager:
        kwargs["enforce_eager"] = True
    if args.trust_remote_code:
        kwargs["trust_remote_code"] = True
    for item in args.engine_arg:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MassvConfigError(f"--engine-arg {item!r}: expected KEY=VALUE")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        kwargs[key.strip().replace("-", "_")] = parsed
    return kwargs


def records_from_args(args: argparse.Namespace, skipped: Counter | None = None) -> Any:
    """The record iterator the input options describe (this shard's records only)."""
    from pathlib import Path

    common = dict(limit=args.limit, shard=args.shard or 0, num_shards=args.num_shards,
                  skipped=skipped)
    if args.llava_json:
        return data.read_llava_json(args.llava_json, image_root=args.image_root, **common)
    if args.image_folder:
        if not args.prompt:
            raise MassvConfigError("--image-folder needs at least one --prompt template")
        return data.read_image_folder(args.image_folder, args.prompt,
                                      all_prompts=args.all_prompts, seed=args.seed, **common)
    return data.read_dataset(
        args.dataset, image_column=args.image_column, prompt_column=args.prompt_column,
        reference_column=args.reference_column, id_column=args.id_column,
        prompts=args.prompt, seed=args.seed, all_prompts=args.all_prompts, split=args.split,
        data_format=args.dataset_format, image_root=args.image_root,
        image_dir=Path(args.out) / "images", **common)


def shard_range(args: argparse.Namespace) -> list[int]:
    """The shards this command runs: `--shards A-B` (parallel), else `--shard` (default 0)."""
    if args.shards is None:
        return [0 if args.shard is None else args.shard]
    if args.shard is not None:
        raise MassvConfigError("give --shard or --shards, not both")
    first, sep, last = args.shards.partition("-")
    try:
        a, b = int(first), int(last if sep else first)
    except ValueError:
        raise MassvConfigError(f"--shards {args.shards!r}: expected A-B, e.g. 0-7") from None
    if not 0 <= a <= b < args.num_shards:
        raise MassvConfigError(f"--shards {args.shards}: need 0 <= A <= B < --num-shards "
                               f"{args.num_shards}")
    return list(range(a, b + 1))


def generate_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """`generate()` keyword arguments for the parsed options (records excluded)."""
    shard = args.shard or 0
    if args.num_shards < 1 or not 0 <= shard < args.num_shards:
        raise MassvConfigError(f"--shard {shard} must be in [0, --num-shards "
                               f"{args.num_shards})")
    for name in ("shard_size", "max_tokens"):
        if getattr(args, name) < 1:
            raise MassvConfigError(f"--{name.replace('_', '-')} must be >= 1")
    if args.logprobs < 0:
        raise MassvConfigError("--logprobs must be >= 0")
    return dict(target=args.target, out_dir=args.out, temperature=args.temperature,
                top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed,
                logprobs=args.logprobs, shard=shard, num_shards=args.num_shards,
                shard_size=args.shard_size, batch_size=args.batch_size,
                max_image_pixels=args.max_image_pixels, max_chunks=args.max_chunks,
                engine_kwargs=engine_kwargs_from_args(args), progress=not args.no_progress)


def _cmd_generate(args: argparse.Namespace) -> int:
    shards = shard_range(args)
    if args.shards is not None:
        return _generate_parallel(args, shards)
    kwargs = generate_kwargs_from_args(args)
    read_skipped: Counter = Counter()
    try:
        records = list(records_from_args(args, read_skipped))
    except (ValueError, FileNotFoundError) as e:  # bad input options or files
        raise MassvConfigError(str(e)) from e
    summary = generation.generate(records, read_skipped=read_skipped, **kwargs)
    return 0 if summary.complete or args.max_chunks is not None else 1


def _generate_parallel(args: argparse.Namespace, shards: list[int]) -> int:
    """`--shards A-B`: one spawned process per shard, each running `massv generate --shard i` with
    its own devices (`generate.shard_device_envs`); returns 0 when every shard succeeded."""
    import multiprocessing

    generate_kwargs_from_args(argparse.Namespace(**{**vars(args), "shard": shards[0]}))  # checks
    envs = generation.shard_device_envs(len(shards), args.tensor_parallel_size or 1)
    ctx = multiprocessing.get_context("spawn")   # a fresh interpreter: no inherited CUDA/engine
    procs = []
    for shard, env in zip(shards, envs):
        child = argparse.Namespace(**{**vars(args), "shard": shard, "shards": None})
        procs.append(ctx.Process(target=_generate_shard, args=(child, env),
                                 name=f"massv-generate-{shard}"))
        procs[-1].start()
        print(f"massv generate: shard {shard}/{args.num_shards} in process {procs[-1].pid} "
              f"({' '.join(f'{k}={v}' for k, v in env.items()) or 'default devices'})")
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:  # the children got the same Ctrl-C; finished parts are kept
        for p in procs:
            p.join()
        raise
    failed = [s for s, p in zip(shards, procs) if p.exitcode != 0]
    print(f"massv generate: shards {shards[0]}-{shards[-1]} of {args.num_shards}: "
          + (f"shards {failed} did not finish (rerun the same command to resume)" if failed
             else "all finished"))
    return 1 if failed else 0


def _generate_shard(args: argparse.Namespace, env: dict[str, str]) -> None:
    import os
    import sys

    os.environ.update(env)
    sys.exit(_cmd_generate(args))


# ----------------------------------------------------------------------------------------------
# massv train
# ----------------------------------------------------------------------------------------------


def _add_train(subparsers: Any) -> None:
    # the loop imports torch: loaded when the parser is built, not when `vllm_massv.cli` is
    # imported
    from vllm_massv.training.loop import TrainConfig

    d = TrainConfig.__dataclass_fields__
    p = subparsers.add_parser(
        "train", help="train a drafter: MASSV --phase align (projector) or sdvit (projector + "
        "LM), or --method msd / eagle3",
        description="MASSV phase 1 (align): projector only, LM frozen, on the data set's reference "
        "answers. Phase 2 (sdvit): projector + LM on the target's own responses. --method msd: "
        "an MSD head (from `massv init --method msd`) on the target's hidden states with the "
        "image, its own answers, text-only first then a growing image share. --method eagle3: vLLM's "
        "EAGLE-3 head (from `massv init --method eagle3`) on three target layers, training-time "
        "test over k draft steps, KL to the target's distribution. Input: a "
        "`massv generate` output directory; output: a drafter directory vLLM serves. Rerun the "
        "same command to resume from the newest checkpoint. Multi-GPU: `accelerate launch "
        "--num_processes N -m vllm_massv.cli train ...` (DDP, or FSDP with --use_fsdp): "
        "--batch-size is per process, one optimizer step takes batch-size x N x grad-accum "
        "examples, and --epochs/--max-steps/the LR schedule count those steps.")
    p.add_argument("--method", choices=list(methods.METHODS), default="massv",
                   help="massv (default), msd (EAGLE-style head with decoupled visual tokens) or "
                   "eagle3 (vLLM's EAGLE-3 head from `massv init --method eagle3`)")
    p.add_argument("--phase", choices=["align", "sdvit"], default=None,
                   help="MASSV phase (required with --method massv)")
    p.add_argument("--no-decouple", dest="decouple", action="store_const", const=False,
                   default=None, help="msd: train without decoupled visual tokens (ablation)")
    p.add_argument("--drafter", required=True, help="drafter dir (massv init or a previous phase)")
    p.add_argument("--data", required=True, help="`massv generate` output directory")
    p.add_argument("--target", required=True,
                   help="target VLM dir (frozen vision tower; msd: the whole frozen target)")
    p.add_argument("--out", required=True, help="output drafter directory")
    for name in ("epochs", "max_steps", "batch_size", "grad_accum", "lr", "weight_decay",
                 "warmup_steps", "max_seq_len", "eval_fraction", "eval_every", "save_every",
                 "seed"):
        f = d[name]
        kind = float if f.type in ("float", float) else int
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=f.default)
    p.add_argument("--ttt-steps", type=int, default=None,
                   help="eagle3: draft steps unrolled in the training-time-test loss (default: "
                   "the head's k)")
    p.add_argument("--ttt-decay", type=float, default=1.0,
                   help="eagle3: loss weight of draft step j is DECAY**j (default 1.0, as "
                   "speculators)")
    p.add_argument("--loss", choices=["ce", "kl"], default="ce",
                   help="ce: cross-entropy to the target's tokens; kl: KL to its stored top-k "
                   "logprobs (generate with --logprobs K)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--feature-cache", default=None,
                   help="directory caching target image embeddings across epochs")
    p.add_argument("--license", default=None,
                   help="Hub license id written to the drafter's model card (default: other)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from vllm_massv.training.loop import TrainConfig, train  # torch: see _add_train

    fields = TrainConfig.__dataclass_fields__
    if args.method == "massv" and args.phase is None:
        raise MassvConfigError("massv train --method massv needs --phase align or sdvit")
    if args.method != "massv" and args.phase is not None:
        raise MassvConfigError(f"--phase is a MASSV option; --method {args.method} has one "
                               "schedule")
    if args.method != "msd" and args.decouple is not None:
        raise MassvConfigError("--no-decouple is an MSD option (--method msd)")
    if args.method != "eagle3" and (args.ttt_steps is not None or args.ttt_decay != 1.0):
        raise MassvConfigError("--ttt-steps/--ttt-decay are EAGLE-3 options (--method eagle3)")
    if args.method != "massv" and args.loss != "ce":
        raise MassvConfigError(f"--loss is a MASSV option; --method {args.method} has its own "
                               "loss")
    if args.ttt_steps is not None and args.ttt_steps < 1:
        raise MassvConfigError("--ttt-steps must be >= 1")
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    final = train(cfg)
    print(json.dumps(final, indent=2))
    print(f"drafter written to {cfg.out}")
    return 0
