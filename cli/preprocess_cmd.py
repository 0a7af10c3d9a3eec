"""`graphllm preprocess pretrain`: tokenize jsonl / text files into a Megatron `.bin/.idx` dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

SHOW_BAD_LINES = 5


def add_parser(sub) -> None:
    p = sub.add_parser("preprocess", help="turn raw text into training data")
    kinds = p.add_subparsers(dest="kind", required=True)
    pre = kinds.add_parser("pretrain", help="jsonl/txt files -> Megatron indexed dataset (.bin + .idx)")
    pre.add_argument("--input", nargs="+", type=Path, required=True, metavar="FILE",
                     help=".jsonl/.json (one object per line) or .txt (blank-line separated paragraphs)")
    pre.add_argument("--tokenizer", required=True, metavar="PATH|builtin",
                     help="sentencepiece .model file, Hugging Face tokenizer directory, or `builtin`")
    pre.add_argument("--out", type=Path, required=True, metavar="PREFIX", help="writes PREFIX.bin and PREFIX.idx")
    pre.add_argument("--json-key", default="text", help="field holding the text (default: text)")
    pre.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    pre.add_argument("--no-eod", action="store_true", help="do not append the EOS token to each document")
    pre.add_argument("--strict", action="store_true", help="stop at the first malformed record")
    pre.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from graphllm.data.preprocess import PretrainConfig, preprocess_pretrain

    cfg = PretrainConfig(inputs=args.input, tokenizer=args.tokenizer, out=args.out, json_key=args.json_key,
                         workers=args.workers, append_eod=not args.no_eod, strict=args.strict)
    console = Console(stderr=True)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.completed} documents"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("tokenizing", total=None)
        summary = preprocess_pretrain(cfg, progress=lambda n: bar.advance(task, n))
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(summary.skipped.items())) or "none"
    print(f"wrote {args.out}.bin/.idx: {summary.documents} documents, {summary.tokens} tokens; skipped: {skipped}")
    for path, no, reason in summary.bad_lines[:SHOW_BAD_LINES]:
        print(f"  {path}:{no}: {reason}")
    if summary.num_skipped > SHOW_BAD_LINES:
        print(f"  ... {summary.num_skipped - SHOW_BAD_LINES} more")
    return 0
