"""`graphllm convert megatron-to-graphllm` / `graphllm-to-megatron`: Megatron-LM checkpoints <-> graphllm
checkpoints (graphllm/megatron_convert.py does the work; docs/megatron.md)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_megatron_parsers(kinds) -> None:
    to_ckpt = kinds.add_parser("megatron-to-graphllm",
                               help="Megatron-LM checkpoint (legacy or torch_dist) -> OUT/step_0 (weights only)")
    to_ckpt.add_argument("--megatron", type=Path, required=True, metavar="DIR",
                         help="Megatron-LM's --save directory (its latest iteration) or one iter_XXXXXXX/ in it")
    to_ckpt.add_argument("--out", type=Path, required=True, metavar="ROOT",
                         help="checkpoint root; `graphllm run ARTIFACT --load ROOT` starts from these weights")
    to_ckpt.add_argument("--hf-config", type=Path, default=None, metavar="HF_CONFIG",
                         help="the model's HF config.json (or its directory, whose tokenizer files are carried too): "
                              "must match the checkpoint's args; its vocab_size drops Megatron's vocabulary padding "
                              "(default: the model the args describe)")
    to_ckpt.add_argument("--force", action="store_true", help="write into a non-empty ROOT (replaces ROOT/step_0)")
    to_ckpt.set_defaults(func=run_megatron_to_graphllm)

    to_mg = kinds.add_parser("graphllm-to-megatron",
                             help="graphllm checkpoint -> Megatron-LM legacy checkpoint, tp x pp shards (weights only)")
    to_mg.add_argument("--ckpt", type=Path, required=True, metavar="CKPT",
                       help="a step_<N> directory, or a root (its newest complete step)")
    to_mg.add_argument("--out", type=Path, required=True, metavar="DIR",
                       help="Megatron-LM checkpoint directory to write (give it to Megatron-LM as --load)")
    to_mg.add_argument("--tp", type=int, default=1, help="tensor-parallel size the shards are cut for")
    to_mg.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (even split of the layers)")
    to_mg.add_argument("--make-vocab-size-divisible-by", type=int, default=128, metavar="N",
                       help="pad the vocabulary to a multiple of N x tp, as Megatron-LM does (1: only to a multiple "
                            "of tp)")
    to_mg.add_argument("--force", action="store_true",
                       help="write into a non-empty DIR (replaces that iteration and the tracker file, keeps others)")
    to_mg.set_defaults(func=run_graphllm_to_megatron)


def report_conversion(result, done: str) -> None:
    """What a conversion wrote (every `graphllm convert` direction prints this)."""
    print(f"wrote {result.path}: {result.tensors} tensors, {result.parameters:,} parameters "
          f"({result.nbytes / 2**20:,.1f} MiB, {'/'.join(result.dtypes)}); {done}")
    for note in result.notes:
        print(f"note: {note}")


def run_megatron_to_graphllm(args: argparse.Namespace) -> int:
    from graphllm.megatron_convert import megatron_to_graphllm

    result = megatron_to_graphllm(args.megatron, args.out, config=args.hf_config, force=args.force)
    report_conversion(result, f"weights only; `graphllm run ARTIFACT --load {args.out}` starts at step 0 with a fresh optimizer")
    return 0


def run_graphllm_to_megatron(args: argparse.Namespace) -> int:
    from graphllm.megatron_convert import graphllm_to_megatron

    result = graphllm_to_megatron(args.ckpt, args.out, tp=args.tp, pp=args.pp,
                                  vocab_multiple=args.make_vocab_size_divisible_by, force=args.force)
    extra = "" if result.path.name == "release" else " --no-load-optim --no-load-rng (or --finetune)"
    report_conversion(result, f"weights only, Megatron-Core local-spec names, tp={args.tp} x pp={args.pp}; Megatron-LM loads "
                    f"it with --load {args.out} --use-checkpoint-args{extra}")
    return 0
