"""The all-to-all token dispatcher of expert parallelism (--moe-dispatcher alltoall), as graph nodes.

The rank keeps its permutation over all E experts (graphllm::moe_permute(x, ids, 0, E): its T·k pairs sorted
by expert, so by destination rank, since rank q holds experts q·E/ep ..). Each destination gets a fixed C rows
(static shapes: no shape may depend on the routing):

    dispatch  row i of the sorted pairs → slot q·C + (i - first row of rank q)      [ep·C (+1 dump), H]
              its expert's index on rank q rides along; one all_to_all each        → [ep·C, H], [ep·C, 1]
    experts   graphllm::moe_permute of the received rows by local expert (empty slots carry the id E/ep: the
              tail) → the grouped matmuls on this rank's experts → moe_unpermute with weight 1 (back to slot
              order, empty slots zero)
    combine   all_to_all back; row i of the sorted pairs reads its slot again; the model's own moe_unpermute
              then weights and adds each token's pairs, as without expert parallelism

C is the most rows one destination can receive: T·min(k, E/ep) dropless (a token picks an expert once), or
E/ep experts × their capacity under --moe-capacity-factor (passes/moe_capacity.py has already sent the
dropped pairs to the tail, which this dispatch leaves out: they land in the dump row, sliced off). So
dropless all-to-all moves ep·T·min(k, E/ep) rows each way — more than the all-gather dispatcher's ep·T
when k > 1 —, and with a capacity factor F about F·T·k rows, which is where it pays. Variable-size
all-to-alls (Megatron's dropless default) need shapes that depend on the routing, which a static graph has
not. Each all_to_all is graphllm::cp_all_to_all (equal splits along dim 0; its backward is the reverse
all_to_all), lowered like context parallelism's.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from graphllm.passes.graph_edit import emit

aten = torch.ops.aten
gl = torch.ops.graphllm


def slots_per_rank(tokens: int, top_k: int, local: int, capacity: int | None) -> int:
    """C: the rows one rank may send to one destination holding `local` experts."""
    worst = tokens * min(top_k, local)
    return worst if capacity is None else min(worst, local * capacity)


def rewrite(gm: fx.GraphModule, permute: fx.Node, unpermute: fx.Node, ep: int, shape: tuple[int, int, int],
            x_val: torch.Tensor, capacity: int | None) -> None:
    """Route `permute`'s pairs to their experts' ranks and back (see the module docstring). `shape`: (tokens, k,
    experts) of the permutation; `x_val`: an example of its rows' dtype and device."""
    tokens, k, experts = shape
    local = experts // ep
    C = slots_per_rank(tokens, k, local, capacity)
    out = {u.args[1]: u for u in permute.users if u.target is operator.getitem}  # 0 rows, 1 order, 2 counts
    rows, counts = out[0], out[2]
    hidden, dev = x_val.shape[1], x_val.device

    def op(target, *args, **kwargs):
        return emit(gm, target, args, permute, "dispatch", kwargs)

    gmms = [g for g in counts.users if g.target is gl.grouped_matmul.default]
    with gm.graph.inserting_before(min(gmms, key=_position(gm))):
        n = tokens * k
        i = op(aten.arange.default, n, dtype=torch.long, device=dev)
        per_rank = op(aten.sum.dim_IntList, op(aten.view.default, counts, [ep, local]), [1])  # [ep]
        rank_ends = op(aten.cumsum.default, per_rank, 0)
        rank_starts = op(aten.sub.Tensor, rank_ends, per_rank)
        dest = _bucket(op, i, rank_ends)  # [T·k] 0..ep (ep: a dropped pair)
        within = op(aten.sub.Tensor, i, op(aten.index_select.default, rank_starts, 0,
                                           op(aten.clamp.default, dest, None, ep - 1)))
        valid = op(aten.logical_and.default, op(aten.lt.Scalar, dest, ep), op(aten.lt.Scalar, within, C))
        slot = op(aten.where.ScalarOther, valid, op(aten.add.Tensor, op(aten.mul.Tensor, dest, C), within), ep * C)
        expert = _bucket(op, i, op(aten.cumsum.default, counts, 0))  # [T·k] 0..E
        local_id = op(aten.sub.Tensor, expert, op(aten.mul.Tensor, dest, local))
        # scatter (not index_copy, whose GE converter is a stub): several dropped pairs share the dump row
        send = op(aten.scatter.src, op(aten.zeros.default, [ep * C + 1, hidden], dtype=x_val.dtype, device=dev), 0,
                  op(aten.expand.default, op(aten.unsqueeze.default, slot, 1), [n, hidden]), rows)
        send_ids = op(aten.scatter.src, op(aten.full.default, [ep * C + 1], local, dtype=torch.long, device=dev), 0,
                      slot, local_id)
        recv = op(gl.cp_all_to_all.default, op(aten.slice.Tensor, send, 0, 0, ep * C), 0, 0, ep, "ep")
        recv_ids = op(gl.cp_all_to_all.default, op(aten.view.default, op(aten.slice.Tensor, send_ids, 0, 0, ep * C),
                                                   [ep * C, 1]), 0, 0, ep, "ep")
        mine = op(gl.moe_permute.default, recv, recv_ids, 0, local)
        mine_rows, mine_order, mine_counts = (op(operator.getitem, mine, j) for j in range(3))
    for g in gmms:
        g.args = tuple(mine_counts if a is counts else mine_rows if a is rows else a for a in g.args)
    y = unpermute.args[0]
    with gm.graph.inserting_before(unpermute):
        ones = op(aten.ones.default, [ep * C, 1], dtype=y.meta["val"].dtype, device=dev)
        back = op(gl.cp_all_to_all.default, op(gl.moe_unpermute.default, y, mine_order, ones), 0, 0, ep, "ep")
        padded = op(aten.cat.default, [back, op(aten.zeros.default, [1, hidden], dtype=y.meta["val"].dtype, device=dev)])
        y_sorted = op(aten.index_select.default, padded, 0, slot)  # [T·k, H] in the rank's sorted pair order
    unpermute.args = (y_sorted, *unpermute.args[1:])


def _bucket(op, i: fx.Node, ends: fx.Node) -> fx.Node:
    """bucketize(i, ends, right=True) — how many of the sorted `ends` are ≤ each i — as a comparison and a sum
    ([T·k, buckets]; bucketize's GE converter is a stub)."""
    at_or_past = op(aten.le.Tensor, op(aten.unsqueeze.default, ends, 0), op(aten.unsqueeze.default, i, 1))
    return op(aten.sum.dim_IntList, op(aten._to_copy.default, at_or_past, dtype=torch.long), [1])


def _position(gm: fx.GraphModule):
    order = {n: j for j, n in enumerate(gm.graph.nodes)}
    return lambda n: order[n]
