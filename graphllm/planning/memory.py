"""Bytes a training step holds: what the forward saves for the backward, read off the partitioned graph."""

from __future__ import annotations

import torch
import torch.fx as fx


def saved_activation_bytes(backward: fx.GraphModule) -> int:
    """Bytes the forward saves for the backward, parameters and inputs excluded.

    The partitioned backward graph's placeholders are the saved values plus `tangents_*` (incoming
    gradients); saved values named `primals_*` are the step's inputs and parameters themselves.
    """
    total = 0
    for node in backward.graph.nodes:
        if node.op != "placeholder" or node.name.startswith(("tangents", "primals")):
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
