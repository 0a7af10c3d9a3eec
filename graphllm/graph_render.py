"""One graph as a self-contained HTML page: an SVG drawn by layer, with the page's data and script inline.

The page opens on a drawing that stays small for any model (graph_layout.initial_state: big graphs
start with each decoder layer closed and identical layers folded into one "×N" box). Its script
(graph_page.js, no network, no other files) opens and closes groups on click, unfolds runs, searches
node names / targets / modules / source lines, and zooms and pans. The drawing below is what the script
draws for the first state, so the page reads the same with scripts off.

The markup is made from the page data (`page_data`), the same object the script reads, so the two
draw from one source; graph_page.js's `markup` is this module's `svg_markup`, line by line.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from string import Template

from graphllm.graph_layout import (NODE_H, NODE_W, PALETTE, SOURCE_FILL, Expand, Scene, State, initial_state,
                                   item_ids, layout)
from graphllm.graph_view import GraphView, is_source

TITLE_KEYS = ("name", "op", "target", "shape", "dtype", "pass", "module", "source")
NODE_FIELDS = 9  # name, op, target, short target, shape, dtype, pass, module, source: indices into strings


def op_name(r: dict[str, str]) -> str:
    """The call target without `aten.` / `.default`: "mm", "graphllm.rms_norm"."""
    t = r["target"]
    if r["op"] == "call_function":
        t = t.removesuffix(".default").removeprefix("aten.").removeprefix("_operator.")
    return t


def short_target(r: dict[str, str]) -> str:
    t = op_name(r)
    return t if len(t) <= 24 else t[:23] + "…"


def page_data(view: GraphView, *, title: str, created: str, expand: Expand) -> dict:
    """Everything the page draws from: nodes as rows of string-table indices (targets, shapes and
    modules repeat across layers, so the table keeps a big graph's page small), groups, runs, states."""
    strings: dict[str, int] = {}

    def s(text: str) -> int:
        return strings.setdefault(text, len(strings))

    passes = list(dict.fromkeys(r["pass"] for r in view.rows if r["pass"]))
    colour = {p: PALETTE[i % len(PALETTE)] for i, p in enumerate(passes)}
    nodes = []
    for i, r in enumerate(view.rows):
        module = f"{view.groups[view.group_of[i]].path} (inferred from its inputs)" if view.inferred[i] else r["module"]
        fill = SOURCE_FILL if is_source(r) else colour.get(r["pass"], "#ffffff")
        ink = "#000000" if is_source(r) or not r["pass"] else "#ffffff"
        fields = (r["name"], r["op"], r["target"], short_target(r), r["shape"], r.get("dtype", ""), r["pass"], module,
                  r["source"])
        nodes.append([s(f) for f in fields] + [view.group_of[i], s(fill), s(ink),
                                               int(bool(created) and r["pass"] == created)])
    made = [0] * len(view.groups)
    for i, node in enumerate(nodes):
        g = view.group_of[i]
        while node[-1] and g >= 0 and not made[g]:
            made[g], g = 1, view.groups[g].parent
    layers = initial_state(view, "layers")
    first = initial_state(view, expand)
    return {
        "title": title, "created": created, "strings": list(strings),
        "nodes": nodes, "inputs": view.inputs,
        "groups": [[g.path, g.label, g.parent, g.key, g.size, made[k]] for k, g in enumerate(view.groups)],
        "runs": [[run.parent, list(run.members), run.label] for run in view.runs],
        "passes": [[p, colour[p], sum(1 for r in view.rows if r["pass"] == p)] for p in passes],
        "layers": {"expanded": sorted(layers.expanded), "unfolded": sorted(layers.unfolded)},
        "initial": {"expanded": sorted(first.expanded), "unfolded": sorted(first.unfolded)},
    }


def state_of(data: dict, which: str) -> State:
    return State(frozenset(data[which]["expanded"]), frozenset(data[which]["unfolded"]))


def _esc(text: str) -> str:
    return html.escape(text)


def _node(data: dict, i: int, box: tuple[int, int, int, int]) -> str:
    x, y, _, _ = box
    node, st = data["nodes"][i], data["strings"]
    name, fill, ink = st[node[0]], st[node[NODE_FIELDS + 1]], st[node[NODE_FIELDS + 2]]
    title = "\n".join(f"{k}: {st[node[f]]}" for k, f in zip(TITLE_KEYS, (0, 1, 2, 4, 5, 6, 7, 8)) if st[node[f]])
    cls = "node created" if node[NODE_FIELDS + 3] else "node"
    return (f'<g class="{cls}" id="n-{_esc(name)}" data-n="{i}"><title>{_esc(title)}</title>'
            f'<rect x="{x}" y="{y}" width="{NODE_W}" height="{NODE_H}" rx="5" fill="{fill}"/>'
            f'<text x="{x + 6}" y="{y + 14}" fill="{ink}">{_esc(name[:26])}</text>'
            f'<text x="{x + 6}" y="{y + 28}" fill="{ink}" class="t">{_esc(st[node[3]])}</text></g>')


def _group(data: dict, g: int, box: tuple[int, int, int, int], is_open: bool) -> str:
    x, y, w, h = box
    path, label, _, _, size, made = data["groups"][g]
    cls = "group open" if is_open else "group"
    cls += " created" if made else ""
    hint = "click its title to close" if is_open else "click to open"
    head = (f'<text class="head" x="{x + 8}" y="{y + 16}">{_esc(label)} · {size} nodes</text>' if is_open else
            f'<text x="{x + 6}" y="{y + 14}">{_esc(label[:26])}</text>'
            f'<text x="{x + 6}" y="{y + 28}" class="t">{size} nodes</text>')
    return (f'<g class="{cls}" data-g="{g}"><title>{_esc(path or "graph")}\n{size} nodes · {hint}</title>'
            f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="{8 if is_open else 5}"/>{head}</g>')


def _run(data: dict, r: int, box: tuple[int, int, int, int]) -> str:
    x, y, w, h = box
    _, members, label = data["runs"][r]
    each, first, last = data["groups"][members[0]][4], data["groups"][members[0]][0], data["groups"][members[-1]][0]
    made = any(data["groups"][m][5] for m in members)
    return (f'<g class="group run{" created" if made else ""}" data-r="{r}"><title>{len(members)} identical layers: '
            f'{_esc(first)} … {_esc(last)}\n{each} nodes each · click to show them one by one</title>'
            f'<rect class="stack" x="{x + 4}" y="{y - 4}" width="{w}" height="{h}" rx="5"/>'
            f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="5"/>'
            f'<text x="{x + 6}" y="{y + 14}">{_esc(label[:20])}</text>'
            f'<text x="{x + 6}" y="{y + 28}" class="t">{each} nodes each</text>'
            f'<text class="badge" x="{x + w - 6}" y="{y + 14}">×{len(members)}</text></g>')


def _edge(a: tuple[int, int, int, int], b: tuple[int, int, int, int], count: int, returned: bool) -> str:
    """A curve from the bottom of box a to the top of box b; thicker for more edges. Edges into the
    graph's output node (`returned`: every gradient of a backward graph) are drawn faint and thin."""
    sx, sy, ex, ey = a[0] + a[2] // 2, a[1] + a[3], b[0] + b[2] // 2, b[1]
    mid = (sy + ey) // 2
    d = f'd="M{sx},{sy} C{sx},{mid} {ex},{mid} {ex},{ey}" marker-end="url(#arrow)"'
    if count == 1:
        return f'<path class="edge{" ret" if returned else ""}" {d}/>'
    if returned:
        return f'<path class="edge ret" data-k="{count}" {d}><title>{count} edges</title></path>'
    return (f'<path class="edge" data-k="{count}" style="stroke-width:{1 + min(3, count.bit_length() - 1)}" {d}>'
            f'<title>{count} edges</title></path>')


def svg_markup(data: dict, scene: Scene) -> str:
    """The drawing's elements: open-group frames (outer first), then edges, then nodes and closed boxes."""
    n, gr = len(data["nodes"]), len(data["nodes"]) + len(data["groups"])
    out = [_group(data, f - n, scene.boxes[f], True) for f in scene.frames]
    out += [_edge(scene.boxes[a], scene.boxes[b], k, b < n and data["strings"][data["nodes"][b][1]] == "output")
            for (a, b), k in scene.edges.items()]
    for i in scene.leaves:
        box = scene.boxes[i]
        out.append(_node(data, i, box) if i < n else _group(data, i - n, box, False) if i < gr else
                   _run(data, i - gr, box))
    return "\n".join(out)


def render_html(view: GraphView, *, title: str, created: str = "", expand: Expand = "auto") -> str:
    data = page_data(view, title=title, created=created, expand=expand)
    scene = layout(view, state_of(data, "initial"))
    n, gr = item_ids(view)
    shown = sum(1 for i in scene.leaves if i < n)
    boxes = sum(1 for i in scene.leaves if i >= n)
    legend = "".join(f'<li><span class="sw" style="background:{c}"></span>{_esc(p)}: {k} nodes</li>'
                     for p, c, k in data["passes"])
    made = [r["name"] for r in view.rows if created and r["pass"] == created]
    made_html = (f'<p>Nodes created by <b>{_esc(created)}</b> ({len(made)}, outlined): '
                 f'{_esc(", ".join(made)) or "none"}</p>') if created else ""
    here = Path(__file__).parent
    script = "\n".join((here / f).read_text() for f in ("graph_page.js", "graph_page_ui.js"))
    assert "</script" not in script.lower()  # the script sits inline in a <script> element
    return Template((here / "graph_page.html").read_text()).substitute(
        title=_esc(title), nodes=len(view.rows), edges=sum(len(i) for i in view.inputs), groups=len(view.groups) - 1,
        runs=len(view.runs), shown=shown, boxes=boxes, legend=legend, made=made_html, w=scene.width,
        h=scene.height, markup=svg_markup(data, scene), script=script,
        data=json.dumps(data, separators=(",", ":")).replace("<", "\\u003c"))  # no "</script" or "<!--" in the data
