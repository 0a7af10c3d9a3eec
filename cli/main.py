"""The `graphllm` command: thin argument parsing over the Python API; no logic of its own."""

from __future__ import annotations

import argparse
import logging
import sys

from graphllm.errors import GraphllmError

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    from graphllm.cli import compile_cmd, convert_cmd, eval_cmd, inspect_cmd, preprocess_cmd, profile_cmd, run_cmd
    from graphllm.cli import chat_cmd, generate_cmd

    parser = argparse.ArgumentParser(prog="graphllm", description="Graph-mode LLM training: compile, run, inspect.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each pass does")
    sub = parser.add_subparsers(dest="command", required=True)
    for mod in (compile_cmd, run_cmd, inspect_cmd, profile_cmd, preprocess_cmd, convert_cmd, eval_cmd,
                generate_cmd, chat_cmd):
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to re-run the same command on each rank
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except GraphllmError as e:
        from graphllm.launch import in_launched_world, is_rank_zero, record_user_error

        if not in_launched_world() or is_rank_zero():
            print(f"graphllm {args.command}: error: {e}", file=sys.stderr)
        record_user_error(str(e))
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"graphllm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
