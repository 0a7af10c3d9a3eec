"""sequence_parallel: shard the residual stream over the tensor-parallel group by sequence.

Runs after tensor_parallel and rewrites the collectives it inserted (Megatron-Core's sequence
parallelism): outside the column→row parallel regions, activations [B, S, H] are held as
[B, S/tp, H] — norms, residual adds and the embedding output are computed once per token instead of
once per rank, and their activation memory is divided by tp.

    tp_copy before a column-parallel linear / the LM head  ->  sp_gather (all-gather along S;
                                                              backward reduce-scatter)
    tp_reduce after a row-parallel linear / the embedding  ->  sp_reduce_scatter (backward all-gather)

Parameters used inside the sequence-sharded region (the norms' weights; a mixture of experts' router and
experts) see only this rank's tokens, so their gradients are partial: each is wrapped in tp_copy, whose backward
all-reduces them; not the expert weights that expert tensor parallelism (--etp) splits over tp, which see every
tp rank's tokens (expert_parallel gathers them). A mixture-of-experts layer in the region routes this rank's tokens; what its losses read of the
routing (graphllm::router_stat: expert ids, probabilities, logits) is gathered over tp into the whole
micro-batch's, in its token order, so the load-balancing, z- and sequence-wise losses are the unsharded ones. The
pass is legal because all-gather∘reduce-scatter equals all-reduce, and the sharded region's ops act
on each token independently.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphllm.errors import GraphllmError
from graphllm.planning.sharding import shard_of
from graphllm.passes.graph_edit import TP_ROLE_KEY, emit, get_attr_value, read_source
from graphllm.passes.manager import PassContext, graph_pass
from graphllm.passes.matching import is_call
from graphllm.passes.router_stats import gather_router_stat
from graphllm.passes.shapes import old_shapes, repropagate

gl = torch.ops.graphllm
SEQ_DIM = 1  # activations are [batch, sequence, hidden]


@graph_pass("sequence_parallel")
def sequence_parallel(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    layout = ctx.layout
    if not layout.sequence_parallel:
        return gm
    tp = layout.tp
    roles = {n: n.meta.get(TP_ROLE_KEY) for n in gm.graph.nodes}
    if not any(r in ("row_out", "embed_out") for r in roles.values()):
        raise GraphllmError("sequence_parallel found no tensor-parallel regions: run tensor_parallel first (--tp > 1)")
    shapes = old_shapes(gm)
    for node, role in roles.items():
        if role in ("row_out", "embed_out"):
            node.target, node.args = gl.sp_reduce_scatter.default, (node.args[0], SEQ_DIM, tp, "tp")
            ctx.count("reduce-scatter")
        elif role in ("col_in", "head_in"):
            node.target, node.args = gl.sp_gather.default, (node.args[0], SEQ_DIM, tp, "tp")
            ctx.count("all-gather")
    sharded: set[fx.Node] = set()
    for node in list(gm.graph.nodes):  # the sequence-sharded region: from a reduce-scatter to the next gather
        if is_call(node, gl.sp_reduce_scatter.default):
            sharded.add(node)
        elif is_call(node, gl.router_stat.default) and any(a in sharded for a in node.all_input_nodes):
            # tp_gather: its backward keeps this rank's slice, as every tp rank computes the same loss from the whole
            gather_router_stat(gm, node, gl.tp_gather.default, tp, "tp")
            ctx.count("router statistics gathered")
        elif not is_call(node, gl.sp_gather.default) and any(a in sharded for a in node.all_input_nodes):
            sharded.add(node)
    # expert weights that expert tensor parallelism will split over tp see every tp rank's tokens (gathered first):
    # their gradient is the rank's own slice's, nothing to sum
    split = {read_source(n.args[1]) for n in gm.graph.nodes if is_call(n, gl.grouped_matmul.default)
             } if layout.etp > 1 else set()
    for node in [n for n in gm.graph.nodes if n.op == "get_attr" and n not in split]:
        value = get_attr_value(gm, node.target)
        if not isinstance(value, torch.nn.Parameter) or shard_of(value) is not None:
            continue
        users = [u for u in node.users if u in sharded]
        if not users:
            continue
        with gm.graph.inserting_after(node):
            copy = emit(gm, gl.tp_copy.default, (node, "tp"), users[0], "weight")
        for u in users:
            u.replace_input_with(node, copy)
        ctx.count("weight gradient all-reduce")
    repropagate(gm, shapes)
    gm.recompile()
    return gm
