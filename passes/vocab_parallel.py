"""Vocab-parallel embedding and cross-entropy as graph nodes (Megatron-Core's semantics).

Each rank holds rows [start, start + V/tp) of the embedding / LM-head weight.

Embedding: ids outside this rank's range look up row 0 and are zeroed, then the ranks' partial
embeddings are summed (all-reduce; reduce-scatter under sequence parallelism).

Cross-entropy over logits split by vocabulary, never gathering the full [N, V] logits:
    m    = max over ranks of the local row max             (all-reduce max; no gradient: the loss does
                                                           not depend on m)
    lse  = log(sum over ranks of sum(exp(z - m)))         (all-reduce sum)
    zt   = z_target - m, taken by the rank whose range holds the target, zero elsewhere (all-reduce sum)
    loss_i = lse - zt, averaged over targets != ignore_index (or summed / per token, per `reduction`)
The all-reduce sums have identity backward (every rank computes the same loss), which gives each rank
softmax(z) - onehot(t) for its slice: the same gradient as the unsplit cross-entropy.

The fused LM-head loss (graphllm::linear_cross_entropy, passes/fuse_linear_cross_entropy.py) is split the same way
without any logits: each rank's graphllm::linear_cross_entropy_parts computes, chunk by chunk over its rows, the
row max m_r, s_r = sum(exp(z - m_r)) and its target logit; then
    m    = all-reduce max of m_r                          (no gradient, as above)
    lse  = m + log(all-reduce sum of s_r · exp(m_r - m))
    zt   = all-reduce sum of the target logits
    loss_i = lse - zt, reduced as above
— the same three all-reduces. Autograd through them hands each rank's parts op the gradients of s_r and of its
target logit, from which its backward recomputes its chunks' softmax − onehot.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from graphllm.passes.graph_edit import emit

aten = torch.ops.aten
gl = torch.ops.graphllm


def vocab_parallel_embedding(gm: fx.GraphModule, emb: fx.Node, start: int, rows: int) -> fx.Node:
    """Rewrite `embedding(w_local, ids)` in place of `emb`; returns the partial (pre-reduction) output."""
    weight, ids = emb.args[0], emb.args[1]
    with gm.graph.inserting_before(emb):
        below = emit(gm, aten.lt.Scalar, (ids, start), emb)
        above = emit(gm, aten.ge.Scalar, (ids, start + rows), emb)
        outside = emit(gm, aten.bitwise_or.Tensor, (below, above), emb)
        shifted = emit(gm, aten.sub.Tensor, (ids, start), emb)
        local = emit(gm, aten.masked_fill.Scalar, (shifted, outside, 0), emb)
        looked = emit(gm, aten.embedding.default, (weight, local, *emb.args[2:]), emb)
        mask = emit(gm, aten.unsqueeze.default, (outside, -1), emb)
        partial = emit(gm, aten.masked_fill.Scalar, (looked, mask, 0.0), emb)
    return partial


def vocab_parallel_cross_entropy(gm: fx.GraphModule, ce: fx.Node, start: int, cols: int) -> fx.Node:
    """A node computing `ce` (aten.cross_entropy_loss over [N, V/tp] local logits) across ranks."""
    logits, target = ce.args[0], ce.args[1]
    weight = ce.args[2] if len(ce.args) > 2 else ce.kwargs.get("weight")
    reduction = ce.args[3] if len(ce.args) > 3 else ce.kwargs.get("reduction", 1)
    ignore = ce.args[4] if len(ce.args) > 4 else ce.kwargs.get("ignore_index", -100)
    smoothing = ce.args[5] if len(ce.args) > 5 else ce.kwargs.get("label_smoothing", 0.0)
    if weight is not None or smoothing:
        from graphllm.errors import GraphllmError

        raise GraphllmError("tensor_parallel: vocab-parallel cross-entropy supports no class weights and no "
                            "label smoothing; drop them or leave lm_head out of the tensor-parallel plan")
    with gm.graph.inserting_before(ce):
        def e(target_op, *args, role=None):
            return emit(gm, target_op, args, ce, role)

        frozen = e(aten.detach.default, logits)
        # max.dim, not amax: torchair's GE converter for aten.amax is a stub (graphllm.preflight finds it)
        local_max = e(operator.getitem, e(aten.max.dim, frozen, -1, True), 0)
        gmax = e(gl.tp_reduce_max.default, local_max, "tp", role="loss")
        z = e(aten.sub.Tensor, logits, gmax)
        sumexp = e(gl.tp_reduce.default, e(aten.sum.dim_IntList, e(aten.exp.default, z), [-1]), "tp", role="loss")
        lse = e(aten.log.default, sumexp)
        outside = e(aten.bitwise_or.Tensor, e(aten.lt.Scalar, target, start), e(aten.ge.Scalar, target, start + cols))
        local = e(aten.masked_fill.Scalar, e(aten.sub.Tensor, target, start), outside, 0)
        picked = e(aten.squeeze.dim, e(aten.gather.default, z, 1, e(aten.unsqueeze.default, local, 1)), 1)
        picked = e(gl.tp_reduce.default, e(aten.masked_fill.Scalar, picked, outside, 0.0), "tp", role="loss")
        ignored = e(aten.eq.Scalar, target, ignore)
        per_token = e(aten.masked_fill.Scalar, e(aten.sub.Tensor, lse, picked), ignored, 0.0)
        if reduction == 0:
            return per_token
        total = e(aten.sum.default, per_token)
        if reduction == 2:
            return total
        count = e(aten.sum.default, e(aten.logical_not.default, ignored))
        return e(aten.div.Tensor, total, count)


def vocab_parallel_linear_cross_entropy(gm: fx.GraphModule, fused: fx.Node, start: int, rows: int,
                                        vocab: int) -> tuple[fx.Node, fx.Node]:
    """Nodes computing `fused` (graphllm.linear_cross_entropy over a `vocab`-row weight that is now this rank's
    `rows` rows from `start`) across ranks: (loss, lse), the op's two outputs."""
    from graphllm.ops.linear_cross_entropy import vocab_spans

    hidden, weight, labels, ignore, reduction, chunk_size = fused.args
    chunks = len(vocab_spans(vocab, chunk_size))  # as many chunks per rank as the whole op had
    with gm.graph.inserting_before(fused):
        def e(target_op, *args, role=None):
            return emit(gm, target_op, args, fused, role)

        parts = e(gl.linear_cross_entropy_parts.default, hidden, weight, labels, start, -(-rows // chunks))
        local_max, sum_exp, picked = (e(operator.getitem, parts, i) for i in range(3))
        gmax = e(gl.tp_reduce_max.default, local_max, "tp", role="loss")
        rescaled = e(aten.mul.Tensor, sum_exp, e(aten.exp.default, e(aten.sub.Tensor, local_max, gmax)))
        lse = e(aten.add.Tensor, e(aten.log.default, e(gl.tp_reduce.default, rescaled, "tp", role="loss")), gmax)
        picked = e(gl.tp_reduce.default, picked, "tp", role="loss")
        ignored = e(aten.eq.Scalar, labels, ignore)
        per_token = e(aten.masked_fill.Scalar, e(aten.sub.Tensor, lse, picked), ignored, 0.0)
        if reduction == 0:
            return per_token, lse
        total = e(aten.sum.default, per_token)
        if reduction == 2:
            return total, lse
        count = e(aten.sum.default, e(aten.logical_not.default, ignored))
        return e(aten.div.Tensor, total, count), lse
