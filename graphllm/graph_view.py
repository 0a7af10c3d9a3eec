"""A dumped graph as nested module groups, for drawing a large graph a layer at a time.

Each node belongs to the module whose code made it (the `.tsv` `module` column, e.g.
`model.layers.3.self_attn.q_proj`); groups nest by that dotted path. A parameter or input (placeholder,
get_attr) names a tensor (`model.layers.3.input_layernorm.weight`), so it joins the module that owns it.
aot_autograd's backward graph records no module for its computations: there each unlabelled call takes
the module of the input it reads (a saved activation or weight of that layer), which puts a layer's
backward ops in that layer's group; such nodes are marked `inferred`.

Repeated layers: consecutive numbered siblings (`model.layers.1` ... `model.layers.28`) whose nodes
have the same ops, shapes, inner module paths and wiring form a *run*, drawn once with a "×N" badge.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

CALL_OPS = ("call_function", "call_method", "call_module")
SOURCE_OPS = ("placeholder", "get_attr")  # nodes with no inputs: graph inputs and parameters


@dataclass(frozen=True, slots=True)
class Group:
    path: str  # "model.layers.3"; "" for the whole graph (group 0)
    label: str  # what its box shows: "layers.3", "self_attn"
    parent: int  # -1 for the root
    key: int  # order among siblings: its first computation's row index
    size: int  # nodes inside, nested groups included
    nodes: tuple[int, ...]  # the rows directly in this group
    children: tuple[int, ...]  # nested groups, in key order


@dataclass(frozen=True, slots=True)
class Run:
    parent: int  # the group the repeated layers sit in (e.g. `model.layers`)
    members: tuple[int, ...]  # the identical groups, in layer order
    label: str  # "layers.1–28"


@dataclass(frozen=True, slots=True)
class GraphView:
    rows: list[dict[str, str]]
    inputs: list[list[int]]  # per row: the rows it reads (the graph's edges)
    group_of: list[int]  # per row: its group
    inferred: list[bool]  # per row: module path guessed from its inputs (backward graphs)
    groups: list[Group]  # root first
    runs: list[Run]

    def chain(self, group: int) -> list[int]:
        """The groups from the root down to `group`."""
        out = []
        while group >= 0:
            out.append(group)
            group = self.groups[group].parent
        return out[::-1]


def is_source(r: dict[str, str]) -> bool:
    return r["op"] in SOURCE_OPS


def build_view(rows: list[dict[str, str]]) -> GraphView:
    index = {r["name"]: i for i, r in enumerate(rows)}
    inputs = [[index[n] for n in r.get("inputs", "").split(",") if n in index] for r in rows]
    paths, inferred = _module_paths(rows, inputs)
    groups, group_of = _groups(rows, paths)
    return GraphView(rows, inputs, group_of, inferred, groups, _runs(rows, inputs, groups, group_of))


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _module_paths(rows: list[dict[str, str]], inputs: list[list[int]]) -> tuple[list[str], list[bool]]:
    """Each row's module path and whether it was inferred (see the module docstring)."""
    raw = [r["module"] or (r["target"] if r["op"] == "get_attr" else "") for r in rows]
    # A tensor's path (`...input_layernorm.weight`) names one node and ends in a name that no module
    # has; a module's path is shared by several nodes or extended by another path, in some layer.
    count = Counter(raw)
    modules = {p for r, p in zip(rows, raw) if not is_source(r) or count[p] > 1}
    modules |= {p[:i] for p in raw for i in range(len(p)) if p[i] == "."}
    module_names = {p.rpartition(".")[2] for p in modules}
    paths = [_parent(p) if is_source(r) and p and p not in modules and p.rpartition(".")[2] not in module_names
             else p for r, p in zip(rows, raw)]
    inferred = [False] * len(rows)
    calls = [i for i, r in enumerate(rows) if r["op"] in CALL_OPS]
    if any(paths[i] for i in calls):
        return paths, inferred  # the tracer recorded modules: unlabelled calls really sit outside them
    own = {i for i, p in enumerate(paths) if p}
    # A backward op reads tensors its forward module saved (their own labels) and the gradient from the
    # module after it (a label inferred a step earlier): the saved tensors say more; of those, the
    # latest saved (forward order) is nearest the op. Rows are in topological order: inputs come first.
    for i in calls:
        direct = [j for j in inputs[i] if j in own]
        labelled = direct or [j for j in inputs[i] if paths[j]]
        if labelled:
            paths[i], inferred[i] = paths[max(labelled)], True
    users: dict[int, list[int]] = {}
    for i, ins in enumerate(inputs):
        for j in ins:
            users.setdefault(j, []).append(i)
    for i in reversed(calls):  # nothing labelled to read (constants, tangents): join the first user
        first = next((u for u in users.get(i, []) if paths[u]), None)
        if not paths[i] and first is not None:
            paths[i], inferred[i] = paths[first], True
    return paths, inferred


