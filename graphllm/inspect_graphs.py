"""What `graphllm inspect` reads and draws: the artifact's graph dumps (the `.tsv` node tables).

Finds graphs by name (pass name, its number, forward/backward, `stage0/forward`), counts call
targets, searches nodes by target / module path / source line, and renders one graph as a
self-contained HTML page (inline SVG, no scripts or network) or, where graphviz's `dot` exists, SVG.
"""

from __future__ import annotations

import html
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from graphllm.errors import GraphllmError

CALL_OPS = ("call_function", "call_method", "call_module")
SOURCE_OPS = ("placeholder", "get_attr")  # nodes with no inputs: graph inputs and parameters


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

_PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
            "#9c755f", "#bab0ac", "#1f77b4", "#d62728")
_SOURCE_FILL = "#eeeeee"  # placeholders and parameters: grey, so the computation stands out
NODE_W, NODE_H, GAP_X, GAP_Y, MARGIN = 170, 34, 20, 36, 20


def _layers(rows: list[dict[str, str]]) -> dict[str, int]:
    """Layer of each node: 1 + the deepest computed input; inputs/parameters sit one layer above their
    first user, so weights are drawn beside the op that reads them rather than in one very wide top row."""
    layer: dict[str, int] = {}
    sources = {r["name"] for r in rows if _is_source(r)}
    for r in rows:  # rows are in topological order
        ins = [layer[i] for i in _inputs(r) if i in layer and i not in sources]
        layer[r["name"]] = 0 if r["name"] in sources else 1 + max(ins, default=0)
    users: dict[str, list[int]] = {}
    for r in rows:
        for i in _inputs(r):
            users.setdefault(i, []).append(layer[r["name"]])
    for name in sources:
        layer[name] = max(0, min(users.get(name, [1])) - 1)
    return layer


def _is_source(r: dict[str, str]) -> bool:
    return r["op"] in SOURCE_OPS


def _inputs(r: dict[str, str]) -> list[str]:
    return [i for i in r.get("inputs", "").split(",") if i]


def _short_target(r: dict[str, str]) -> str:
    t = r["target"]
    if r["op"] == "call_function":
        t = t.removesuffix(".default").removeprefix("aten.").removeprefix("_operator.")
    return t if len(t) <= 24 else t[:23] + "…"


def _title(r: dict[str, str]) -> str:
    return "\n".join(f"{k}: {r[k]}" for k in ("name", "op", "target", "shape", "dtype", "pass", "module", "source")
                     if r.get(k))


def render_html(g: GraphFile, rows: list[dict[str, str]], *, title: str) -> str:
    """One self-contained page: a layered SVG of the graph (one <g class="node"> per node, one
    <path class="edge"> per input reference), coloured by the pass that created each node."""
    if rows and "inputs" not in rows[0]:
        raise GraphllmError(f"{g.path.with_suffix('.tsv')} has no inputs column; recompile the artifact")
    layer = _layers(rows)
    by_layer: dict[int, list[dict[str, str]]] = {}
    for r in rows:
        by_layer.setdefault(layer[r["name"]], []).append(r)
    pos: dict[str, tuple[int, int]] = {}
    for y, layer_rows in sorted(by_layer.items()):
        for x, r in enumerate(layer_rows):
            pos[r["name"]] = (MARGIN + x * (NODE_W + GAP_X), MARGIN + y * (NODE_H + GAP_Y))
    width = MARGIN * 2 + max((len(v) for v in by_layer.values()), default=1) * (NODE_W + GAP_X)
    height = MARGIN * 2 + (max(by_layer, default=0) + 1) * (NODE_H + GAP_Y)
    passes = list(dict.fromkeys(r["pass"] for r in rows if r["pass"]))
    colour = {p: _PALETTE[i % len(_PALETTE)] for i, p in enumerate(passes)}
    created = g.pass_name

    edges = []
    for r in rows:
        x1, y1 = pos[r["name"]]
        for i in _inputs(r):
            if i not in pos:
                continue
            x0, y0 = pos[i]
            sx, sy, ex, ey = x0 + NODE_W // 2, y0 + NODE_H, x1 + NODE_W // 2, y1
            mid = (sy + ey) / 2
            edges.append(f'<path class="edge" data-from="{html.escape(i)}" data-to="{html.escape(r["name"])}" '
                         f'd="M{sx},{sy} C{sx},{mid} {ex},{mid} {ex},{ey}" marker-end="url(#arrow)"/>')
    nodes = []
    for r in rows:
        x, y = pos[r["name"]]
        fill = _SOURCE_FILL if _is_source(r) else colour.get(r["pass"], "#ffffff")
        ink = "#000000" if _is_source(r) or not r["pass"] else "#ffffff"
        cls = "node created" if created and r["pass"] == created else "node"
        nodes.append(
            f'<g class="{cls}" id="n-{html.escape(r["name"])}" data-pass="{html.escape(r["pass"])}">'
            f'<title>{html.escape(_title(r))}</title>'
            f'<rect x="{x}" y="{y}" width="{NODE_W}" height="{NODE_H}" rx="5" fill="{fill}"/>'
            f'<text x="{x + 6}" y="{y + 14}" fill="{ink}">{html.escape(r["name"][:26])}</text>'
            f'<text x="{x + 6}" y="{y + 28}" fill="{ink}" class="t">{html.escape(_short_target(r))}</text></g>')
    legend = "".join(f'<li><span class="sw" style="background:{colour[p]}"></span>{html.escape(p)}: '
                     f'{sum(1 for r in rows if r["pass"] == p)} nodes</li>' for p in passes)
    made = [r["name"] for r in rows if created and r["pass"] == created]
    made_html = (f'<p>Nodes created by <b>{html.escape(created)}</b> ({len(made)}, outlined): '
                 f'{html.escape(", ".join(made)) or "none"}</p>') if created else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
