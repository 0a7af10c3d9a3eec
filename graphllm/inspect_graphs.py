"""What `graphllm inspect` reads and draws: the artifact's graph dumps (the `.tsv` node tables).

Finds graphs by name (pass name, its number, forward/backward, `stage0/forward`), counts call
targets, searches nodes by target / module path / source line, and writes one graph as a self-contained
HTML page (graph_render: layer by layer, with search, zoom and pan), Graphviz dot (or SVG where `dot`
exists) or Model Explorer's JSON (graph_export).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from graphllm.errors import GraphllmError
from graphllm.graph_export import model_explorer_graphs, render_dot
from graphllm.graph_layout import Expand
from graphllm.graph_render import render_html
from graphllm.graph_view import CALL_OPS, build_view


@dataclass(frozen=True, slots=True)
class GraphFile:
    stage: str  # "model" or "train"
    name: str  # "03_fuse_swiglu", "forward", "stage0/forward", "forward.after_coc"
    path: Path  # the .py dump; the table is path.with_suffix(".tsv")

    @property
    def pass_name(self) -> str:
        """The pass whose output this graph is ("" for a train graph straight out of partitioning)."""
        if self.stage == "model":
            return self.name.partition("_")[2]
        return self.name.rpartition(".after_")[2] if ".after_" in self.name else ""


def list_graphs(root: Path, rank: int) -> list[GraphFile]:
    """The rank's graphs in pipeline order: model passes by number, then train graphs (forward first)."""
    from graphllm.artifact import graphs_dir, read_plan

    read_plan(root)
    base = graphs_dir(root, rank)
    if not base.is_dir():
        raise GraphllmError(f"{root} has no graphs for rank {rank} (have: "
                            f"{', '.join(sorted(p.name for p in (root / 'graphs').glob('rank*'))) or 'none'})")
    out = [GraphFile("model", p.stem, p) for p in sorted((base / "model").glob("*.py"))]
    train = base / "train"
    names = sorted((p.relative_to(train).with_suffix("").as_posix(), p) for p in train.rglob("*.py"))
    # forward before backward within each pipeline stage: stage0/forward, stage0/backward, stage1/...
    names.sort(key=lambda np: (np[0].rpartition("/")[0], np[0].rpartition("/")[2].split(".")[0] != "forward", np[0]))
    out += [GraphFile("train", n, p) for n, p in names]
    return out


def find_graph(files: list[GraphFile], key: str) -> GraphFile:
    """The graph named `key`: its full name, its pass name, or a model pass's number."""
    for g in files:
        number, _, pass_name = g.name.partition("_")
        if key in (g.name, pass_name) or (g.stage == "model" and key.isdigit() and int(key) == int(number)):
            return g
    raise GraphllmError(f"no graph named {key!r}; `graphllm inspect ARTIFACT` lists them "
                        f"({', '.join(g.name for g in files)})")


def read_rows(g: GraphFile) -> list[dict[str, str]]:
    """The node table of one graph, one dict per node keyed by the .tsv header (dumps.TABLE_COLUMNS)."""
    lines = g.path.with_suffix(".tsv").read_text().splitlines()
    header = lines[0].split("\t")
    rows = []
    for line in lines[1:]:
        cells = line.split("\t")
        rows.append(dict(zip(header, cells + [""] * (len(header) - len(cells)))))
    for r in rows:
        r.setdefault("inputs", "")  # dumps written before the inputs column existed
    return rows


def op_histogram(rows: list[dict[str, str]]) -> list[tuple[str, int]]:
    """(call target, count) for the graph's calls, most frequent first (ties by name)."""
    counts = Counter(r["target"] for r in rows if r["op"] in CALL_OPS)
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def find_nodes(files: list[GraphFile], text: str) -> list[tuple[str, dict[str, str]]]:
    """(graph name, node row) for nodes whose target, module path or source contains `text` (any case)."""
    if not text:
        raise GraphllmError("--find needs a non-empty TEXT")
    needle = text.lower()
    return [(g.name, r) for g in files for r in read_rows(g)
            if any(needle in r.get(c, "").lower() for c in ("target", "module", "source"))]


# ---------------------------------------------------------------------------------------------- render

RENDER_SUFFIXES = (".html", ".htm", ".svg", ".dot", ".json")


def render(g: GraphFile, out: Path, *, title: str, expand: Expand = "auto") -> Path:
    """Write graph `g` to `out` by its suffix: .html (a page that opens layer by layer, graph_render),
    .svg (graphviz's `dot` on the clustered dot), .dot (that dot text) or .json (Model Explorer's graph
    collection). `expand` is the page's first state (graph_layout.initial_state)."""
    suffix = out.suffix.lower()
    if suffix not in RENDER_SUFFIXES:
        raise GraphllmError(f"--out must end in {', '.join(RENDER_SUFFIXES)}, got {str(out)!r}")
    if out.parent and not out.parent.is_dir():
        raise GraphllmError(f"--out {out}: directory {out.parent} does not exist")
    rows = read_rows(g)
    if rows and "inputs" not in rows[0]:
        raise GraphllmError(f"{g.path.with_suffix('.tsv')} has no inputs column; recompile the artifact")
    view = build_view(rows)
    if suffix == ".json":
        graphs = model_explorer_graphs(view, graph_id=g.name, label=title)
        out.write_text(json.dumps(graphs, separators=(",", ":")) + "\n")
    elif suffix == ".dot":
        out.write_text(render_dot(view, title=title))
    elif suffix == ".svg":
        dot = shutil.which("dot")
        if dot is None:
            raise GraphllmError(f"--out {out}: .svg needs graphviz's `dot` on PATH; use --out FILE.html instead")
        proc = subprocess.run([dot, "-Tsvg", "-o", str(out)], input=render_dot(view, title=title), text=True,
                              capture_output=True, check=False)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise GraphllmError(f"graphviz `dot` failed on {g.name}: {last}; use --out FILE.html instead")
    else:
        out.write_text(render_html(view, title=title, created=g.pass_name, expand=expand))
    return out
