"""Small helpers the fusion passes share to read and rewrite ATen-level FX graphs."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx

aten = torch.ops.aten


def is_call(node: Any, *targets: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def calls_to(gm: fx.GraphModule, *targets: Any) -> list[fx.Node]:
    """The graph's calls of `targets`, as a list (safe to rewrite the graph while walking it)."""
    return [n for n in gm.graph.nodes if is_call(n, *targets)]


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument `name` of a call, whether passed positionally (at `index`) or by keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def val(node: Any) -> torch.Tensor | None:
    """The fake tensor capture recorded for a node (shape, dtype), if any."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def ndim(node: Any) -> int | None:
    v = val(node)
    return v.dim() if isinstance(v, torch.Tensor) else None


def norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def users_within(node: fx.Node, allowed: Iterable[fx.Node]) -> bool:
    """True when every user of `node` is in `allowed` (so removing the pattern loses nothing)."""
    allowed = set(allowed)
    return all(u in allowed for u in node.users)


def commuted(node: fx.Node) -> list[tuple[Any, Any]]:
    """Both operand orders of a binary commutative call (mul/add)."""
    a, b = node.args[0], node.args[1]
    return [(a, b), (b, a)]


def replace_with_call(
    gm: fx.GraphModule, anchor: fx.Node, target: Callable, args: Sequence[Any], kwargs: dict | None = None
) -> fx.Node:
    """Insert `target(*args)` before `anchor`, give it anchor's metadata, and reroute anchor's users.

    The pattern's other nodes become dead and are removed by the caller's dead-code elimination.
    """
    with gm.graph.inserting_before(anchor):
        new = gm.graph.call_function(target, tuple(args), kwargs or {})
    for key in ("val", "tensor_meta", "stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in anchor.meta:
            new.meta[key] = anchor.meta[key]
    anchor.replace_all_uses_with(new)
    # erased explicitly: ops that may use RNG (SDPA's dropout) count as impure for dead-code elimination
    gm.graph.erase_node(anchor)
    return new


def finish(gm: fx.GraphModule, ctx, replaced: int) -> fx.GraphModule:
    """Count and log the replacements, drop the dead pattern nodes and recompile when anything changed;
    return the same object either way (a pass that did nothing says nothing)."""
    if replaced:
        ctx.count("replaced", replaced)
        ctx.logger.info("%s: replaced %d patterns", ctx.current_pass, replaced)
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return gm


def constant_value(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """Evaluate `node` if it depends on no graph input (e.g. a causal mask built from torch.full).

    Returns None when an input or parameter feeds it: then its value is not known at compile time.
    """
    order: list[fx.Node] = []
    seen: set[fx.Node] = set()

    def visit(n: fx.Node) -> bool:
        if n in seen:
            return True
        if n.op in ("placeholder", "get_attr", "call_module", "call_method"):
            return False
        for inp in n.all_input_nodes:
            if not visit(inp):
                return False
        seen.add(n)
        order.append(n)
        return True

    if not visit(node):
        return None
    env: dict[fx.Node, Any] = {}
    for n in order:
        args = fx.node.map_arg(n.args, lambda a: env[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
        env[n] = n.target(*args, **kwargs)
    return env[node]
