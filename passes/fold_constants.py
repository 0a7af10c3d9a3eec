"""fold_constants: compute, once at compile time, every value that depends on no input and no parameter.

In the Llama family that is the RoPE cos/sin tables (from the `inv_freq` buffer and the static sequence
length) and the eager attention's causal mask. Unfolded, inductor re-inlines the cheap-looking cos/sin
math into every layer's kernels, recomputing transcendental functions each layer and step.

Legal because such values are pure functions of buffers the graph never writes and of literals: the
folded tensor equals what every step would compute. Not folded: anything reaching a placeholder or a
Parameter, random ops, and results larger than `max_elements` (folding an `expand` would materialise it).
The folded values are snapshots: buffers changed after compile (not done by graphllm's models) are not seen.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphllm.passes.manager import PassContext, graph_pass

FOLDED_PREFIX = "_folded_"


def _is_constant_source(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "get_attr":
        return False
    value = _fetch(gm, node.target)
    return isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter)


def _fetch(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _foldable_call(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    tags = getattr(node.target, "tags", ())
    return torch.Tag.nondeterministic_seeded not in tags


@graph_pass("fold_constants", stage="model")
def fold_constants(gm: fx.GraphModule, ctx: PassContext, *, max_elements: int = 1 << 24) -> fx.GraphModule:
    constant: dict[fx.Node, bool] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            constant[node] = _is_constant_source(gm, node)
        elif _foldable_call(node):
            constant[node] = all(constant.get(i, False) for i in node.all_input_nodes)
        else:
            constant[node] = False
    # fold the frontier: constant calls with at least one non-constant user
    frontier = [n for n in gm.graph.nodes if n.op == "call_function" and constant[n]
                and any(not constant[u] for u in n.users)]
    values: dict[fx.Node, object] = {}

    def evaluate(n: fx.Node):
        if n not in values:
            if n.op == "get_attr":
                values[n] = _fetch(gm, n.target)
            else:
                args = fx.node.map_arg(n.args, evaluate)
                kwargs = fx.node.map_arg(n.kwargs, evaluate)
                values[n] = n.target(*args, **kwargs)
        return values[n]

    folded = 0
    with torch.no_grad():
        for n in frontier:
            value = evaluate(n)
            if not isinstance(value, torch.Tensor) or value.numel() > max_elements:
                continue
            name = f"{FOLDED_PREFIX}{folded}"
            while hasattr(gm, name):
                name += "_"
            gm.register_buffer(name, value.detach().contiguous().clone(), persistent=False)
            with gm.graph.inserting_before(n):
                attr = gm.graph.get_attr(name)
            attr.meta.update({k: n.meta[k] for k in ("val", "stack_trace", "nn_module_stack") if k in n.meta})
            n.replace_all_uses_with(attr)
            folded += 1
    if folded:
        gm.graph.eliminate_dead_code()
        gm.recompile()
        ctx.count("folded", folded)
        ctx.logger.info("fold_constants: folded %d values", folded)
    return gm
