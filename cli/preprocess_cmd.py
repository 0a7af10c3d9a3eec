"""`graphllm preprocess pretrain|alpaca|sharegpt|pairwise|prm`: raw records -> Megatron `.bin/.idx` datasets.

Exit codes: 0 written; 2 a user error (bad flag or input, malformed record under --strict, or a full disk:
one line `no space left on device at DIR (needed about N GB)`, nothing left behind)."""

from __future__ import annotations

import argparse
from pathlib import Path

SHOW_BAD_LINES = 5
CHAT_KINDS = {
    "alpaca": "instruction/input/output (+history, system) records -> SFT input_ids + labels",
    "sharegpt": "multi-turn conversations (ShareGPT or OpenAI messages) -> SFT input_ids + labels",
    "pairwise": "prompt + chosen/rejected preference records -> aligned chosen and rejected datasets",
    "prm": "step-labelled reasoning (question/steps/labels or Math-Shepherd) -> process-reward labels",
}


def _common(p: argparse.ArgumentParser, *, text: bool) -> None:
    kinds = ".jsonl/.json (one object per line or a JSON array)" + (", .txt (blank-line paragraphs)" if text else "")
    p.add_argument("--input", nargs="+", type=Path, required=True, metavar="FILE",
                   help=f"{kinds} or .parquet (needs pyarrow)")
    p.add_argument("--tokenizer", required=True, metavar="PATH|builtin",
                   help="sentencepiece .model file, Hugging Face tokenizer directory, or `builtin`")
    p.add_argument("--out", type=Path, required=True, metavar="PREFIX", help="output prefix (see docs/data.md)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1); output does not depend on it")
    p.add_argument("--strict", action="store_true", help="stop at the first malformed record (exit 2, nothing written)")


def add_parser(sub) -> None:
    p = sub.add_parser("preprocess", help="turn raw text into training data")
    kinds = p.add_subparsers(dest="kind", required=True)
    pre = kinds.add_parser("pretrain", help="jsonl/txt/parquet files -> Megatron indexed dataset (.bin + .idx)")
    _common(pre, text=True)
    pre.add_argument("--json-key", default="text", help="field holding the text (default: text)")
    pre.add_argument("--no-eod", action="store_true", help="do not append the EOS token to each document")
    pre.set_defaults(func=run)

    for kind, help_text in CHAT_KINDS.items():
        c = kinds.add_parser(kind, help=help_text)
        _common(c, text=False)
        tpl = c.add_mutually_exclusive_group()
        tpl.add_argument("--chat-template", dest="template", action="store_const", const="chat",
                         help="use the tokenizer's own chat template (error if it has none)")
        tpl.add_argument("--prompt-template", dest="template", choices=["alpaca"],
                         help="use a built-in template instead of the tokenizer's")
        c.set_defaults(template="auto")
        c.add_argument("--seq-len", type=int, default=None, metavar="N",
                       help="longest sample in tokens (and packed document length with --pack)")
        c.add_argument("--overlong", choices=["skip", "truncate"], default="skip",
                       help="what to do with a sample longer than --seq-len (default skip); counted in the summary")
        if kind != "pairwise":
            c.add_argument("--pack", action="store_true",
                           help="pack samples next-fit into documents of <= --seq-len tokens, one sequence per sample")
        if kind == "prm":
            c.add_argument("--step-tag", default=" ки", help="marker after each step; its first token holds the label")
            c.add_argument("--step-sep", default="\n", help="text between a tag and the next step (default newline)")
            c.add_argument("--good-token", default="+", help="label token of a correct step (one token)")
            c.add_argument("--bad-token", default="-", help="label token of a wrong step (one token)")
        c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from graphllm.data.preprocess import (
        ChatDataConfig,
        PretrainConfig,
        preprocess_chat,
        preprocess_pretrain,
    )

    common = {"inputs": args.input, "tokenizer": args.tokenizer, "out": args.out, "workers": args.workers,
              "strict": args.strict}
    if args.kind == "pretrain":
        cfg = PretrainConfig(**common, json_key=args.json_key, append_eod=not args.no_eod)
        job = preprocess_pretrain
    else:
        extra = {k: getattr(args, k) for k in ("step_tag", "step_sep", "good_token", "bad_token") if hasattr(args, k)}
        cfg = ChatDataConfig(kind=args.kind, **common, template=args.template, pack=getattr(args, "pack", False),
                             seq_len=args.seq_len, overlong=args.overlong, **extra)
        job = preprocess_chat
    console = Console(stderr=True)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.completed} records"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("tokenizing", total=None)
        s = job(cfg, progress=lambda n: bar.advance(task, n))
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(s.skipped.items())) or "none"
    print(f"wrote {args.out} ({args.kind}): {s.documents} documents, {s.samples} samples, {s.tokens} tokens "
          f"({s.trained_tokens} trained); skipped: {skipped}; {s.tokens_per_s:,.0f} tokens/s over {s.seconds:.1f} s")
    if s.overlong:
        print(f"  {s.overlong} samples longer than --seq-len {args.seq_len}: "
              f"{'truncated' if s.overlong_policy == 'truncate' else 'skipped'}")
    for path, no, reason in s.bad_lines[:SHOW_BAD_LINES]:
        print(f"  {path}:{no}: {reason}")
    if s.num_skipped > SHOW_BAD_LINES:
        print(f"  ... {s.num_skipped - SHOW_BAD_LINES} more")
    print(f"  files: {', '.join(Path(f).name for f in s.outputs)}; tokenizer {args.tokenizer} "
          f"(fingerprint {s.tokenizer_fingerprint}: `graphllm run --data` checks it against the model's)")
    return 0
