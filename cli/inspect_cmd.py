"""`graphllm inspect ARTIFACT`: list the dumped graphs, show one, diff two, count its ops, find nodes,
render one to HTML/SVG/dot/Model Explorer JSON. The reading and drawing live in graphllm.inspect_graphs."""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from graphllm.cli.console import make_console, print_table
from rich.table import Table


def add_parser(sub) -> None:
    from graphllm.graph_layout import AUTO_OPEN_MAX_NODES  # no torch: cheap at parser time

    p = sub.add_parser("inspect", help="list an artifact's graphs per pass, show one, diff two")
    p.add_argument("artifact", type=Path, help="the directory `graphllm compile --out` wrote")
    p.add_argument("--rank", type=int, default=None, help="which rank's graphs (default 0; with --npu-coverage, all)")
    p.add_argument("--show", "--pass", dest="show", metavar="GRAPH", help="print one graph: a pass name, its number, forward or backward")
    p.add_argument("--table", action="store_true", help="with --show: the node table instead of the code")
    p.add_argument("--diff", nargs=2, metavar=("A", "B"), help="unified diff of two graphs' code")
    p.add_argument("--ops", metavar="GRAPH", help="histogram of one graph's call targets (op -> count)")
    p.add_argument("--find", metavar="TEXT", help="nodes whose target, module path or source contains TEXT "
                   "(any case), in all the rank's graphs")
    p.add_argument("--in", dest="in_graph", metavar="GRAPH", help="with --find: search only this graph")
    p.add_argument("--render", metavar="GRAPH", help="draw one graph to --out FILE: .html (a self-contained page: "
                   "layers as boxes to open, search, zoom), .svg (graphviz), .dot (graphviz clusters by module) or "
                   ".json (Google Model Explorer's graph JSON)")
    p.add_argument("--out", type=Path, metavar="FILE", help="with --render: where to write the drawing")
    p.add_argument("--expand", choices=("auto", "all", "layers"), default=None,
                   help="with --render to .html: the page's first view: every node (all), each layer a box "
                   f"and identical layers folded (layers), or all up to {AUTO_OPEN_MAX_NODES} nodes, else layers "
                   "(auto, the default)")
    p.add_argument("--pipeline", action="store_true",
                   help="the steps that made the graphs: stage, options, origin, why, nodes changed on --rank")
    p.add_argument("--npu-coverage", action="store_true",
                   help="the Ascend pre-flight of an npu artifact: every op of every graph with its torchair status "
                        "(fused kernel, converter, conditional, stub, no converter, not capturable)")
    p.set_defaults(func=run)


def _count(path: Path) -> tuple[int, int]:
    rows = path.with_suffix(".tsv").read_text().splitlines()[1:]
    return len(rows), sum(1 for r in rows if r.split("\t")[2] == "call_function")


def _print_pipeline(args: argparse.Namespace) -> int:
    """A table on a terminal; tab-separated lines otherwise (cli/console.py: nothing cut, easy to grep)."""
    from graphllm.inspect_pipeline import COLUMNS, pipeline_rows

    table = Table(*COLUMNS, title=f"{args.artifact} rank {args.rank}: pipeline", show_lines=True)
    for r in pipeline_rows(args.artifact, args.rank):
        table.add_row(*(r[c] for c in COLUMNS))
    print_table(make_console(), table)
    return 0


