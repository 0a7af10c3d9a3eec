"""Where each box of a graph drawing goes, for one state of the view (which groups are open, which runs
of repeated layers are shown one by one), and the SVG markup of that drawing.

The page's script (graph_page.js) does the same steps in the same order, so a click redraws exactly
what this module would have drawn for the new state (tests/test_inspect.py compares the two).

Items: a node, a closed group, or a folded run. Inside an open group, items sit in rows by their
depth along the edges between them (longest path, in graph order; an input or parameter sits one row
above its first reader); a row is centred; an open group is a frame around its rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from graphllm.graph_view import GraphView, is_source

NODE_W, NODE_H, GAP_X, GAP_Y, MARGIN = 170, 34, 20, 36, 20
PAD, HEAD = 10, 24  # an open group's frame: side padding, title band
AUTO_OPEN_MAX_NODES = 500  # `expand="auto"`: graphs up to this size start fully open
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac", "#1f77b4", "#d62728")
SOURCE_FILL = "#eeeeee"  # placeholders and parameters: grey, so the computation stands out

Expand = Literal["auto", "all", "layers"]


@dataclass(frozen=True, slots=True)
class State:
    expanded: frozenset[int]  # open groups (the root, 0, always is)
    unfolded: frozenset[int]  # runs drawn as their separate layers


@dataclass(slots=True)
class Scene:
    boxes: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)  # item -> x, y, w, h
    frames: list[int] = field(default_factory=list)  # open groups (item ids), outer first
    leaves: list[int] = field(default_factory=list)  # nodes, closed groups, folded runs: drawing order
    edges: dict[tuple[int, int], int] = field(default_factory=dict)  # (from item, to item) -> edges
    width: int = 0
    height: int = 0


def initial_state(view: GraphView, expand: Expand = "auto") -> State:
    """The page's first view. "all": every group open, every run unfolded. "layers": open down to the
    numbered layers (`model`, `model.layers`), each layer closed, identical layers folded. "auto":
    "all" for graphs of up to AUTO_OPEN_MAX_NODES nodes, else "layers"."""
    if expand == "auto":
        expand = "all" if len(view.rows) <= AUTO_OPEN_MAX_NODES else "layers"
    if expand == "all":
        return State(frozenset(range(len(view.groups))), frozenset(range(len(view.runs))))
    numbered = {g for g, group in enumerate(view.groups) if group.path.rpartition(".")[2].isdigit()}
    # the outermost numbered groups are the decoder layers (numbered groups inside them, e.g. MoE
    # experts, stay closed with their layer)
    layers = [g for g in numbered if not numbered & set(view.chain(g)[:-1])]
    holders = {h for g in layers for h in view.chain(view.groups[g].parent)}
    return State(frozenset(holders | {0}), frozenset())


def item_ids(view: GraphView) -> tuple[int, int]:
    """Item numbering: node i is i, group g is N + g, run r is N + G + r."""
    return len(view.rows), len(view.rows) + len(view.groups)


def _folded(view: GraphView, state: State) -> dict[int, int]:
    """Group -> the folded run it is drawn as."""
    return {m: r for r, run in enumerate(view.runs) if r not in state.unfolded for m in run.members}


def _items(view: GraphView, g: int, folded: dict[int, int]) -> list[int]:
    """The items an open group shows, in graph order."""
    n, gr = item_ids(view)
    items = set(view.groups[g].nodes)
    items |= {gr + folded[c] if c in folded else n + c for c in view.groups[g].children}
    return sorted(items, key=lambda item: _key(view, item))


def _key(view: GraphView, item: int) -> int:
    n, gr = item_ids(view)
    if item < n:
        return item
    if item < gr:
        return view.groups[item - n].key
    return min(view.groups[m].key for m in view.runs[item - gr].members)


def _sibling_edges(view: GraphView, folded: dict[int, int]) -> dict[int, list[tuple[int, int]]]:
    """Per group: the edges between two of its items (the items holding the edge's two ends)."""
    n, gr = item_ids(view)
    chains = [view.chain(g) for g in range(len(view.groups))]

    def item(node: int, chain: list[int], depth: int) -> int:
        if depth == len(chain):
            return node
        h = chain[depth]
        return gr + folded[h] if h in folded else n + h

    out: dict[int, list[tuple[int, int]]] = {}
    for v, ins in enumerate(view.inputs):
        cv = chains[view.group_of[v]]
        for u in ins:
            cu = chains[view.group_of[u]]
            k = 0
            while k < len(cu) and k < len(cv) and cu[k] == cv[k]:
                k += 1
            a, b = item(u, cu, k), item(v, cv, k)
            if a != b:
                out.setdefault(cu[k - 1], []).append((a, b))
    return out


def _rows(view: GraphView, items: list[int], edges: list[tuple[int, int]]) -> list[list[int]]:
    """Items in rows: longest path down the edges in graph order; sources one row above their first reader."""
    preds: dict[int, list[int]] = {}
    readers: dict[int, list[int]] = {}
    for a, b in edges:
        preds.setdefault(b, []).append(a)
        readers.setdefault(a, []).append(b)
    sources = {i for i in items if i < len(view.rows) and is_source(view.rows[i])}
    rank: dict[int, int] = {}
    for b in items:  # in graph order, so an item's inputs that come before it are ranked already
        if b not in sources:
            rank[b] = 1 + max((rank[a] for a in preds.get(b, []) if a in rank), default=0)
    for s in sources:
        rank[s] = max(0, min((rank[b] for b in readers.get(s, []) if b in rank), default=1) - 1)
    levels = sorted(set(rank.values()))
    row_of = {r: k for k, r in enumerate(levels)}
    rows: list[list[int]] = [[] for _ in levels]
    for i in items:
        rows[row_of[rank[i]]].append(i)
    return rows


def layout(view: GraphView, state: State) -> Scene:
    n, _ = item_ids(view)
    folded = _folded(view, state)
    between = _sibling_edges(view, folded)
    scene = Scene()
    sizes: dict[int, tuple[int, int]] = {}
    rows_of: dict[int, list[list[int]]] = {}

    def size(item: int) -> tuple[int, int]:
        g = item - n
        if item < n or g >= len(view.groups) or g not in state.expanded:
            return NODE_W, NODE_H
        rows = _rows(view, _items(view, g, folded), between.get(g, []))
        rows_of[item] = rows
        for i in (i for row in rows for i in row):
            sizes[i] = size(i)
        dims = [[sizes[i] for i in row] for row in rows]
        inner_w = max((sum(w for w, _ in d) + GAP_X * (len(d) - 1) for d in dims), default=0)
        inner_h = sum(max(h for _, h in d) for d in dims) + GAP_Y * max(len(dims) - 1, 0)
        if g == 0:
            return inner_w + 2 * MARGIN, inner_h + 2 * MARGIN
        return max(inner_w, NODE_W) + 2 * PAD, HEAD + inner_h + PAD

    def place(item: int, x: int, y: int) -> None:
        w, h = sizes[item]
        scene.boxes[item] = (x, y, w, h)
        if item not in rows_of:
            scene.leaves.append(item)
            return
        if item != n:
            scene.frames.append(item)
        ox, oy, inner_w = (x + MARGIN, y + MARGIN, w - 2 * MARGIN) if item == n else (x + PAD, y + HEAD, w - 2 * PAD)
        for row in rows_of[item]:
            row_w = sum(sizes[i][0] for i in row) + GAP_X * (len(row) - 1)
            rx = ox + (inner_w - row_w) // 2
            for i in row:
                place(i, rx, oy)
                rx += sizes[i][0] + GAP_X
            oy += max(sizes[i][1] for i in row) + GAP_Y

    sizes[n] = size(n)
    place(n, 0, 0)
    scene.width, scene.height = sizes[n]
    scene.leaves.sort(key=lambda i: _key(view, i))
    _edges(view, state, folded, scene)
    return scene


def _edges(view: GraphView, state: State, folded: dict[int, int], scene: Scene) -> None:
    """Each edge between the drawn items holding its two ends, counted (edges inside one item vanish)."""
    n, gr = item_ids(view)
    shown: dict[int, int] = {}
    for g in range(len(view.groups)):
        for h in view.chain(g)[1:]:
            if h in folded:
                shown[g] = gr + folded[h]
                break
            if h not in state.expanded:
                shown[g] = n + h
                break
    for v, ins in enumerate(view.inputs):
        b = shown.get(view.group_of[v], v)
        for u in ins:
            a = shown.get(view.group_of[u], u)
            if a != b:
                scene.edges[(a, b)] = scene.edges.get((a, b), 0) + 1
