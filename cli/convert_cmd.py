"""`graphllm convert`: HF model directory <-> graphllm checkpoint (graphllm/convert.py does the work)."""

from __future__ import annotations

import argparse
from pathlib import Path

DTYPE_CHOICES = ("fp32", "bf16", "fp16")


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert weights between Hugging Face directories and graphllm checkpoints")
    kinds = p.add_subparsers(dest="direction", required=True)
    to_ckpt = kinds.add_parser("hf-to-graphllm", help="HF directory -> OUT/step_0 (weights-only checkpoint)")
    to_ckpt.add_argument("--hf", type=Path, required=True, metavar="HF_DIR", help="config.json + *.safetensors")
    to_ckpt.add_argument("--out", type=Path, required=True, metavar="ROOT",
                         help="checkpoint root; `graphllm run ARTIFACT --load ROOT` starts from these weights")
    to_ckpt.add_argument("--tp", type=int, default=1, help="check the model splits over this many tensor ranks")
    to_ckpt.add_argument("--pp", type=int, default=1, help="check the model splits over this many pipeline stages")
    to_ckpt.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="cast (default: keep stored dtypes)")
    to_ckpt.add_argument("--force", action="store_true", help="write into a non-empty ROOT (replaces ROOT/step_0)")
    to_ckpt.set_defaults(func=run_hf_to_graphllm)

    to_hf = kinds.add_parser("graphllm-to-hf", help="graphllm checkpoint -> HF directory transformers loads")
    to_hf.add_argument("--ckpt", type=Path, required=True, metavar="CKPT",
                       help="a step_<N> directory, or a root (its newest complete step)")
    to_hf.add_argument("--out", type=Path, required=True, metavar="HF_DIR",
                       help="directory to write (must not exist or be empty, unless --force)")
    to_hf.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="cast (default: keep stored dtypes)")
    to_hf.add_argument("--max-shard-size", default="5GB",
                       help="split model.safetensors into shards + index above this size (default 5GB)")
    to_hf.add_argument("--tokenizer", type=Path, default=None, metavar="DIR",
                       help="copy tokenizer files from DIR (default: those the checkpoint carries)")
    to_hf.add_argument("--force", action="store_true",
                       help="write into a non-empty HF_DIR (replaces its config and weight files, keeps others)")
    to_hf.set_defaults(func=run_graphllm_to_hf)


def _report(result, done: str) -> None:
    print(f"wrote {result.path}: {result.tensors} tensors, {result.parameters:,} parameters "
          f"({result.nbytes / 2**20:,.1f} MiB, {'/'.join(result.dtypes)}); {done}")
    for note in result.notes:
        print(f"note: {note}")


def run_hf_to_graphllm(args: argparse.Namespace) -> int:
    from graphllm.convert import hf_to_graphllm

    result = hf_to_graphllm(args.hf, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype, force=args.force)
    _report(result, f"weights only; `graphllm run ARTIFACT --load {args.out}` starts at step 0 with a fresh "
                    "optimizer (any --tp/--pp/--dp layout loads it)")
    return 0


def run_graphllm_to_hf(args: argparse.Namespace) -> int:
    from graphllm.convert import graphllm_to_hf

    result = graphllm_to_hf(args.ckpt, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                            tokenizer=args.tokenizer, force=args.force)
    _report(result, f"with {', '.join(result.files)}; transformers' from_pretrained loads it")
    return 0
