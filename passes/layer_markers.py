"""layer_markers: a profiler range around each run of forward/backward graph nodes of one module.

A train pass for `graphllm profile --by-layer`: every run of consecutive nodes that belong to one module
(`model.layers.3`, `model.embed_tokens`, `lm_head`; from the node's `nn_module_stack`, or for backward
nodes from the forward node they differentiate) is wrapped in a `record_function` range named
`graphllm.region/<forward|backward>/<module>` (graphllm/profile_layers.py sums the time inside them).
Legal: the range ops only mark time; no value changes. Inductor drops them, so the profile runs the
graphs on the eager backend.
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx

from graphllm.passes.manager import PassContext, graph_pass

REGION_PREFIX = "graphllm.region/"
OTHER = "other (loss, graph glue)"
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")
_enter = torch.ops.profiler._record_function_enter_new.default
_exit = torch.ops.profiler._record_function_exit._RecordFunction


def module_of(node: fx.Node) -> str:
    """The decoder layer (`model.layers.3`) or top-level module a node computes for."""
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack") or {}
    paths = [v[0] for v in stack.values() if isinstance(v, tuple) and v and v[0]]
    for path in paths:
        if LAYER.search(path):
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
