"""Per-node costs the planner reads off a partitioned graph (graphllm.planner.measure): the memory-bound bytes of
a non-matmul op, and whether a backward op's output is a transient the step must hold next to its saved values."""

from __future__ import annotations

import torch

from graphllm.planning.flops import node_flops
from graphllm.planning.memory import VIEW_OPS


def mem_bytes(n) -> float:
    """HBM traffic of a non-matmul op: its output written and read back (2 × bytes) when it crosses a kernel
    boundary — read by a matmul-class op, a collective, attention or the graph's output (through views). Chains
    of pointwise ops between are taken as fused (what inductor and torchair do) and cost nothing more."""
    import operator

    if n.target in VIEW_OPS or n.target is operator.getitem or node_flops(n) or not _materialised(n):
        return 0.0
    vals = n.meta.get("val")
    return float(sum(2 * v.numel() * v.element_size() for v in (vals if isinstance(vals, (tuple, list)) else (vals,))
                     if isinstance(v, torch.Tensor)))


def _accumulating_scatter(n) -> bool:
    """A scatter that adds into its destination (scatter_add, index_put with accumulate): a kernel of its own that
    inductor fuses into no consumer, its destination a buffer of the output's size whoever made it."""
    name = getattr(n.target, "__name__", str(n.target))
    return name.startswith(("scatter_add", "scatter_reduce", "index_add")) or (
        name.startswith("index_put") and bool(n.kwargs.get("accumulate", len(n.args) > 3 and n.args[3])))


def transient_bytes(n, order: dict, reuse: bool) -> float:
    """Bytes of a backward op's output that a kernel boundary reads (or an accumulating scatter makes), unless it is
    one of the graph's outputs (a gradient: the planner counts those) or a view; with `reuse` (inductor), also not
    when an input of the same size and dtype dies at this op: inductor writes the output into that input's buffer."""
    import operator

    scatter = _accumulating_scatter(n)
    if n.target in VIEW_OPS or n.target is operator.getitem or any(u.op == "output" for u in n.users) \
            or not (scatter or _materialised(n)):
        return 0.0
    v = n.meta.get("val")
    if not isinstance(v, torch.Tensor):
        return 0.0
    if reuse and not scatter:
        for a in n.all_input_nodes:
            av = a.meta.get("val")
            if isinstance(av, torch.Tensor) and av.numel() == v.numel() and av.dtype == v.dtype \
                    and max(order[u] for u in a.users) <= order[n]:
                return 0.0
    return float(v.numel() * v.element_size())


def _materialised(n, depth: int = 0) -> bool:
    """Whether a kernel boundary reads `n` (views and getitems are looked through)."""
    import operator

    from graphllm.ops.collectives import COLLECTIVE_OPS
    from graphllm.planning.comm import _C10D

    for u in n.users:
        if u.op == "output" or (u.op == "call_function" and (node_flops(u) or u.target in COLLECTIVE_OPS
                                                              or u.target in _C10D or "attention" in str(u.target))):
            return True
        if depth < 4 and u.op == "call_function" and (u.target in VIEW_OPS or u.target is operator.getitem) \
                and _materialised(u, depth + 1):
            return True
    return False
