"""Consoles and tables for graphllm's commands, whole at a terminal and redirected alike.

At a terminal: rich's console at the terminal's width, tables drawn with borders. Redirected (a file, a pipe,
nohup, Slurm, CI): rich would assume 80 columns and cut or wrap every table and long line; instead no width limit
is assumed, and tables are written as tab-separated lines under a `# title` line — nothing cut, easy to grep.
`COLUMNS` in the environment still sets the width, as with rich itself.
"""

from __future__ import annotations

import os

from rich.console import Console
from rich.table import Table
from rich.text import Text

PIPED_WIDTH = 1000
"""Columns assumed when the output is not a terminal: wider than any line graphllm prints."""


def make_console(*, stderr: bool = False, quiet: bool = False, **kw) -> Console:
    """A rich Console on stdout (or stderr) for a command (see the module docstring)."""
    console = Console(stderr=stderr, quiet=quiet, **kw)
    if not console.is_terminal and not os.environ.get("COLUMNS") and "width" not in kw:
        console.width = PIPED_WIDTH
    return console


def _plain(cell) -> str:
    text = cell.plain if isinstance(cell, Text) else Text.from_markup(str(cell)).plain
    return text.replace("\t", " ").replace("\n", " ")


def print_table(console: Console, table: Table) -> None:
    """`table` drawn at a terminal; tab-separated lines (a header line first) when redirected."""
    if console.is_terminal:
        console.print(table)
        return
    if console.quiet:
        return
    rows = [[_plain(c.header) for c in table.columns]]
    rows += [list(r) for r in zip(*([_plain(cell) for cell in c.cells] for c in table.columns))]
    lines = ([f"# {_plain(table.title)}"] if table.title else []) + ["\t".join(row) for row in rows]
    console.file.write("\n".join(lines) + "\n")  # not console.out: rich would expand the tabs to spaces
