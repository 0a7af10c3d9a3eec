"""Bytes a training step holds: what the forward saves for the backward, read off the partitioned graph."""

from __future__ import annotations

import torch
import torch.fx as fx


VIEW_OPS = {torch.ops.aten.t.default, torch.ops.aten.view.default, torch.ops.aten.detach.default,
            torch.ops.aten.transpose.int, torch.ops.aten.permute.default, torch.ops.aten.alias.default,
            torch.ops.aten._unsafe_view.default, torch.ops.aten.unsqueeze.default, torch.ops.aten.expand.default}
"""Ops whose result shares its input's storage (what a matmul's backward saves of a weight: its transpose)."""


def input_views(forward: fx.GraphModule | None) -> set[str]:
    """Names of the forward graph's values that are views of its inputs (parameters, the batch): saving them
    for the backward holds no memory beyond the input itself."""
    if forward is None:
        return set()
    views = {n.name for n in forward.graph.nodes if n.op == "placeholder"}
    for n in forward.graph.nodes:
        if n.op == "call_function" and n.target in VIEW_OPS and getattr(n.args[0], "name", None) in views:
            views.add(n.name)
    return views


def saved_activation_bytes(backward: fx.GraphModule, forward: fx.GraphModule | None = None) -> int:
    """Bytes the forward saves for the backward, parameters and inputs excluded.

    The partitioned backward graph's placeholders are the saved values plus `tangents_*` (incoming
    gradients); saved values named `primals_*` are the step's inputs and parameters themselves, and with
    the `forward` graph given, views of them (a weight's transpose) are left out too.
    """
    total, views = 0, input_views(forward)
    for node in backward.graph.nodes:
        if node.op != "placeholder" or node.name.startswith(("tangents", "primals")) or node.name in views:
            continue
        v = node.meta.get("val")
        if isinstance(v, torch.Tensor):
            total += _hint(v.numel()) * v.element_size()
    return total


def _hint(n) -> int:
    """An element count that may be symbolic (inductor saves the CPU RNG state, a tensor of symbolic
    size, to recompute random-capable ops such as SDPA): its size hint."""
    try:
        return int(n)
    except (TypeError, RuntimeError):
        hint = getattr(getattr(n, "node", None), "hint", None)
        return int(hint) if hint is not None else 0
