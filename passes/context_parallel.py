"""context_parallel: attention across the sequence that cp ranks share; cp_positions: each rank's RoPE positions.

Under context parallelism every rank's graph is captured for its own seq_len / cp tokens (the data feed
gives it the tokens `graphllm.planning.context.cp_token_index` lists: zig-zag chunks for the ring). Every
op but attention acts on tokens one by one, so only these things change:

- **positions** (`cp_positions`, first in the model stage, before the fusions fold the RoPE tables into
  constants): the `arange` of the local length that RoPE's angles come from becomes this rank's global
  token positions. Packed rows carry their positions as an input and need nothing.
- **attention** (`context_parallel`, after tensor/sequence parallelism): each `graphllm::attention`
  (causal) / `graphllm::varlen_attention` becomes Ulysses (all-to-all to head-sharded, attention over
  the ring rank's whole chunk pair, all-to-all back), ring attention (passes/ring_attention.py), or both
  (hybrid: Ulysses inside, ring across). Packed rows: the segment ids are computed once from the
  position ids of the whole sequence (all-gathered over "cp"), so no document attends across a boundary
  on any rank.
- **the loss**: each rank's mean cross-entropy over its own tokens is rescaled to
  `loss_r · n_r · cp / Σ n`, with n the tokens that count (labels ≠ -100) and Σ n all-reduced over "cp".
  The mean over cp ranks — what the runtime averages, like data parallelism — is then exactly the
  token-weighted loss of the whole sequence, and so are the gradients. The model marks each mean
  (graphllm::token_mean), so each multi-token-prediction depth is weighted by its own labels.
- **multi-token prediction**: the ids and labels k ahead (graphllm::ahead) of a rank's last positions are
  on other ranks: they come from an all-gather over cp.
- **mixture of experts**: each rank routes its own tokens (to whole experts, or under --ep to the ep ranks
  of its cp index; the engine averages expert gradients over their dp·cp replicas). What the router losses
  read of the routing is all-gathered over cp (passes/router_stats.py), so the load-balancing, z- and
  sequence-wise losses are the whole sequences' on every cp rank and are added unweighted.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphllm.errors import GraphllmError
from graphllm.passes.graph_edit import emit
from graphllm.passes.manager import PassContext, graph_pass
from graphllm.passes.matching import is_call
from graphllm.passes.router_stats import gather_router_stat, router_stats
from graphllm.passes.ring_attention import emit_ring, runs_of, take_runs, ulysses_in, ulysses_out
from graphllm.passes.shapes import old_shapes, repropagate
from graphllm.planning.context import cp_token_index, ring_schedule, ring_tokens

aten = torch.ops.aten
gl = torch.ops.graphllm
IGNORE_INDEX = -100


def _placeholder(gm: fx.GraphModule, name: str) -> fx.Node | None:
    return next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == name), None)


def _local_len(gm: fx.GraphModule) -> int:
    ids = next(n for n in gm.graph.nodes if n.op == "placeholder")
    return ids.meta["val"].shape[-1]


@graph_pass("cp_positions")
def cp_positions(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    layout = ctx.layout
    if layout.cp == 1 or _placeholder(gm, "position_ids") is not None:
        return gm
    local = _local_len(gm)
    aranges = [n for n in gm.graph.nodes if is_call(n, aten.arange.default) and n.args[0] == local]
    if len(aranges) != 1:
        raise GraphllmError(f"context parallelism found {len(aranges)} position ranges (arange({local})) in the "
                            "captured graph, expected the one RoPE's angles come from; this model is not supported "
                            "with --cp")
    node = aranges[0]
    mine = cp_token_index(local * layout.cp, layout.cp, layout.ulysses_size)[layout.coords(ctx.rank).cp]
    kwargs = {k: v for k, v in node.kwargs.items() if k in ("device", "pin_memory")}
    with gm.graph.inserting_before(node):
        parts = [emit(gm, aten.arange.start, (a, b), node, kwargs=dict(kwargs, dtype=torch.int64))
                 for a, b in runs_of(mine)]
        new = parts[0] if len(parts) == 1 else emit(gm, aten.cat.default, (parts,), node)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    ctx.count("position ranges", len(parts))
    repropagate(gm, {})
    gm.recompile()
    return gm


@graph_pass("context_parallel")
def context_parallel(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    layout = ctx.layout
    if layout.cp == 1:
        return gm
    shapes = old_shapes(gm)
    local = _local_len(gm)
    seq = local * layout.cp
    windowed = [n for n in gm.graph.nodes if is_call(n, gl.window_attention.default)]
    if windowed:
        raise GraphllmError(f"--cp does not split sliding-window attention yet (this model's layers see the last "
                            f"{windowed[0].args[4]} tokens); train it with --cp 1")
    attn = [n for n in gm.graph.nodes if is_call(n, gl.attention.default) or is_call(n, gl.varlen_attention.default)]
    if not attn:
        raise GraphllmError("--cp: the graph has no graphllm attention op to parallelise (fuse_attention did not "
                            "match this model's attention, or it was disabled); context parallelism needs it")
    packed = any(is_call(n, gl.varlen_attention.default) for n in attn)
    segments = _segments_by_ring_rank(gm, ctx, seq) if packed else None
    for node in attn:
        _rewrite_attention(gm, ctx, node, seq, segments)
    _gather_routing(gm, ctx)
    _ahead_across_ranks(gm, ctx, seq)
    _weight_loss(gm, ctx)
    repropagate(gm, shapes)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _whole_sequence(gm: fx.GraphModule, ctx: PassContext, t: fx.Node, seq: int, like: fx.Node) -> fx.Node:
    """t [B, S / cp] of this rank's tokens → [B, S] of the whole sequences, in sequence order: all-gathered over
    "cp" (in cp-rank order), then put back in order (cp_token_index). Emitted at the graph's inserting point."""
    lay = ctx.layout
    order = [p for rank in cp_token_index(seq, lay.cp, lay.ulysses_size) for p in rank]  # cp-rank order
    where = {p: i for i, p in enumerate(order)}
    gathered = emit(gm, gl.tp_gather.default, (t, 1, lay.cp, "cp"), like)
    return take_runs(gm, gathered, 1, [where[p] for p in range(seq)], seq, like)


