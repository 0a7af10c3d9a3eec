"""Per-layer time for `graphllm profile --by-layer`: profiler ranges around each layer's graph nodes.

The `layer_markers` train pass wraps every run of consecutive forward/backward graph nodes that belong
to one module (`model.layers.3`, `model.embed_tokens`, `lm_head`; read from the node's
`nn_module_stack`, or for backward nodes from the forward node they differentiate) in a profiler range
named `graphllm.region/<forward|backward>/<module>`. `by_layer` then sums the self time of every op
inside each range.

The ranges are record_function calls in the graph, which the eager backend executes and inductor
drops (its kernels fuse across the boundaries anyway), so `--by-layer` profiles the artifact's graphs on
the eager backend: the same passes and graphs, each op its own kernel. Shares between layers carry
over; absolute times are those of unfused kernels.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import torch
import torch.fx as fx

from graphllm.passes.manager import PassContext, graph_pass

REGION_PREFIX = "graphllm.region/"
OTHER = "other (loss, graph glue)"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")
_enter = torch.ops.profiler._record_function_enter_new.default
_exit = torch.ops.profiler._record_function_exit._RecordFunction


def module_of(node: fx.Node) -> str:
    """The decoder layer (`model.layers.3`) or top-level module a node computes for."""
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack") or {}
    paths = [v[0] for v in stack.values() if isinstance(v, tuple) and v and v[0]]
    for path in paths:
        if _LAYER.search(path):
            return path
    if not paths:
        return OTHER
    deepest = paths[-1].split(".")
    return ".".join(deepest[:2]) if deepest[0] == "model" else deepest[0]


@graph_pass("layer_markers", stage="train")
def layer_markers(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    phase = ctx.graph_kind
    runs: list[tuple[str, list[fx.Node]]] = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        label = module_of(n)
        if runs and runs[-1][0] == label:
            runs[-1][1].append(n)
        else:
            runs.append((label, [n]))
    for label, nodes in runs:
        with gm.graph.inserting_before(nodes[0]):
            handle = gm.graph.call_function(_enter, (f"{REGION_PREFIX}{phase}/{label}", None))
        with gm.graph.inserting_after(nodes[-1]):
            gm.graph.call_function(_exit, (handle,))
    ctx.count("regions", len(runs))
    gm.recompile()
    return gm


def by_layer(events) -> dict[str, dict[str, float]]:
    """{module: {"forward": s, "backward": s}} of op self time inside each region (outermost region wins)."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"forward": 0.0, "backward": 0.0})
    for e in events:
        if e.name.startswith(REGION_PREFIX):
            continue
        region, parent = None, e.cpu_parent
        while parent is not None:
            if parent.name.startswith(REGION_PREFIX):
                region = parent.name
            parent = parent.cpu_parent
        if region is None:
            continue
        phase, _, module = region[len(REGION_PREFIX):].partition("/")
        out[module][phase if phase in ("forward", "backward") else "forward"] += e.self_cpu_time_total / 1e6
    return dict(sorted(out.items(), key=lambda kv: _order(kv[0])))


def _order(module: str) -> tuple[int, Any]:
    m = _LAYER.search(module)
    if "embed" in module:
        return (0, 0)
    if m:
        return (1, int(m.group(1)))
    return (2, module)
