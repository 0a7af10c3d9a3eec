"""`--help` of every command: every flag and argument has help text, and each flag with a default worth
stating (not None, False or empty) shows it, whether the flag is declared in graphllm/options.py (compile, run)
or by hand (the other commands)."""

from __future__ import annotations

import argparse

from graphllm.cli.main import DefaultsHelpFormatter, all_parsers, build_parser

SKIPPED = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def _actions():
    for parser in all_parsers(build_parser()):
        for action in parser._actions:
            if not isinstance(action, SKIPPED):
                yield parser, action


def test_every_flag_and_argument_has_help() -> None:
    missing = [f"{p.prog} {a.option_strings or a.dest}" for p, a in _actions()
               if not a.help or a.help == argparse.SUPPRESS]
    assert missing == []


def test_every_default_worth_stating_is_shown() -> None:
    unshown = []
    for parser, action in _actions():
        default = action.default
        if not action.option_strings or default is None or default is False or default in ([], ()):
            continue
        text = DefaultsHelpFormatter(parser.prog)._get_help_string(action)
        if "default" not in text.lower():
            unshown.append(f"{parser.prog} {action.option_strings[0]} (default {default!r})")
    assert unshown == []


def test_help_of_every_command_renders(capsys) -> None:
    """Each parser's --help formats (a help text with a stray % would raise here)."""
    for parser in all_parsers(build_parser()):
        assert parser.prog in parser.format_help()
    steps = next(a for p, a in _actions() if p.prog == "graphllm run" and "--steps" in a.option_strings)
    assert "total" in steps.help and "(default: 50)" in steps.help  # resumed runs stop at the same step