def _segments_by_ring_rank(gm: fx.GraphModule, ctx: PassContext, seq: int) -> dict[int, fx.Node]:
    """Each ring rank's segment ids [B, S / ring], in its tokens' order, computed once for every layer: the
    position ids all-gathered over "cp", put back in order, a new sample begun at every 0 (as the model's
    packed mask counts them), then each ring rank's tokens taken."""
    layout = ctx.layout
    pos = _placeholder(gm, "position_ids")
    if pos is None:
        raise GraphllmError("--cp with packed attention but the graph has no position_ids input")
    last_input = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_before(last_input.next):
        natural = _whole_sequence(gm, ctx, pos, seq, pos)
        starts = emit(gm, aten.eq.Scalar, (natural, 0), pos)
        seg = emit(gm, aten.cumsum.default, (starts, 1), pos, kwargs={"dtype": torch.int64})
        ring = layout.ring_size
        by_rank = {r: take_runs(gm, seg, 1, ring_tokens(seq, ring, r), seq, pos) for r in range(ring)}
    ctx.count("segment all-gathers")
    return by_rank


def _rewrite_attention(gm: fx.GraphModule, ctx: PassContext, node: fx.Node, seq: int, segments) -> None:
    layout = ctx.layout
    packed = is_call(node, gl.varlen_attention.default)
    if packed:
        q, k, v, _, scale = node.args
    else:
        q, k, v, scale, causal = node.args
        if not causal:
            raise GraphllmError("--cp supports causal attention only; this graph has a non-causal attention op")
    degree, ring = layout.ulysses_size, layout.ring_size
    ring_rank = layout.coords(ctx.rank).cp // degree
    key_dim = k.meta["val"].shape[-1]
    with gm.graph.inserting_before(node):
        if degree > 1:
            q, k, v = (ulysses_in(gm, x, degree, node) for x in (q, k, v))
            ctx.count("Ulysses all-to-alls", 4)
        if ring == 1:  # Ulysses alone: the whole sequence, in order, on every rank
            out = emit(gm, node.target, (q, k, v, segments[0], scale) if packed else (q, k, v, scale, True), node)
        else:
            def seg_of(rank: int):
                return segments[rank] if packed else None

            steps = ring_schedule(seq // ring, ring, ring_rank)
            out = emit_ring(gm, node, q, k, v, scale=scale, steps=steps, ring=ring, key_dim=key_dim,
                            q_seg=seg_of(ring_rank), k_seg_of=seg_of)
            ctx.count("ring steps", ring)
            ctx.count("attention blocks", sum(len(s.blocks) for s in steps))
        if degree > 1:
            out = ulysses_out(gm, out, degree, node)
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    ctx.count("attention layers")


def _gather_routing(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Each MoE layer routes this rank's tokens; its router losses read the micro-batch's routing, all-gathered
    over cp (sp_gather: every cp rank computes the same router losses, and the runtime averages the ranks'
    gradients, so the backward sums the ranks' copies into each one's slice: reduce-scatter)."""
    cp = ctx.layout.cp
    for stat in router_stats(gm):
        parts = stat.args[2] if len(stat.args) > 2 else stat.kwargs.get("parts", 1)
        if parts != cp:
            raise GraphllmError(f"context_parallel: a router statistic was captured for 1/{parts} of each "
                                f"sequence, not 1/{cp} (--cp {cp}); capture the model with seq_parts = {cp}")
        gather_router_stat(gm, stat, gl.sp_gather.default, cp, "cp")
        stat.args, stat.kwargs = stat.args[:2], {}
        ctx.count("router statistics gathered")


def _ahead_across_ranks(gm: fx.GraphModule, ctx: PassContext, seq: int) -> None:
    """Each graphllm::ahead(t, k, fill) (MTP's ids and labels k ahead) of this rank's tokens: t all-gathered over
    cp (in rank order), put in sequence order, moved k ahead there, and this rank's positions taken."""
    lay = ctx.layout
    mine = cp_token_index(seq, lay.cp, lay.ulysses_size)[lay.coords(ctx.rank).cp]
    for node in [n for n in gm.graph.nodes if is_call(n, gl.ahead.default)]:
        t, k, fill = node.args
        with gm.graph.inserting_before(node):
            moved = emit(gm, gl.ahead.default, (_whole_sequence(gm, ctx, t, seq, node), k, fill), node)
            out = take_runs(gm, moved, 1, mine, seq, node)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        ctx.count("tokens ahead gathered")


def _token_share(gm: fx.GraphModule, ctx: PassContext, loss: fx.Node, labels: fx.Node) -> fx.Node:
    """loss_r · n_r · cp / Σ n for a mean over the tokens `labels` counts (n; Σ n all-reduced over cp): a rank
    without counted tokens adds 0, not its NaN mean. Emitted where the graph's inserting point is."""
    counted = emit(gm, aten.ne.Scalar, (labels, IGNORE_INDEX), loss)
    n_local = emit(gm, aten.sum.dim_IntList, (counted, [0, 1]), loss, kwargs={"dtype": torch.float32})
    n_all = emit(gm, gl.tp_reduce.default, (n_local, "cp"), loss)
    has = emit(gm, aten.gt.Scalar, (n_local, 0), loss)
    kept = emit(gm, aten.where.ScalarOther, (has, loss, 0.0), loss)
    share = emit(gm, aten.div.Tensor, (emit(gm, aten.mul.Tensor, (n_local, float(ctx.layout.cp)), loss),
                                       emit(gm, aten.clamp_min.default, (n_all, 1.0), loss)), loss)
    return emit(gm, aten.mul.Tensor, (kept, share), loss)


def _weight_loss(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Each cross-entropy the model marks (graphllm::token_mean: the main one, each MTP depth's, each over its own
    labels) weighted by its tokens (_token_share); the router losses beside them are the same on every cp rank
    (_gather_routing) and stay as they are. A graph without marks has its whole loss weighted by the labels'
    tokens. A graph returning (loss, metrics) (the MoE load balance, passes/moe_stats.py, counts summed over cp;
    the MTP loss, from the weighted means) keeps its metrics."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    result, labels = out.args[0], _placeholder(gm, "labels")
    loss = result[0] if isinstance(result, (tuple, list)) else result
    val = loss.meta.get("val") if isinstance(loss, fx.Node) else None
    if labels is None or not isinstance(val, torch.Tensor) or val.dim() != 0:
        raise GraphllmError("--cp supports the language-model loss (pretrain, sft): this graph returns "
                            f"{'logits' if labels is None else 'a task output'}, which context parallelism does "
                            "not split yet; use --cp 1")
    marks = [n for n in gm.graph.nodes if is_call(n, gl.token_mean.default)]
    for mark in marks:
        with gm.graph.inserting_before(mark):
            weighted = _token_share(gm, ctx, *mark.args)
        mark.replace_all_uses_with(weighted)
        gm.graph.erase_node(mark)
    if not marks:
        with gm.graph.inserting_before(out):
            weighted = _token_share(gm, ctx, loss, labels)
        out.args = ((weighted, *result[1:]),) if isinstance(result, (tuple, list)) else (weighted,)
    ctx.count("loss reweighted by tokens", max(len(marks), 1))
