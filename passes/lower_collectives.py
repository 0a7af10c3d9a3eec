"""lower_collectives: graphllm collective ops → `_c10d_functional` collectives in the forward/backward graphs.

A train-stage pass the compile step adds for backends that schedule collectives themselves (inductor
and torchair understand `_c10d_functional.all_reduce` / `all_gather_into_tensor` /
`reduce_scatter_tensor` + `wait_tensor`; inductor can then move the wait away from the issue and
overlap it with computation). It runs after aot_autograd, so the graphllm ops' autograd rules have
already produced the backward collectives. Each op becomes exactly its reference kernel
(ops/collectives.py), so results are unchanged: tp_copy becomes nothing (it is the identity), and
tp_split this rank's slice.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphllm.ops.groups import GroupResolver
from graphllm.passes.graph_edit import emit
from graphllm.passes.manager import PassContext, graph_pass
from graphllm.passes.shapes import repropagate

aten = torch.ops.aten
c10d = torch.ops._c10d_functional
gl = torch.ops.graphllm


def _moved(gm: fx.GraphModule, x: fx.Node, dim: int, ndim: int, like: fx.Node) -> tuple[fx.Node, list[int]]:
    """x with `dim` moved to the front (contiguous), and the permutation that moves it back."""
    if dim % ndim == 0:
        return x, []
    d = dim % ndim
    perm = [d] + [i for i in range(ndim) if i != d]
    back = [perm.index(i) for i in range(ndim)]
    moved = emit(gm, aten.permute.default, (x, perm), like)
    return emit(gm, aten.clone.default, (moved,), like, kwargs={"memory_format": torch.contiguous_format}), back


def _restore(gm: fx.GraphModule, y: fx.Node, back: list[int], like: fx.Node) -> fx.Node:
    if not back:
        return y
    y = emit(gm, aten.permute.default, (y, back), like)
    return emit(gm, aten.clone.default, (y,), like, kwargs={"memory_format": torch.contiguous_format})


def _lower(gm: fx.GraphModule, n: fx.Node, groups: GroupResolver) -> fx.Node | None:
    t, x = n.target, n.args[0]
    if t is gl.tp_copy.default:
        return x
    if t in (gl.tp_reduce.default, gl.tp_reduce_max.default):
        op = "sum" if t is gl.tp_reduce.default else "max"
        return emit(gm, c10d.wait_tensor.default, (emit(gm, c10d.all_reduce.default, (x, op, groups.name(n.args[1])), n),), n)
    ndim = x.meta["val"].dim()
    dim, size, group = n.args[1], n.args[2], n.args[3]
    if t is gl.tp_split.default:
        rank = groups.local_rank(group)
        width = x.meta["val"].shape[dim] // size
        piece = emit(gm, aten.slice.Tensor, (x, dim, rank * width, (rank + 1) * width), n)
        return emit(gm, aten.clone.default, (piece,), n, kwargs={"memory_format": torch.contiguous_format})
    moved, back = _moved(gm, x, dim, ndim, n)
    if t in (gl.tp_gather.default, gl.sp_gather.default):
        comm = emit(gm, c10d.all_gather_into_tensor.default, (moved, size, groups.name(group)), n)
    elif t is gl.sp_reduce_scatter.default:
        comm = emit(gm, c10d.reduce_scatter_tensor.default, (moved, "sum", size, groups.name(group)), n)
    else:
        return None
    return _restore(gm, emit(gm, c10d.wait_tensor.default, (comm,), n), back, n)


def _sink_waits(gm: fx.GraphModule) -> None:
    """Move each wait_tensor down to just before its first user: the collective travels while the
    ops between its issue and its use compute (issue order, which all ranks share, is unchanged)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for w in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is c10d.wait_tensor.default]:
        first = min(w.users, key=order.__getitem__, default=None)
        if first is not None and first is not w.next:
            first.prepend(w)


LOWERED = (gl.tp_copy.default, gl.tp_reduce.default, gl.tp_reduce_max.default, gl.tp_gather.default,
           gl.tp_split.default, gl.sp_gather.default, gl.sp_reduce_scatter.default)


@graph_pass("lower_collectives", stage="train")
def lower_collectives(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    lowered = 0
    for n in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in LOWERED]:
        with gm.graph.inserting_before(n):
            out = _lower(gm, n, ctx.groups)
        n.replace_all_uses_with(out)
        gm.graph.erase_node(n)
        lowered += 1
    if lowered:
        ctx.count("lowered", lowered)
        _sink_waits(gm)
        repropagate(gm, {})
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return gm
