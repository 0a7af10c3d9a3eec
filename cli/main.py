"""The `graphllm` command: thin argument parsing over the Python API; no logic of its own.

What reaches the user on stderr: a user error (GraphllmError, or a PassError raised in a user's own
pass) is one line and exit code 2; SIGTERM/SIGINT that stop a command at once (before or after
training, or a second one during it: StoppedBySignal) are one line and exit code 128 + the signal; any
other exception is a graphllm bug and keeps its traceback (so does a user pass's error under `-v`).
"""

from __future__ import annotations

import argparse
import logging
import sys

from graphllm.errors import GraphllmError, exception_chain

EXIT_USER_ERROR = 2
STOPPED = {"run": ("before training started; nothing was saved", "after training")}
"""What a signal that stops a command at once says, before / after its training loop (default: nothing)."""


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """`--help` shows each flag's default where its help text does not already say it (flags declared in
    graphllm/options.py say it themselves); None, False and empty defaults are not shown."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        hidden = default is None or default is False or default is argparse.SUPPRESS or default in ([], ())
        if "default" in text.lower() or hidden or not action.option_strings:
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {str(shown).replace('%', '%%')})"


def all_parsers(parser: argparse.ArgumentParser):
    """`parser` and every sub-command's parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                yield from all_parsers(sub)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from graphllm.version import __version__

    try:
        torch = version("torch")
    except PackageNotFoundError:
        torch = "not installed"
    return f"graphllm {__version__} (torch {torch}, Python {sys.version.split()[0]})"


def build_parser() -> argparse.ArgumentParser:
    from graphllm.cli import compile_cmd, convert_cmd, eval_cmd, inspect_cmd, preprocess_cmd, profile_cmd, run_cmd
    from graphllm.cli import chat_cmd, convert_args_cmd, generate_cmd, plan_cmd

    parser = argparse.ArgumentParser(prog="graphllm", description="Graph-mode LLM training: compile, run, inspect.")
    parser.add_argument("--version", action="version", version=_version(), help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log what each pass does; show the traceback of an error in a user's pass")
    sub = parser.add_subparsers(dest="command", required=True)
    for mod in (compile_cmd, run_cmd, inspect_cmd, profile_cmd, preprocess_cmd, convert_cmd, eval_cmd,
                generate_cmd, chat_cmd, convert_args_cmd, plan_cmd):
        mod.add_parser(sub)
    for p in all_parsers(parser):
        p.formatter_class = DefaultsHelpFormatter
    return parser


def _say(args: argparse.Namespace, message: str, *, user_error: bool, record: bool = True) -> None:
    """One line on stderr (from rank 0 only when launched), left for the launcher too if it is a user error."""
    from graphllm.launch import in_launched_world, is_rank_zero, record_user_error

    if not in_launched_world() or is_rank_zero():
        print(f"graphllm {args.command}: {'error: ' if user_error else ''}{message}", file=sys.stderr)
    if user_error and record:
        record_user_error(message)


def _handled(args: argparse.Namespace, exc: BaseException) -> int | None:
    """The exit code after saying what `exc` means in one line, or None: a bug, keep the traceback."""
    from graphllm.launch import another_ranks_error
    from graphllm.passes import PassError
    from graphllm.signals import StoppedBySignal, stopped_at_once

    chain = list(exception_chain(exc))
    stop = next((e for e in chain if isinstance(e, StoppedBySignal)), None) or stopped_at_once()
    if stop is not None:  # whatever failed after a stop signal failed because of it
        other = another_ranks_error()
        if other is not None:  # torchrun stopped this rank because another one refused its input
            _say(args, f"{other}; this rank was then {stop.message}", user_error=True, record=False)
            return EXIT_USER_ERROR
        _say(args, stop.message, user_error=False)
        return stop.exit_code
    if isinstance(exc, GraphllmError):
        _say(args, str(exc), user_error=True)
        return EXIT_USER_ERROR
    failed = next((e for e in chain if isinstance(e, PassError)), None)
    if failed is not None and failed.user_code and not args.verbose:
        _say(args, f"{failed} ({failed.user_code}; `graphllm -v {args.command} ...` shows the traceback)",
             user_error=True)
        return EXIT_USER_ERROR
    if isinstance(exc, KeyboardInterrupt):  # SIGINT where StopAtOnce is not installed (not the main thread)
        _say(args, "interrupted", user_error=False)
        return 130
    return None


def command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The sub-command's own parser."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def main(argv: list[str] | None = None) -> int:
    from graphllm.job_config import apply_config, command_line
    from graphllm.launch import in_launched_world, rank_started
    from graphllm.signals import StopAtOnce
    from graphllm.slurm_env import adopt_slurm_env

    parser = build_parser()
    args = parser.parse_args(argv)
    adopt_slurm_env()  # under a multi-task `srun`: each task is a rank, as under torchrun
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to re-run the same command on each rank
    args.command_line = command_line(argv)  # what artifacts and metrics record
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        with StopAtOnce(*STOPPED.get(args.command, ("", ""))):
            if in_launched_world():
                rank_started()  # stop when torchrun's agent is gone (Linux); rank 0 now speaks for a stop
            apply_config(command_parser(parser, args.command), args)  # --config FILE (graphllm/job_config.py)
            return args.func(args) or 0
    except BaseException as e:  # noqa: BLE001 (what is not handled is re-raised)
        code = _handled(args, e)
        if code is None:
            raise
        return code


def entry() -> None:
    """The `graphllm` command and `python -m graphllm` (what torchrun starts as each rank): `main`, then the
    process group destroyed after a command that ran to its end, then exit. Left to the interpreter's exit,
    gloo's worker threads can abort a rank whose work is done and saved (SIGABRT, "terminate called without
    an active exception"), failing the launch. Not after a failure: a collective another rank left waiting
    could hang the destroy. Here and not in `main`: a caller of `main` may run several commands in one world."""
    code = main()
    if code == 0:
        from graphllm.parallel import groups

        groups.destroy()
    sys.exit(code)


if __name__ == "__main__":
    entry()
