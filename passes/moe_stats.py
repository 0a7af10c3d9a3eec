"""moe_stats: the load balance of every MoE layer as metrics beside the training loss.

For each graphllm::moe_permute (before capacity and expert parallelism rewrite it) the pass counts, from the
router's expert ids [T, k] of this rank's micro-batch, the pairs per expert c_e (scatter_add into a static [E]);
the graph then returns `(loss, metrics)` instead of `loss` (a task graph's metrics vector is extended), with

    moe/max_load   max_e c_e / (T·k / E), averaged over the MoE layers: 1 is perfect balance, E the worst
    moe/dropped    Σ_e max(0, c_e - C) / (T·k), over all layers: the share of pairs past the experts' capacity
                   (--moe-capacity-factor; exactly the pairs moe_capacity drops, position policy); 0 when dropless

The engine averages metrics like the loss (micro-batches, data-parallel ranks) and the training log writes
them per step (graphllm.train.train_steps). The counts are integer work on [T·k] ids, outside autograd. Under
sequence parallelism each tp rank routes its shard of the sequence, under context parallelism each cp rank its
part: the counts are summed over tp, then cp (tp_reduce), so every rank reports the micro-batch's balance.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphllm.passes.graph_edit import emit
from graphllm.passes.manager import PassContext, graph_pass
from graphllm.passes.matching import is_call
from graphllm.passes.shapes import repropagate
from graphllm.planning.moe_config import COUNTS_PREFIX, MoeConfig

aten = torch.ops.aten
_PERMUTE = torch.ops.graphllm.moe_permute.default
METRICS = ("moe/max_load", "moe/dropped")
"""The names of the entries the pass appends, in order."""


BIAS = "e_score_correction_bias"
"""The routing-bias buffer of aux-free balancing (DeepSeek-V3): a router whose choice reads it gets its counts out."""


def bias_count_names(model) -> tuple[str, ...]:
    """The count metrics the pass appends with `bias_counts`: every routing-bias buffer of `model` (module order, which
    is the graph's layer order), one per expert."""
    return tuple(f"{COUNTS_PREFIX}{name}/{e}" for name, buf in model.named_buffers()
                 if name.endswith(BIAS) for e in range(buf.numel()))


def _bias_of(ids: fx.Node, hops: int = 8) -> str | None:
    """The routing-bias buffer the expert ids were chosen with: the nearest get_attr of one within `hops` nodes
    upstream (breadth first, so an earlier layer's router, much further up, is never taken)."""
    seen, frontier = {ids}, [ids]
    for _ in range(hops):
        frontier = [a for n in frontier for a in n.all_input_nodes if a not in seen]
        seen.update(frontier)
        for n in frontier:
            if n.op == "get_attr" and str(n.target).endswith(BIAS):
                return str(n.target)
    return None


@graph_pass("moe_stats", stage="model")
def moe_stats(gm: fx.GraphModule, ctx: PassContext, *, capacity_factor: float | None = None,
              bias_counts: bool = False) -> fx.GraphModule:
    """`bias_counts`: also return each biased router's pairs per expert (bias_count_names), for the bias update."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    result = out.args[0]
    loss = result[0] if isinstance(result, (tuple, list)) else result
    permutes = [n for n in gm.graph.nodes if is_call(n, _PERMUTE)]
    if not permutes or not isinstance(loss, fx.Node) or loss.meta["val"].dim() != 0:
        return gm  # no MoE layer, or a graph without a loss (logits)
    moe = MoeConfig(capacity_factor=capacity_factor)
    lay = ctx.layout  # each tp rank (sequence parallelism) and each cp rank routes its part of the micro-batch
    splits = [(kind, size) for kind, size in (("tp", lay.tp if lay.sequence_parallel else 1), ("cp", lay.cp))
              if size > 1]
    loads, drops, pairs, biased = [], [], 0, []
    with gm.graph.inserting_before(out):
        def op(target, *args, **kwargs):
            return emit(gm, target, args, out, "moe_stats", kwargs)

        for permute in permutes:
            ids, experts = permute.args[1], permute.args[2] + permute.args[3]
            tokens, k = ids.meta["val"].shape
            flat = op(aten.view.default, ids, [-1])  # scatter_add, not one_hot: one_hot asserts (no GE converter)
            zeros = op(aten.zeros.default, [experts], dtype=torch.float32, device=ids.meta["val"].device)
            ones = op(aten.ones.default, [tokens * k], dtype=torch.float32, device=ids.meta["val"].device)
            counts = op(aten.scatter_add.default, zeros, 0, flat, ones)  # [E] pairs per expert
            for kind, size in splits:  # the micro-batch's counts: summed over the ranks' parts of its sequences
                counts = op(torch.ops.graphllm.tp_reduce.default, counts, kind)
                tokens *= size
            loads.append(op(aten.div.Tensor, op(aten.max.default, counts), tokens * k / experts))
            cap = moe.capacity(tokens, k, experts)
            if cap is not None:
                drops.append(op(aten.sum.default, op(aten.clamp.default, op(aten.sub.Tensor, counts, cap), 0)))
            pairs += tokens * k
            if bias_counts and _bias_of(ids) is not None:
                biased.append(counts)
        mean_load = op(aten.div.Tensor, op(aten.sum.default, op(aten.stack.default, loads)), len(loads))
        dropped = (op(aten.div.Tensor, op(aten.sum.default, op(aten.stack.default, drops)), pairs) if drops
                   else op(aten.zeros_like.default, mean_load))
        stats = op(aten.stack.default, [mean_load, dropped])  # [2] float32
        if biased:  # then every biased layer's [E] counts, layer by layer
            stats = op(aten.cat.default, [stats, *biased])
        if isinstance(result, (tuple, list)):  # a task's (loss, metrics): extend its vector
            metrics = op(aten.cat.default, [op(aten._to_copy.default, result[1], dtype=torch.float32), stats])
        else:
            metrics = stats
    out.args = ((loss, metrics),)
    ctx.count("MoE layers", len(permutes))
    repropagate(gm, {})
    gm.recompile()
    return gm
