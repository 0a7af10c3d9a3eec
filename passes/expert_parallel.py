"""expert_parallel: share each MoE layer's experts out over the expert-parallel group (--ep N).

An expert-parallel group is ep data-parallel ranks (planning/layout.py): each has its own tokens, and rank r of
the group holds experts r·E/ep .. (r+1)·E/ep - 1 of every MoE layer (its slice of the stacked expert weights,
tagged with a ParamShard over "ep", so checkpoints stay whole tensors). The model graph's token permutation
(graphllm::moe_permute / moe_unpermute around the grouped matmuls, models/moe.py `dispatch`) is rewritten to
the all-gather dispatcher:

    x [T, H], weights, ids [T, k]   ── sp_gather over "ep" ──►  [ep·T, H], [ep·T, k]: the group's tokens
    moe_permute(.., first = r·E/ep, num = E/ep)                 only this rank's experts' pairs are grouped;
                                                                the others sort into the tail (computed as zero)
    grouped matmuls on this rank's expert weights
    moe_unpermute → [ep·T, H]: this rank's experts' share of every token's output
    sp_reduce_scatter over "ep" ──► [T, H]: each token's sum over all experts, back on its own rank

Each collective's autograd rule is its conjugate (all-gather ↔ reduce-scatter), so the backward graph
returns every token's gradient to its rank and sums the group's tokens into each expert's weight gradient
(the engine then averages expert gradients over the expert-data-parallel replicas, dividing by dp:
graphllm.parallel.optim.reduce_replicas). Dropless and static: every token-expert pair of the group is
computed exactly once, on the rank holding its expert; the cost is that each rank's permuted buffer holds
the group's ep·T·k rows, of which about T·k are its own. The router, its load-balancing loss and the
dense layers are untouched: they see this rank's tokens only, as under plain data parallelism.
Legal because the output of each token is the same sum of the same expert outputs, in another order.

With --etp = --tp each expert is also split over the tp ranks (passes/expert_tp.py: gate|up by columns,
block-wise, down by rows; tp_copy in, tp_reduce out) instead of each tp rank routing 1/tp of the tokens; the
pass then runs at --ep 1 too. Under sequence parallelism each tp rank routes its own sequence shard already: no
token split; with --etp the shards are all-gathered over tp before the experts and the outputs reduce-scattered
back (sequence parallelism puts no tp_copy, a gradient sum over tp, on these expert weights: each tp rank's slice
is its own).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from graphllm.errors import GraphllmError
from graphllm.passes.graph_edit import get_attr_value, read_source, set_parameter
from graphllm.passes.manager import PassContext, graph_pass
from graphllm.passes.matching import is_call
from graphllm.passes.shapes import repropagate
from graphllm.planning.flops import FLOP_ROWS
from graphllm.planning.moe_config import MoeConfig
from graphllm.planning.sharding import shard_param_nested
from graphllm.passes import ep_alltoall
from graphllm.passes.expert_tp import expert_tensor_parallel, expert_tp_level, unpermutes_of, wrap_dispatch

gl = torch.ops.graphllm
_PERMUTE, _UNPERMUTE, _GMM = gl.moe_permute.default, gl.moe_unpermute.default, gl.grouped_matmul.default
_COUNTS = 2  # moe_permute's outputs: x_sorted, order, group_sizes


@graph_pass("expert_parallel", stage="model")
def expert_parallel(gm: fx.GraphModule, ctx: PassContext, *, dispatcher: str = "allgather",
                    capacity_factor: float | None = None) -> fx.GraphModule:
    """`dispatcher` "allgather" (above) or "alltoall" (passes/ep_alltoall.py); `capacity_factor` the plan's
    --moe-capacity-factor, which bounds the all-to-all's buffers (moe_capacity has already applied it)."""
    ep, tp, etp = ctx.layout.ep, ctx.layout.tp, ctx.layout.etp
    sp = ctx.layout.sequence_parallel and tp > 1
    if ep == 1 and etp == 1:
        return gm
    coords = ctx.layout.coords(ctx.rank)
    ranks = (ctx.layout.group_rank("ep", coords), ctx.layout.group_rank("tp", coords) if etp > 1 else 0)
    sharded: dict[int, torch.nn.Parameter] = {}  # id(full) -> this rank's slice (a weight read twice stays one)
    for permute in [n for n in gm.graph.nodes if is_call(n, _PERMUTE)]:
        x, ids, first, num = permute.args
        if first != 0 or num % ep:
            raise GraphllmError(f"expert_parallel: {permute.name} permutes experts {first}..{first + num - 1}; --ep "
                                f"{ep} needs a whole layer's experts, a multiple of {ep}")
        local = num // ep
        tokens, k = ids.meta["val"].shape  # this rank's: 1/tp of the micro-batch's under sequence parallelism
        rank_tokens = tokens  # the capacity counts the rank's tokens (passes/moe_capacity.py), however they are split
        if etp > 1 and sp:
            tokens *= tp  # the tp ranks' sequence shards, gathered
        rows = tokens * k if etp > 1 or ep == 1 or sp else tokens // tp * k
        _shard_expert_weights(gm, ctx, permute, ranks, (ep, etp), sharded, rows=rows)
        x_val = x.meta["val"]
        if etp > 1 and sp:  # every tp rank's experts see every token: gather them, reduce-scatter the outputs
            _wrap(gm, permute, gl.sp_gather.default, gl.sp_reduce_scatter.default, tp, "tp",
                  ("token gather", "token scatter"))
            ctx.count("expert tensor-parallel layers")
        elif etp > 1:
            expert_tensor_parallel(gm, permute)
            ctx.count("expert tensor-parallel layers")
        elif tp > 1 and ep > 1 and not sp:  # under sequence parallelism each tp rank has its own tokens already
            _split_over_tp(gm, permute, tp)
            tokens //= tp
            ctx.count("token splits over tp")
        if ep == 1:
            continue
        if dispatcher == "alltoall":
            for unpermute in unpermutes_of(permute):
                cap = MoeConfig(capacity_factor=capacity_factor).capacity(rank_tokens, k, num)
                ep_alltoall.rewrite(gm, permute, unpermute, ep, (tokens, k, num), x_val, cap)
            ctx.count("MoE layers (all-to-all)")
            continue
        _wrap(gm, permute, gl.sp_gather.default, gl.sp_reduce_scatter.default, ep, "ep", ("dispatch", "combine"))
        permute.args = (*permute.args[:2], ranks[0] * local, local)
        ctx.count("MoE layers")
    if not ctx.counters.get(ctx.current_pass):
        flag = f"--ep {ep}" if ep > 1 else f"--etp {etp}"
        raise GraphllmError(f"{flag}: the model graph has no graphllm::moe_permute (no mixture-of-experts layer); "
                            f"use {flag.split()[0]} 1")
    repropagate(gm, {})
    gm.recompile()
    return gm