def _groups(rows: list[dict[str, str]], paths: list[str]) -> tuple[list[Group], list[int]]:
    """Groups for every module path prefix that holds more than one node; root first, then by key."""
    size: dict[str, int] = {"": len(rows)}
    for p in paths:
        parts = p.split(".") if p else []
        for k in range(1, len(parts) + 1):
            size[".".join(parts[:k])] = size.get(".".join(parts[:k]), 0) + 1
    kept = {p for p, n in size.items() if n > 1 or p == ""}  # a one-node group is just that node

    def home(p: str) -> str:
        while p not in kept:
            p = _parent(p)
        return p

    where = [home(p) for p in paths]
    first_call: dict[str, int] = {}
    first_any: dict[str, int] = {}
    for i in reversed(range(len(rows))):  # so the smallest index is written last
        p = where[i]
        while True:
            first_any[p] = i
            if not is_source(rows[i]):
                first_call[p] = i
            if p == "":
                break
            p = home(_parent(p))
    # a group is ordered by its first computation: a layer's weights all come first in the graph
    key = {p: first_call.get(p, first_any[p]) for p in kept}
    order = sorted(kept, key=lambda p: (p != "", key[p]))
    ids = {p: g for g, p in enumerate(order)}
    members: dict[str, list[int]] = {p: [] for p in order}
    for i, p in enumerate(where):
        members[p].append(i)
    kids: dict[str, list[int]] = {p: [] for p in order}
    for p in order[1:]:
        kids[home(_parent(p))].append(ids[p])
    groups = [Group(p, _label(p, home(_parent(p)) if p else ""), ids[home(_parent(p))] if p else -1,
                    key[p], size[p], tuple(members[p]), tuple(kids[p])) for p in order]
    return groups, [ids[p] for p in where]


def _label(path: str, parent: str) -> str:
    rel = path[len(parent) + 1:] if parent else path
    if rel.isdigit() and parent:  # "layers.3" says more than "3"
        rel = parent.rpartition(".")[2] + "." + rel
    return rel


def _signature(rows: list[dict[str, str]], inputs: list[list[int]], groups: list[Group],
               group_of: list[int], g: int) -> tuple:
    """What must match for two layers to be drawn as one: each node's op, target, shape, dtype, inner
    module path and which of the layer's own nodes it reads (in order)."""
    inside: list[int] = []
    stack = [g]
    while stack:
        h = stack.pop()
        inside += groups[h].nodes
        stack += groups[h].children
    inside.sort()
    local = {i: k for k, i in enumerate(inside)}
    prefix = groups[g].path + "."
    out = []
    for i in inside:
        r = rows[i]
        target = "" if r["op"] == "placeholder" else r["target"].replace(prefix, "")
        inner = groups[group_of[i]].path.removeprefix(groups[g].path)
        out.append((r["op"], target, r["shape"], r.get("dtype", ""), inner,
                    tuple(local.get(j, -1) for j in inputs[i])))
    return tuple(out)


def _runs(rows: list[dict[str, str]], inputs: list[list[int]], groups: list[Group],
          group_of: list[int]) -> list[Run]:
    runs = []
    for g, group in enumerate(groups):
        numbered = sorted((int(groups[c].path.rpartition(".")[2]), c) for c in group.children
                          if groups[c].path.rpartition(".")[2].isdigit())
        signature = {c: _signature(rows, inputs, groups, group_of, c) for _, c in numbered}
        start = 0
        for k in range(1, len(numbered) + 1):
            if k < len(numbered) and signature[numbered[k][1]] == signature[numbered[start][1]]:
                continue
            if k - start >= 2:
                first, last = numbered[start][0], numbered[k - 1][0]
                label = f"{groups[numbered[start][1]].label.rpartition('.')[0] or group.label}.{first}–{last}"
                runs.append(Run(g, tuple(c for _, c in numbered[start:k]), label))
            start = k
    return runs
