"""One graph for other viewers: Graphviz dot (nodes in nested clusters, one per module group) and
Google Model Explorer's graph JSON (a graph collection; `namespace` is the module path with '/', so
Model Explorer draws each layer as a box to open).

Model Explorer's format, as its `model_explorer.graph_builder` declares it: a collection
`{"label", "graphs": [{"id", "nodes": [...]}]}`, each node `{"id", "label", "namespace", "subgraphIds",
"attrs": [{"key", "value"}], "incomingEdges": [{"sourceNodeId", "sourceNodeOutputId",
"targetNodeInputId"}], "outputsMetadata": [{"id", "attrs"}], "inputsMetadata": []}`; the namespace
leaves out the node's own label. Its web app and `model-explorer FILE.json` load such a file.
"""

from __future__ import annotations

from graphllm.graph_layout import PALETTE, SOURCE_FILL
from graphllm.graph_render import TITLE_KEYS, op_name, short_target
from graphllm.graph_view import GraphView, is_source


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _title(r: dict[str, str]) -> str:
    return "\n".join(f"{k}: {r[k]}" for k in TITLE_KEYS if r.get(k))


def render_dot(view: GraphView, *, title: str) -> str:
    """The graph in graphviz's dot language, each module group a cluster (for `--out FILE.dot|.svg`)."""
    passes = list(dict.fromkeys(r["pass"] for r in view.rows if r["pass"]))
    colour = {p: PALETTE[i % len(PALETTE)] for i, p in enumerate(passes)}
    lines = [f"digraph {_q(title)} {{", "  compound=true;",
             '  node [shape=box, style="rounded,filled", fontname=monospace, fontsize=10];']

    def emit(g: int, indent: str) -> None:
        for i in view.groups[g].nodes:
            r = view.rows[i]
            fill = SOURCE_FILL if is_source(r) else colour.get(r["pass"], "#ffffff")
            lines.append(f'{indent}{_q(r["name"])} [label={_q(r["name"] + chr(10) + short_target(r))}, '
                         f'fillcolor={_q(fill)}, tooltip={_q(_title(r))}];')
        for c in view.groups[g].children:
            group = view.groups[c]
            lines.append(f"{indent}subgraph cluster_{c} {{")
            lines.append(f'{indent}  label={_q(f"{group.path} ({group.size} nodes)")}; style="rounded,dashed"; '
                         'color="#9fb3c8";')
            emit(c, indent + "  ")
            lines.append(f"{indent}}}")

    emit(0, "  ")
    lines += [f"  {_q(view.rows[u]['name'])} -> {_q(r['name'])};" for r, ins in zip(view.rows, view.inputs)
              for u in ins]
    return "\n".join(lines + ["}"]) + "\n"


def model_explorer_graphs(view: GraphView, *, graph_id: str, label: str) -> dict:
    """The graph as a Model Explorer graph collection (see the module docstring)."""
    nodes = []
    for i, r in enumerate(view.rows):
        group = view.groups[view.group_of[i]].path
        attrs = [{"key": k, "value": r[k]} for k in TITLE_KEYS if r.get(k)]
        if view.inferred[i]:
            attrs.append({"key": "module (inferred from its inputs)", "value": group})
        out_attrs = [{"key": "tensor_shape", "value": f"{r.get('dtype', '')}{r['shape']}"}] if r["shape"] else []
        nodes.append({
            "id": r["name"],
            "label": op_name(r) if r["op"] in ("call_function", "call_method", "call_module") else r["name"],
            "namespace": group.replace(".", "/"),
            "subgraphIds": [],
            "attrs": attrs,
            "incomingEdges": [{"sourceNodeId": view.rows[u]["name"], "sourceNodeOutputId": "0",
                               "targetNodeInputId": str(k)} for k, u in enumerate(view.inputs[i])],
            "outputsMetadata": [{"id": "0", "attrs": out_attrs}] if out_attrs else [],
            "inputsMetadata": [],
        })
    return {"label": label, "graphs": [{"id": graph_id, "nodes": nodes}]}
