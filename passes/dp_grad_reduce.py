"""dp_grad_reduce: average parameter gradients over the data-parallel group inside the backward graph.

A train-stage pass on the backward graph. The gradients the graph returns are grouped, in the order
the graph produces them (last layer first), into buckets of about `bucket_mb` MiB; right after a
bucket's last gradient exists, the bucket is flattened, divided by the data-parallel size and
all-reduced (`_c10d_functional.all_reduce`, which only issues the collective); the waits sit just
before the graph returns. So bucket i's reduction travels while the backward of earlier layers
computes — DDP's overlap, expressed as graph nodes, visible in the backward dump. Used when one
backward makes one step (no pipeline, one micro-batch); otherwise the engine reduces after the
last micro-batch. Legal: the mean over ranks of each rank's gradient is the gradient of the mean
loss over the global batch. With context parallelism (cp > 1) the parameters are replicated over the
cp ranks too, and each cp rank's loss is rewritten so that the mean over them is the loss of the whole
sequences: the reduction runs over the "dp_cp" group and divides by dp·cp (cp 1: "dp" and dp, the
graph as before). bf16 gradients (--params-dtype bf16) are widened to fp32 for the reduction and rounded back
once after it.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from graphllm.passes.graph_edit import emit
from graphllm.passes.manager import PassContext, graph_pass
from graphllm.passes.shapes import repropagate

aten = torch.ops.aten
c10d = torch.ops._c10d_functional
prims = torch.ops.prims
LOW_PRECISION = (torch.bfloat16, torch.float16)
"""Gradients of these dtypes (--params-dtype bf16) are averaged in fp32 and rounded back once, for the reason
graphllm.parallel.optim.wire_dtype gives."""
DEFAULT_BUCKET_MB = 25.0


@graph_pass("dp_grad_reduce", stage="train")
def dp_grad_reduce(gm: fx.GraphModule, ctx: PassContext, *, bucket_mb: float = DEFAULT_BUCKET_MB) -> fx.GraphModule:
    layout = ctx.layout
    if ctx.graph_kind != "backward" or not layout.grads_reduced_in_graph:
        return gm
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    results = list(out.args[0])
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    grads = [(i, g) for i, g in enumerate(results) if isinstance(g, fx.Node)
             and isinstance(g.meta.get("val"), torch.Tensor) and g.meta["val"].is_floating_point()]
    grads.sort(key=lambda ig: order[ig[1]])
    limit = bucket_mb * 2**20
    buckets: list[list[tuple[int, fx.Node]]] = [[]]
    size = 0
    for i, g in grads:
        v = g.meta["val"]
        nbytes = v.numel() * v.element_size()
        if buckets[-1] and (size + nbytes > limit or buckets[-1][0][1].meta["val"].dtype != v.dtype):
            buckets.append([])
            size = 0
        buckets[-1].append((i, g))
        size += nbytes
    name = ctx.groups.name(layout.grad_kind)
    replicas = layout.group_size(layout.grad_kind)  # dp·cp
    issued = []
    for bucket in (b for b in buckets if b):
        last = max((g for _, g in bucket), key=lambda g: order[g])
        with gm.graph.inserting_before(last.next):  # in order, right after the bucket's last gradient
            flat = [emit(gm, aten.reshape.default, (g, [-1]), g) for _, g in bucket]
            cat = emit(gm, aten.cat.default, (flat,), last)
            if bucket[0][1].meta["val"].dtype in LOW_PRECISION:  # bf16 gradients are averaged in fp32 (see above)
                cat = emit(gm, prims.convert_element_type.default, (cat, torch.float32), last)
            mean = emit(gm, aten.div.Tensor, (cat, replicas), last)
            issued.append((bucket, emit(gm, c10d.all_reduce.default, (mean, "sum", name), last)))
    with gm.graph.inserting_before(out):
        for bucket, work in issued:
            done = emit(gm, c10d.wait_tensor.default, (work,), out)
            sizes = [g.meta["val"].numel() for _, g in bucket]
            parts = emit(gm, aten.split_with_sizes.default, (done, sizes), out)
            for k, (i, g) in enumerate(bucket):
                piece = emit(gm, operator.getitem, (parts, k), out)
                results[i] = emit(gm, aten.view.default, (piece, list(g.meta["val"].shape)), out)
                if g.meta["val"].dtype in LOW_PRECISION:
                    results[i] = emit(gm, prims.convert_element_type.default, (results[i], g.meta["val"].dtype), out)
    out.args = (tuple(results),)
    ctx.count("buckets", len(issued))
    ctx.count("gradients", len(grads))
    repropagate(gm, {})
    gm.recompile()
    return gm