def run(args: argparse.Namespace) -> int:
    from graphllm import inspect_graphs as ig
    from graphllm.errors import GraphllmError

    if args.in_graph and not args.find:
        raise GraphllmError("--in GRAPH only narrows --find TEXT; add --find")
    if (args.render is None) != (args.out is None):
        raise GraphllmError("--render GRAPH and --out FILE go together (e.g. --render forward --out g.html)")
    if args.expand is not None and (args.out is None or args.out.suffix.lower() not in (".html", ".htm")):
        raise GraphllmError(f"--expand {args.expand} only sets the first view of an --out FILE.html page")
    npu_rank, args.rank = args.rank, 0 if args.rank is None else args.rank  # --npu-coverage: all ranks by default
    if args.pipeline:
        return _print_pipeline(args)
    if args.npu_coverage:
        from graphllm.cli.npu_coverage import print_ops
        from graphllm.npu_preflight import read_preflight

        pre = read_preflight(args.artifact)
        ranks = sorted({c["rank"] for c in pre["checks"]})
        if npu_rank is not None and npu_rank not in ranks:
            raise GraphllmError(f"--rank {npu_rank}: {args.artifact} has the pre-flight of ranks "
                                f"{', '.join(map(str, ranks))}")
        print_ops(make_console(), pre, rank=npu_rank)
        return 0
    files = ig.list_graphs(args.artifact, args.rank)
    console = make_console()
    if args.ops:
        g = ig.find_graph(files, args.ops)
        hist = ig.op_histogram(ig.read_rows(g))
        table = Table(title=f"{g.name} rank {args.rank}: {sum(n for _, n in hist)} calls")
        table.add_column("op", overflow="fold")
        table.add_column("count", justify="right")
        for target, n in hist:
            table.add_row(target, str(n))
        print_table(console, table)
        return 0
    if args.find is not None:
        scope = [ig.find_graph(files, args.in_graph)] if args.in_graph else files
        hits = ig.find_nodes(scope, args.find)
        table = Table(title=f"{len(hits)} nodes matching {args.find!r} (rank {args.rank})")
        for col in ("graph", "name", "target", "shape", "module", "source"):
            table.add_column(col, overflow="fold")  # names and paths stay whole, wrapped rather than cut
        for graph, r in hits:
            table.add_row(graph, r["name"], r["target"], r["shape"], r["module"], r["source"])
        print_table(console, table)
        return 0
    if args.render:
        g = ig.find_graph(files, args.render)
        out = ig.render(g, args.out, title=f"{args.artifact.name} rank {args.rank}: {g.name}",
                        expand=args.expand or "auto")
        console.print(f"wrote {out}")
        return 0
    if args.diff:
        a, b = (ig.find_graph(files, k).path for k in args.diff)
        diff = difflib.unified_diff(a.read_text().splitlines(), b.read_text().splitlines(), a.name, b.name, lineterm="")
        sys.stdout.write("\n".join(diff) + "\n")
        return 0
    if args.show:
        path = ig.find_graph(files, args.show).path
        if not args.table:
            sys.stdout.write(path.read_text())
            return 0
        lines = path.with_suffix(".tsv").read_text().splitlines()
        table = Table(*lines[0].split("\t"), title=path.stem, show_lines=False)
        for line in lines[1:]:
            table.add_row(*line.split("\t"))
        print_table(console, table)
        return 0
    table = Table("stage", "graph", "nodes", "calls", "Δ nodes", title=f"{args.artifact} rank {args.rank}")
    prev = None
    for stage, name, path in ((g.stage, g.name, g.path) for g in files):
        nodes, calls = _count(path)
        delta = "" if prev is None or stage != "model" else f"{nodes - prev:+d}"
        table.add_row(stage, name, str(nodes), str(calls), delta)
        prev = nodes if stage == "model" else prev
    print_table(console, table)
    _print_invocation(console, args.artifact)
    console.print("show one: --show NAME [--table]; compare: --diff A B; ops: --ops NAME; "
                  "search: --find TEXT [--in NAME]; draw: --render NAME --out FILE.html|.dot|.json")
    return 0


def _print_invocation(console, artifact: Path) -> None:
    """The command line that compiled the artifact, with graphllm's commit and job file (invocation.json)."""
    from graphllm.artifact import INVOCATION_FILE, read_invocation

    record = read_invocation(artifact)
    if record is None:
        console.print(f"compiled by: not recorded (no {INVOCATION_FILE}: compiled from Python or by an older graphllm)")
        return
    extra = [f"graphllm {record['git_commit']}" if record.get("git_commit") else "",
             f"config {record['config_file']}" if record.get("config_file") else ""]
    console.print(f"compiled by: {record.get('command_line')}" + "".join(f"; {e}" for e in extra if e),
                  markup=False, highlight=False, soft_wrap=True)  # one line however long: grep finds it whole
