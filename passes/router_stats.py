"""The routing the router losses read (graphllm::router_stat markers), for passes that split a micro-batch's tokens.

A mixture-of-experts layer marks what its load-balancing, z- and sequence-wise losses read of the routing (expert
ids, probabilities, logits; [rows·S, ...], row-major). A pass that leaves each rank a part of every sequence
(sequence parallelism over tp, context parallelism over cp) gathers each marked statistic back to the whole
micro-batch's, so the losses are the unsplit ones. The marker stays (it lowers to nothing), so a later pass finds
it again: under sp and cp the statistic is gathered over tp, then over cp.

The gathered tokens come in the ranks' order, which under context parallelism's zig-zag chunks is not the
sequence's; every router loss sums or averages over a sequence's tokens, so the order does not change it.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphllm.passes.graph_edit import emit
from graphllm.passes.matching import is_call

SEQ_DIM = 1
"""The sequence dimension of a statistic viewed [rows, S_local, ...]."""


def router_stats(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if is_call(n, torch.ops.graphllm.router_stat.default)]


def gather_router_stat(gm: fx.GraphModule, stat: fx.Node, gather, size: int, group: str) -> None:
    """Feed `stat` this rank's statistic [rows·S_local, ...] gathered over `group` along the sequence: viewed
    [rows, S_local, ...], `gather` (a graphllm all-gather op: its backward says how the ranks' gradients combine),
    flattened back to [rows·S_local·size, ...]."""
    x, rows = stat.args[:2]
    rest = list(x.meta["val"].shape[1:])
    with gm.graph.inserting_before(stat):
        view = emit(gm, torch.ops.aten.view.default, (x, [rows, -1, *rest]), stat)
        whole = emit(gm, gather, (view, SEQ_DIM, size, group), stat, "router stats")
        flat = emit(gm, torch.ops.aten.view.default, (whole, [-1, *rest]), stat)
    stat.args = (flat, *stat.args[1:])
