"""`graphllm inspect ARTIFACT`: list the dumped graphs, show one, or diff two."""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="list an artifact's graphs per pass, show one, diff two")
    p.add_argument("artifact", type=Path)
    p.add_argument("--rank", type=int, default=0, help="which rank's graphs (default 0)")
    p.add_argument("--show", "--pass", dest="show", metavar="GRAPH", help="print one graph: a pass name, its number, forward or backward")
    p.add_argument("--table", action="store_true", help="with --show: the node table instead of the code")
    p.add_argument("--diff", nargs=2, metavar=("A", "B"), help="unified diff of two graphs' code")
    p.set_defaults(func=run)


def _graph_files(root: Path, rank: int) -> list[tuple[str, str, Path]]:
    """(stage, name, path of .py) in pipeline order."""
    from graphllm.artifact import graphs_dir, read_plan
    from graphllm.errors import GraphllmError

    read_plan(root)
    base = graphs_dir(root, rank)
    if not base.is_dir():
        raise GraphllmError(f"{root} has no graphs for rank {rank} (have: "
                            f"{', '.join(sorted(p.name for p in (root / 'graphs').glob('rank*'))) or 'none'})")
    out = [("model", p.stem, p) for p in sorted((base / "model").glob("*.py"))]
    train = sorted((base / "train").glob("*.py"), key=lambda p: (p.stem.split(".")[0] != "forward", p.stem))
    out += [("train", p.stem, p) for p in train]
    return out


def _find(files: list[tuple[str, str, Path]], key: str) -> Path:
    from graphllm.errors import GraphllmError

    for stage, name, path in files:
        number, _, pass_name = name.partition("_")
        if key in (name, pass_name) or (stage == "model" and key.isdigit() and int(key) == int(number)):
            return path
    raise GraphllmError(f"no graph named {key!r}; `graphllm inspect ARTIFACT` lists them "
                        f"({', '.join(n for _, n, _ in files)})")


def _count(path: Path) -> tuple[int, int]:
    rows = path.with_suffix(".tsv").read_text().splitlines()[1:]
    return len(rows), sum(1 for r in rows if r.split("\t")[2] == "call_function")


def run(args: argparse.Namespace) -> int:
    files = _graph_files(args.artifact, args.rank)
    console = Console()
    if args.diff:
        a, b = (_find(files, k) for k in args.diff)
        diff = difflib.unified_diff(a.read_text().splitlines(), b.read_text().splitlines(), a.name, b.name, lineterm="")
        sys.stdout.write("\n".join(diff) + "\n")
        return 0
    if args.show:
        path = _find(files, args.show)
        if not args.table:
            sys.stdout.write(path.read_text())
            return 0
        lines = path.with_suffix(".tsv").read_text().splitlines()
        table = Table(*lines[0].split("\t"), title=path.stem, show_lines=False)
        for line in lines[1:]:
            table.add_row(*line.split("\t"))
        console.print(table)
        return 0
    table = Table("stage", "graph", "nodes", "calls", "Δ nodes", title=f"{args.artifact} rank {args.rank}")
    prev = None
    for stage, name, path in files:
        nodes, calls = _count(path)
        delta = "" if prev is None or stage != "model" else f"{nodes - prev:+d}"
        table.add_row(stage, name, str(nodes), str(calls), delta)
        prev = nodes if stage == "model" else prev
    console.print(table)
    console.print("show one: --show NAME [--table]; compare: --diff A B")
    return 0