ul.legend {{ list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: 1em; }}
.sw {{ display: inline-block; width: 1em; height: 1em; margin-right: .3em; vertical-align: middle; }}
svg text {{ font: 11px monospace; pointer-events: none; }}
svg text.t {{ font-size: 10px; }}
svg .node rect {{ stroke: #555; stroke-width: 1; }}
svg .node.created rect {{ stroke: #000; stroke-width: 3; }}
svg .node:hover rect {{ stroke: #d00; stroke-width: 3; }}
svg .edge {{ fill: none; stroke: #999; stroke-width: 1; }}
</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>{len(rows)} nodes, {len(edges)} edges. Colour: the pass that created the node (grey: inputs and parameters).
Hover a node for its shape, module and source line.</p>
<ul class="legend">{legend}</ul>
{made_html}
<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">
<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" orient="auto">
<path d="M0,0 L10,5 L0,10 z" fill="#999"/></marker></defs>
{chr(10).join(edges)}
{chr(10).join(nodes)}
</svg>
</body></html>
"""


def render_dot(rows: list[dict[str, str]], *, title: str) -> str:
    """The graph in graphviz's dot language (for `--out FILE.svg`)."""
    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    passes = list(dict.fromkeys(r["pass"] for r in rows if r["pass"]))
    colour = {p: _PALETTE[i % len(_PALETTE)] for i, p in enumerate(passes)}
    lines = [f"digraph {q(title)} {{", '  node [shape=box, style="rounded,filled", fontname=monospace, fontsize=10];']
    for r in rows:
        fill = _SOURCE_FILL if _is_source(r) else colour.get(r["pass"], "#ffffff")
        lines.append(f'  {q(r["name"])} [label={q(r["name"] + chr(10) + _short_target(r))}, '
                     f'fillcolor={q(fill)}, tooltip={q(_title(r))}];')
    lines += [f"  {q(i)} -> {q(r['name'])};" for r in rows for i in _inputs(r)]
    return "\n".join(lines + ["}"]) + "\n"


def render(g: GraphFile, out: Path, *, title: str) -> Path:
    """Write graph `g` to `out`: .html (always available) or .svg (needs graphviz's `dot`)."""
    rows = read_rows(g)
    suffix = out.suffix.lower()
    if suffix not in (".html", ".htm", ".svg"):
        raise GraphllmError(f"--out must end in .html or .svg, got {str(out)!r}")
    if out.parent and not out.parent.is_dir():
        raise GraphllmError(f"--out {out}: directory {out.parent} does not exist")
    if suffix == ".svg":
        dot = shutil.which("dot")
        if dot is None:
            raise GraphllmError(f"--out {out}: .svg needs graphviz's `dot` on PATH; use --out FILE.html instead")
        proc = subprocess.run([dot, "-Tsvg", "-o", str(out)], input=render_dot(rows, title=title), text=True,
                              capture_output=True, check=False)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise GraphllmError(f"graphviz `dot` failed on {g.name}: {last}; use --out FILE.html instead")
        return out
    out.write_text(render_html(g, rows, title=title))
    return out
