"""tp_cache_inputs: give a generation graph's KV-cache inputs their per-rank shape before tensor_parallel.

Tensor-parallel generation (graphllm/generate/tp.py) captures each graph from the unsharded model, with
the cache placeholders at full size, then calls it with each rank's own cache [L, B, Hkv/tp, M, D]. This
pass changes only the placeholders' shape metadata; tensor_parallel, which runs right after it, re-derives
every other node's shape from them and from the sharded weights (passes/shapes.py). Legal: no node is
rewritten, and the placeholders really are called with those shapes.
"""

from __future__ import annotations

import torch
from torch import fx
from torch._guards import detect_fake_mode

from graphllm.errors import GraphllmError
from graphllm.passes.manager import PassContext, graph_pass


@graph_pass("tp_cache_inputs")
def tp_cache_inputs(gm: fx.GraphModule, ctx: PassContext, *, shapes: dict[int, list[int]] | None = None) -> fx.GraphModule:
    """Give placeholders (by position) the per-rank `shapes` of the inputs they will be called with.

    Only the placeholders' metadata changes here; tensor_parallel, which runs next, re-derives every
    other node's shape from them and from the sharded weights (passes/shapes.py)."""
    if not shapes:
        return gm
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode([n.meta["val"] for n in placeholders if isinstance(n.meta.get("val"), torch.Tensor)])
    if mode is None:
        raise GraphllmError("tp_cache_inputs needs a captured graph (placeholders with fake-tensor meta['val'])")
    for index, shape in shapes.items():
        node = placeholders[int(index)]
        old = node.meta["val"]
        if len(shape) != old.dim():
            raise GraphllmError(f"tp_cache_inputs: input {index} ({node.name}) has {old.dim()} dims, "
                                f"the per-rank shape {list(shape)} has {len(shape)}")
        with mode:
            node.meta["val"] = torch.empty(tuple(shape), dtype=old.dtype, device=old.device)
        ctx.count("resized inputs")
    return gm
