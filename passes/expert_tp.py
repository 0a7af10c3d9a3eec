"""Expert tensor parallelism (--etp = --tp): each expert's MLP split over the tensor-parallel ranks like a dense one.

Every tp rank holds the same tokens and, for its expert-parallel slice of the experts, 1/tp of each expert's
width (Megatron's expert tensor parallelism):

    gate_up [E, 2I, H]   column-parallel, block-wise: rows r·I/tp .. of the gate block and the same rows of
                         the up block (planning/sharding.py `blocks`), so silu(gate)·up stays local
    down    [E, H, I]    row-parallel: columns r·I/tp ..; each rank's output is a partial sum

    x ── tp_copy ──► permute … grouped matmuls … unpermute(·, ·, tp_copy(routing weights)) ── tp_reduce ──► y

tp_copy is the identity forward and an all-reduce backward (each rank's dx and routing-weight gradient see its
columns only), tp_reduce the all-reduce of the partial outputs (identity backward): the dense MLP's f and g.
The reduce goes after the combine ([T, H], not [T·k, H]) because the combine is linear in the expert outputs.
Each rank's expert weight gradients are whole for its columns (every tp rank saw every token), so no tp
reduction follows, unlike the token split of --etp 1. Legal for the same reason as tensor parallelism: the same
sums, split over ranks.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from graphllm.errors import GraphllmError
from graphllm.passes.graph_edit import emit
from graphllm.passes.matching import is_call
from graphllm.planning.sharding import Level

gl = torch.ops.graphllm
_UNPERMUTE = gl.moe_unpermute.default


def expert_tp_level(gmm: fx.Node, position: int, count: int, rank: int, size: int) -> Level:
    """The tp split of the weight of the `position`-th of a layer's `count` grouped matmuls (graph order): the
    first column-parallel (block-wise when its output is chunked in two: gate | up), the last row-parallel."""
    if count != 2:
        raise GraphllmError(f"--etp {size}: {gmm.name}'s experts make {count} grouped matmuls; expert tensor "
                            "parallelism splits an up (or gate|up) projection and a down projection, two")
    transposed = gmm.args[3] if len(gmm.args) > 3 else gmm.kwargs.get("transpose_weight", False)
    out_dim, in_dim = (1, 2) if transposed else (2, 1)  # stored [E, out, in] or [E, in, out]
    if position == 1:
        return in_dim, rank, size, "tp", 1
    halves = [u for u in gmm.users if is_call(u, torch.ops.aten.chunk.default) and u.args[1] == 2
              and u.args[2] in (-1, gmm.meta["val"].dim() - 1)]
    return out_dim, rank, size, "tp", 2 if halves else 1


def expert_tensor_parallel(gm: fx.GraphModule, permute: fx.Node) -> None:
    """tp_copy on the layer's tokens and routing weights, tp_reduce on each combine's output (module docstring)."""
    wrap_dispatch(gm, permute, gl.tp_copy.default, gl.tp_reduce.default, ("tp",),
                  ("expert input", "expert partial sums"), ids=False)


def wrap_dispatch(gm: fx.GraphModule, permute: fx.Node, inbound, outbound, args: tuple,
                  roles: tuple[str, str], *, ids: bool = True) -> None:
    """`inbound(t, *args)` on the permutation's tokens (and expert ids, with `ids`) and on each combine's routing
    weights; `outbound(.., *args)` on each combine's output, which its users then read."""
    x, expert_ids, *rest = permute.args
    with gm.graph.inserting_before(permute):
        x = emit(gm, inbound, (x, *args), permute, roles[0])
        if ids:
            expert_ids = emit(gm, inbound, (expert_ids, *args), permute, roles[0])
    permute.args = (x, expert_ids, *rest)
    for unpermute in unpermutes_of(permute):
        y, order, weights = unpermute.args
        with gm.graph.inserting_before(unpermute):
            unpermute.args = (y, order, emit(gm, inbound, (weights, *args), unpermute, roles[0]))
        with gm.graph.inserting_after(unpermute):
            out = emit(gm, outbound, (unpermute, *args), unpermute, roles[1])
        unpermute.replace_all_uses_with(out, delete_user_cb=lambda u: u is not out)


def unpermutes_of(permute: fx.Node) -> list[fx.Node]:
    """The moe_unpermute nodes that read this permutation's order (output 1)."""
    orders = [u for u in permute.users if u.target is operator.getitem and u.args[1] == 1]
    return [u for o in orders for u in o.users if is_call(u, _UNPERMUTE)]
