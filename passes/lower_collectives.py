"""lower_collectives: graphllm collective ops → `_c10d_functional` collectives in the forward/backward graphs.

A train-stage pass the compile step adds for backends that schedule collectives themselves (inductor
and torchair understand `_c10d_functional.all_reduce` / `all_gather_into_tensor` /
`reduce_scatter_tensor` + `wait_tensor`; inductor can then move the wait away from the issue and
overlap it with computation). It runs after aot_autograd, so the graphllm ops' autograd rules have
already produced the backward collectives. Each op becomes exactly its reference kernel
(ops/collectives.py), so results are unchanged: tp_copy becomes nothing (it is the identity), and
tp_split this rank's slice.

For torchair (`lowers_to_torchair`: the npu backend and the npu-emulated one its pre-flight compiles with) the
context-parallel all-to-alls are torchair's own `npu_define.all_to_all_single_npu` instead: torchair has no GE
converter for `_c10d_functional.all_to_all_single`. That op is synchronous (no wait_tensor; GE schedules it).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from graphllm.ops.cp_collectives import element_counts, ring_splits, torchair_all_to_all, torchair_group
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


TORCHAIR_BACKENDS = ("npu", "npu-emulated")
"""The backends whose graphs torchair compiles: npu, and npu-emulated (graphllm.npu_preflight.EMULATED_BACKEND), the
npu lowering on CPU that `graphllm compile --backend npu --dry-run` checks against torchair's converters."""


def lowers_to_torchair(backend: str) -> bool:
    """Whether `backend` (PassContext.backend) hands its graphs to torchair: its collectives must be ones torchair
    converts to GE."""
    return backend in TORCHAIR_BACKENDS


def _all_to_all(gm: fx.GraphModule, x: fx.Node, recv: list[int], send: list[int], row_numel: int, group: str,
                groups: GroupResolver, torchair: bool, like: fx.Node) -> fx.Node:
    """all_to_all_single of the contiguous x along dim 0: send[i] rows to the group's rank i, recv[i] rows from
    it, received in rank order. `_c10d_functional` + wait, or for torchair its op with counts in elements."""
    if not torchair:
        comm = emit(gm, c10d.all_to_all_single.default, (x, recv, send, groups.name(group)), like)
        return emit(gm, c10d.wait_tensor.default, (comm,), like)
    tag, ranks = torchair_group(groups, group)
    send_counts, send_at = element_counts(send, row_numel)
    recv_counts, recv_at = element_counts(recv, row_numel)
    return emit(gm, torchair_all_to_all(), (x, send_counts, send_at, recv_counts, recv_at, tag, ranks, len(ranks)),
                like)


def _lower_cp(gm: fx.GraphModule, n: fx.Node, groups: GroupResolver, torchair: bool) -> fx.Node:
    """The ring shift and the Ulysses all-to-all as their reference kernels (ops/cp_collectives.py) spell them."""
    x, out_val = n.args[0], n.meta["val"]  # (the input may be an earlier op's lowering, without meta)
    if n.target is gl.cp_ring_shift.default:
        step, size, group = n.args[1:]
        shape = list(out_val.shape)  # a shift keeps the shape
        recv, send = ring_splits(out_val.numel(), step, size, groups.local_rank(group))
        flat = emit(gm, aten.view.default, (emit(gm, aten.clone.default, (x,), n,
                                                 kwargs={"memory_format": torch.contiguous_format}), [-1]), n)
        got = _all_to_all(gm, flat, recv, send, 1, group, groups, torchair, n)  # [numel]: a row is an element
        return emit(gm, aten.view.default, (got, shape), n)
    scatter_dim, gather_dim, size, group = n.args[1:]
    shape = list(out_val.shape)
    shape[scatter_dim] *= size
    shape[gather_dim] //= size  # the input's
    moved, back = _moved(gm, x, scatter_dim, len(shape), n)  # [shape[scatter_dim], the other dims...]
    if moved is x:
        moved = emit(gm, aten.clone.default, (x,), n, kwargs={"memory_format": torch.contiguous_format})
    rows = shape[scatter_dim] // size
    row_numel = out_val.numel() // shape[scatter_dim]  # the elements of one row of `moved`
    got = _all_to_all(gm, moved, [rows] * size, [rows] * size, row_numel, group, groups, torchair, n)
    chunks = emit(gm, aten.split.Tensor, (got, rows), n)
    pieces = []
    for i in range(size):
        piece = emit(gm, operator.getitem, (chunks, i), n)
        # back in the input's dim order: permute, not movedim (a view as well, but torchair has no converter for it)
        pieces.append(emit(gm, aten.permute.default, (piece, back), n) if back else piece)
    return emit(gm, aten.clone.default, (emit(gm, aten.cat.default, (pieces, gather_dim), n),), n,
                kwargs={"memory_format": torch.contiguous_format})


def _lower(gm: fx.GraphModule, n: fx.Node, groups: GroupResolver, torchair: bool) -> fx.Node | None:
    t, x = n.target, n.args[0]
    if t in (gl.cp_ring_shift.default, gl.cp_all_to_all.default):
        return _lower_cp(gm, n, groups, torchair)
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
    """Move each wait_tensor (with the view that reshapes its result, if that is its only user) down to just
    before its first user: the collective travels while the ops between its issue and its use compute
    (issue order, which all ranks share, is unchanged)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for w in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is c10d.wait_tensor.default]:
        chain = [w]
        while len(chain[-1].users) == 1 and next(iter(chain[-1].users)).target is aten.view.default:
            chain.append(next(iter(chain[-1].users)))
        first = min(chain[-1].users, key=order.__getitem__, default=None)
        if first is not None and first is not chain[-1].next:
            for node in chain:
                first.prepend(node)


LOWERED = (gl.tp_copy.default, gl.tp_reduce.default, gl.tp_reduce_max.default, gl.tp_gather.default,
           gl.tp_split.default, gl.sp_gather.default, gl.sp_reduce_scatter.default, gl.cp_ring_shift.default,
           gl.cp_all_to_all.default)


@graph_pass("lower_collectives", stage="train")
def lower_collectives(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    lowered, torchair = 0, lowers_to_torchair(ctx.backend)
    for n in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in LOWERED]:
        with gm.graph.inserting_before(n):
            out = _lower(gm, n, ctx.groups, torchair)
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