def _split_over_tp(gm: fx.GraphModule, permute: fx.Node, tp: int) -> None:
    """Under tensor parallelism every tp rank holds the same tokens and the same expert shard: each routes 1/tp
    of them (tp_split of x, ids and the routing weights) and the outputs are all-gathered back (tp_gather), so
    no expert row is computed twice. The experts' weight gradients are then partial sums over the tp ranks,
    which graphllm.parallel.optim.reduce_replicas adds up."""
    _wrap(gm, permute, gl.tp_split.default, gl.tp_gather.default, tp, "tp", ("token split", "token gather"))


def _wrap(gm: fx.GraphModule, permute: fx.Node, inbound, outbound, size: int, group: str,
          roles: tuple[str, str]) -> None:
    """The dispatch wrapped in `inbound(t, 0, size, group)` / `outbound(.., 0, size, group)` (wrap_dispatch)."""
    wrap_dispatch(gm, permute, inbound, outbound, (0, size, group), roles)


def _shard_expert_weights(gm: fx.GraphModule, ctx: PassContext, permute: fx.Node, ranks: tuple[int, int],
                          sizes: tuple[int, int], sharded: dict[int, torch.nn.Parameter], *, rows: int) -> None:
    """Replace the [E, ...] weights of every grouped matmul grouped by this permutation's counts with this rank's
    E/ep experts (dim 0), under expert tensor parallelism (etp > 1) split again over tp like a dense MLP
    (expert_tp_level); `rows`: the pairs the rank's own tokens make, its share of the work (FLOP_ROWS)."""
    counts = [u for u in permute.users if u.target is operator.getitem and u.args[1] == _COUNTS]
    gmms = [g for c in counts for g in c.users if is_call(g, _GMM)]
    if not gmms:
        raise GraphllmError(f"expert_parallel: {permute.name}'s experts are not graphllm::grouped_matmul calls")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    gmms.sort(key=order.__getitem__)  # graph order: the first multiplies the tokens, the last gives the output
    (ep_rank, tp_rank), (ep, etp) = ranks, sizes
    for position, gmm in enumerate(gmms):
        gmm.meta[FLOP_ROWS] = rows
        weight = _source_attr(gmm.args[1])
        full = get_attr_value(gm, weight.target)
        if id(full) not in sharded:
            levels = [(0, ep_rank, ep, "ep", 1)]
            if etp > 1:
                levels.append(expert_tp_level(gmm, position, len(gmms), tp_rank, etp))
            sharded[id(full)] = shard_param_nested(full, levels)
            ctx.count("sharded expert weights")
        set_parameter(gm, weight.target, sharded[id(full)])


def _source_attr(node: fx.Node) -> fx.Node:
    """The parameter a grouped matmul's weight comes from, through transposes, views and casts."""
    node = read_source(node)
    if node.op != "get_attr":
        raise GraphllmError(f"expert_parallel: a grouped matmul's weight ({node.name}) is not a parameter read; "
                            "expert weights must be the model's [E, ...] parameters")
    return node
