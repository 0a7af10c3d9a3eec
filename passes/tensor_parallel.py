"""tensor_parallel: shard parameters over the tensor-parallel group and insert its collectives.

Megatron-Core's tensor parallelism, done on the captured graph: for each parameter the plan
(passes/tp_plan.py) names, this rank's slice replaces the parameter (tagged with a ParamShard), and
the linear/embedding using it is rewritten —

    column-parallel   y_local = linear(tp_copy(x), W[rows of this rank])
    row-parallel      y = tp_reduce(linear(x_local, W[:, cols of this rank])) (+ bias)
    vocab embedding   tp_reduce(masked lookup in this rank's rows)
    vocab LM head     local logits; cross-entropy becomes vocab-parallel (passes/vocab_parallel.py);
                      logits the graph returns are all-gathered (tp_gather); the fused LM-head loss
                      (graphllm.linear_cross_entropy) becomes its vocab-parallel form on this rank's rows

LoRA (graphllm.lora_linear, passes/lora.py) is sharded with its base: a column-parallel base shards B along
the output (A stays whole, wrapped in tp_copy: every rank's dA is a partial sum over its output rows), a
row-parallel base shards A along the input (B stays whole in tp_copy: each rank's dB sees a partial h = x Aᵀ),
and the reduce after the op is the plain linear's. tp_copy / tp_reduce are graphllm ops whose autograd rules
are the conjugate collectives, so the backward graph gets its all-reduces from autograd. Sizes that spell head counts (`view(q, [B, S, H, D])`)
are rewritten by shape re-propagation (passes/shapes.py). The pass is legal because each rewrite
computes the same sums as the unsplit op, split over ranks: results change only by reduction order.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from graphllm.errors import GraphllmError
from graphllm.ops.lora import lora_linear
from graphllm.planning.sharding import shard_param
from graphllm.passes.graph_edit import emit, get_attr_value, set_parameter
from graphllm.passes.manager import PassContext, graph_pass
from graphllm.passes.matching import is_call
from graphllm.passes.shapes import old_shapes, repropagate
from graphllm.passes.tp_plan import resolve_plan, style_of
from graphllm.passes.vocab_parallel import (vocab_parallel_cross_entropy, vocab_parallel_embedding,
                                            vocab_parallel_linear_cross_entropy)

aten = torch.ops.aten
gl = torch.ops.graphllm
_LINEARS = (aten.linear.default, lora_linear._opoverload)  # ops a linear plan style rewrites
_FUSED_LOSS = gl.linear_cross_entropy.default  # the LM head and its loss as one op (fuse_linear_cross_entropy)
_LORA_A, _LORA_B, _LORA_MASK = 3, 4, 7  # lora_linear's argument positions of A [r, in], B [out, r], dropout mask
_ROPE_SEARCH = 64  # nodes searched past MLA's rope key for its expand to the heads (the rotation is ~12)
_TRANSPARENT = (aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten._to_copy.default,
                aten.to.dtype, aten._unsafe_view.default)


class _Rewriter:
    def __init__(self, gm: fx.GraphModule, ctx: PassContext, tp: int, rank: int):
        self.gm, self.ctx, self.tp, self.rank = gm, ctx, tp, rank
        self.copies: dict[fx.Node, fx.Node] = {}
        self.sharded: dict[int, torch.nn.Parameter] = {}  # id(full param) -> shard (tied weights stay tied)

    def shard(self, node: fx.Node, dim: int) -> None:
        full = get_attr_value(self.gm, node.target)
        if id(full) not in self.sharded:
            self.sharded[id(full)] = shard_param(full, dim, self.rank, self.tp)
        set_parameter(self.gm, node.target, self.sharded[id(full)])
        self.ctx.count("sharded parameters")

    def copy_in(self, x: fx.Node, like: fx.Node, role: str) -> fx.Node:
        """One tp_copy per activation, shared by every column-parallel linear reading it."""
        if x not in self.copies:
            with self.gm.graph.inserting_after(x):
                self.copies[x] = emit(self.gm, gl.tp_copy.default, (x, "tp"), like, role)
            self.ctx.count("copy (backward all-reduce)")
        return self.copies[x]

    def adapter(self, lin: fx.Node, index: int, shard_dim: int | None) -> None:
        """A LoRA factor of `lin` (args[index]): this rank's shard along `shard_dim`, or (None) kept whole and
        read through tp_copy, whose backward all-reduces its gradient (partial on each rank)."""
        if not is_call(lin, lora_linear._opoverload):
            return
        node = lin.args[index]
        if shard_dim is not None:
            self.shard(node, shard_dim)
            return
        with self.gm.graph.inserting_before(lin):
            copy = emit(self.gm, gl.tp_copy.default, (node, "tp"), lin, "weight")
        lin.args = tuple(copy if i == index else a for i, a in enumerate(lin.args))
        self.ctx.count("whole LoRA factors (gradient all-reduce)")

    def copy_input(self, lin: fx.Node, role: str) -> None:
        """`lin`'s input through tp_copy; a LoRA dropout mask drawn from that input follows it (under sequence
        parallelism the copy becomes the all-gather, and the mask must have the gathered shape)."""
        x = lin.args[0]
        lin.args = (self.copy_in(x, lin, role), *lin.args[1:])
        mask = lin.args[_LORA_MASK] if is_call(lin, lora_linear._opoverload) and len(lin.args) > _LORA_MASK else None
        if is_call(mask, aten.ge.Scalar) and is_call(mask.args[0], aten.rand_like.default):
            mask.args[0].replace_input_with(x, lin.args[0])

    def users(self, node: fx.Node, *targets) -> list[fx.Node]:
        found = list(node.users)
        for u in found:
            if not is_call(u, *targets):
                raise GraphllmError(f"tensor_parallel: parameter {node.target} is used by {u.target}, which its "
                                    f"plan style does not handle; leave it out of the plan (tensor_parallel plan=...)")
        return found

    # -- styles ---------------------------------------------------------------------------------------
    def colwise(self, node: fx.Node, kind: str) -> None:
        """Rows split over tp; each linear reading the weight gets its input through tp_copy. A view of the weight
        by head (multi-latent attention's decode absorbs kv_b_proj, [H, dn + dv, r]) needs nothing more: shape
        re-propagation gives it this rank's heads. (Only the decode graph reads it so, without a backward: a
        training graph would also need the gradient of what the heads share, the latent, summed over tp.)"""
        self.shard(node, 0)
        if kind == "bias":
            return
        for lin in self.users(node, *_LINEARS, aten.view.default):
            if is_call(lin, aten.view.default):
                continue
            self.copy_input(lin, "col_in")
            self.adapter(lin, _LORA_B, 0)
            self.adapter(lin, _LORA_A, None)

    def colwise_kv(self, node: fx.Node, kind: str) -> None:
        cfg = self.ctx.config
        kv = cfg.num_key_value_heads
        if kv % self.tp == 0:
            return self.colwise(node, kind)
        # fewer kv heads than ranks: keep the whole projection, take this rank's kv head from it;
        # tp_copy all-reduces the weight's gradient over the ranks that share each head
        head = self.rank // (self.tp // kv)
        hd = cfg.head_dim
        for user in list(node.users):
            with self.gm.graph.inserting_before(user):
                shared = emit(self.gm, gl.tp_copy.default, (node, "tp"), user, "weight")
                mine = emit(self.gm, aten.slice.Tensor, (shared, 0, head * hd, (head + 1) * hd), user)
            user.replace_input_with(node, mine)
            if kind == "weight":
                self.copy_input(user, "col_in")
                if is_call(user, lora_linear._opoverload):  # B's rows of this head, as W's; A whole
                    self.kv_rows(user, _LORA_B, head * hd, (head + 1) * hd)
                    self.adapter(user, _LORA_A, None)
        self.ctx.count("replicated kv projections")

    def kv_rows(self, lin: fx.Node, index: int, start: int, end: int) -> None:
        """A whole projection factor (kv heads fewer than ranks): tp_copy, then this rank's head's rows."""
        node = lin.args[index]
        with self.gm.graph.inserting_before(lin):
            shared = emit(self.gm, gl.tp_copy.default, (node, "tp"), lin, "weight")
            mine = emit(self.gm, aten.slice.Tensor, (shared, 0, start, end), lin)
        lin.args = tuple(mine if i == index else a for i, a in enumerate(lin.args))

    def latent_kv(self, node: fx.Node, kind: str) -> None:
        """MLA's kv down-projection stays whole: its latent c reaches the column-parallel kv_b_proj (whose input
        copy all-reduces c's gradient), and the rope key split off beside c is shared by every head, so each rank's
        gradient of it sums its own heads only: it is read through a tp_copy of its own."""
        if kind == "bias":
            return
        for lin in self.users(node, *_LINEARS):
            ropes = [g for split in lin.users if is_call(split, aten.split_with_sizes.default)
                     for g in split.users if g.target is operator.getitem and g.args[1] == 1]
            if len(ropes) != 1:
                raise GraphllmError(f"tensor_parallel: {node.target}'s output is not split into (latent, rope key) "
                                    "as multi-latent attention splits it; leave it out of the plan")
            rope = ropes[0]
            copy = self.copy_in(rope, rope, "col_in")
            rope.replace_all_uses_with(copy, delete_user_cb=lambda u: u is not copy)
            self.rope_heads(copy)
            self.ctx.count("shared rope keys (backward all-reduce)")

    def rope_heads(self, rope: fx.Node) -> None:
        """The rope key [B, 1, S, dr] is expanded to every head before it joins k_nope: the expand's literal head
        count (its input keeps its size, so shape re-propagation leaves it) becomes this rank's heads."""
        heads = self.ctx.config.num_attention_heads
        frontier, seen, expands = [rope], set(), []
        while frontier and len(seen) < _ROPE_SEARCH:  # through the rotation's slices, cats and products
            node = frontier.pop()
            for user in node.users:
                if user in seen:
                    continue
                seen.add(user)
                if is_call(user, aten.expand.default) and len(user.args[1]) == 4 and user.args[1][1] == heads:
                    expands.append(user)
                elif not is_call(user, *_LINEARS):
                    frontier.append(user)
        for e in expands:  # none in the decode graph: its rope key broadcasts over the heads
            size = list(e.args[1])
            size[1] = heads // self.tp
            e.args = (e.args[0], size, *e.args[2:])

    def rowwise(self, node: fx.Node, kind: str) -> None:
        if kind == "bias":
            return  # added after the reduction by the weight's rewrite; stays whole
        self.shard(node, 1)
        for lin in self.users(node, *_LINEARS):
            bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
            rest = (None, *lin.args[3:]) if is_call(lin, lora_linear._opoverload) else ()  # LoRA: A, B, scale, ...
            lin.args, lin.kwargs = (lin.args[0], lin.args[1], *rest), {}
            self.adapter(lin, _LORA_A, 1)
            self.adapter(lin, _LORA_B, None)
            with self.gm.graph.inserting_after(lin):
                red = emit(self.gm, gl.tp_reduce.default, (lin, "tp"), lin, "row_out")
            lin.replace_all_uses_with(red, delete_user_cb=lambda u: u is not red)
            if bias is not None:
                with self.gm.graph.inserting_after(red):
                    out = emit(self.gm, aten.add.Tensor, (red, bias), lin)
                red.replace_all_uses_with(out, delete_user_cb=lambda u: u is not out)
            self.ctx.count("reduce (forward all-reduce)")

    def vocab_embedding(self, node: fx.Node, kind: str) -> None:
        full = get_attr_value(self.gm, node.target)
        rows = full.shape[0] // self.tp
        self.shard(node, 0)
        for emb in self.users(node, aten.embedding.default):
            partial = vocab_parallel_embedding(self.gm, emb, self.rank * rows, rows)
            with self.gm.graph.inserting_before(emb):
                red = emit(self.gm, gl.tp_reduce.default, (partial, "tp"), emb, "embed_out")
            emb.replace_all_uses_with(red)
            self.gm.graph.erase_node(emb)

    def vocab_head(self, node: fx.Node, kind: str) -> None:
        full = get_attr_value(self.gm, node.target)
        cols = full.shape[0] // self.tp
        self.shard(node, 0)
        if kind == "bias":
            return
        for lin in self.users(node, *_LINEARS, _FUSED_LOSS):
            self.copy_input(lin, "head_in")
            if is_call(lin, _FUSED_LOSS):
                self.fused_loss(lin, cols, full.shape[0])
                continue
            self.adapter(lin, _LORA_B, 0)
            self.adapter(lin, _LORA_A, None)
            losses, others = _loss_consumers(lin)
            for ce in losses:
                out = vocab_parallel_cross_entropy(self.gm, ce, self.rank * cols, cols)
                ce.replace_all_uses_with(out)
                self.gm.graph.erase_node(ce)
                self.ctx.count("vocab-parallel cross-entropy")
            if others:  # logits leave the graph (or feed other ops): gather the vocabulary back
                with self.gm.graph.inserting_after(lin):
                    dim = lin.meta["val"].dim() - 1
                    full_logits = emit(self.gm, gl.tp_gather.default, (lin, dim, self.tp, "tp"), lin, "head_out")
                for user in others:
                    user.replace_input_with(lin, full_logits)

    def fused_loss(self, fused: fx.Node, cols: int, vocab: int) -> None:
        """The fused LM-head loss over this rank's `cols` rows: its parts here, combined across ranks."""
        outs = vocab_parallel_linear_cross_entropy(self.gm, fused, self.rank * cols, cols, vocab)
        for user in list(fused.users):  # getitem(fused, 0 | 1)
            user.replace_all_uses_with(outs[user.args[1]])
            self.gm.graph.erase_node(user)
        self.gm.graph.erase_node(fused)
        self.ctx.count("vocab-parallel cross-entropy")


def _loss_consumers(logits: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """Cross-entropy calls reached from `logits` through reshapes/casts, and logits' other users."""
    losses, others = [], []
    for user in logits.users:
        chain, node = [user], user
        while is_call(node, *_TRANSPARENT) and len(node.users) == 1:
            node = next(iter(node.users))
            chain.append(node)
        if is_call(node, aten.cross_entropy_loss.default):
            losses.append(node)
        else:
            others.append(user)
    return losses, others


@graph_pass("tensor_parallel")
def tensor_parallel(gm: fx.GraphModule, ctx: PassContext, *, plan: str | dict[str, str] | None = None) -> fx.GraphModule:
    """`plan`: "graphllm" (default, passes/tp_plan.GRAPHLLM_PLAN), "hf" (transformers' base_model_tp_plan for
    the model type, with vocab-parallel embedding/head), or a {module pattern: style} mapping."""
    layout = ctx.layout
    if layout.tp == 1:
        return gm
    if ctx.config is None:
        raise GraphllmError("tensor_parallel needs the model's config (head counts); compile a graphllm model")
    styles = resolve_plan(plan, ctx.config.model_type)
    shapes = old_shapes(gm)
    rw = _Rewriter(gm, ctx, layout.tp, layout.coords(ctx.rank).tp)
    for node in [n for n in gm.graph.nodes if n.op == "get_attr"]:
        if not isinstance(get_attr_value(gm, node.target), torch.nn.Parameter):
            continue
        found = style_of(node.target, styles)
        if found is not None:
            getattr(rw, found[0])(node, found[1])
    gm.graph.eliminate_dead_code()
    repropagate(gm, shapes)
    gm.recompile()
    return gm
