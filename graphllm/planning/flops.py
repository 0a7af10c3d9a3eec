"""FLOPs of a model graph, counted from node shapes (matmul-class ops only, as MFU figures do)."""

from __future__ import annotations

import math

import torch
import torch.fx as fx

aten = torch.ops.aten


def _shape(n) -> tuple[int, ...] | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


FLOP_ROWS = "flop_rows"
"""Node meta a pass may set on a grouped matmul: the rows that count as this rank's work (passes/expert_parallel.py:
its x holds the expert-parallel group's pairs, or padded all-to-all slots; a rank computes its own tokens' T·k on
average)."""


def _attention_flops(q, k, v, causal: bool) -> int:
    # q kᵀ and p v: B·H·Sq·Sk·D_qk and B·H·Sq·Sk·D_v multiply-adds (D_v < D_qk under MLA, DeepSeek-V3); the
    # causal half is still computed by dense kernels, so it is counted in full (the usual MFU convention).
    b, h, sq, d = q
    sk = k[2]
    return 2 * b * h * sq * sk * (d + v[-1])


def _fused_loss_targets() -> tuple:
    """The fused LM-head loss ops and their lowerings: pipeline_split weighs the lowered graph, where the head's
    matmul is inside the op (a plain linear before the fusion, counted as one)."""
    from graphllm.ops.linear_cross_entropy import (linear_cross_entropy_decomposed,
                                                   linear_cross_entropy_parts_decomposed)

    gl = torch.ops.graphllm
    return (gl.linear_cross_entropy.default, gl.linear_cross_entropy_parts.default, linear_cross_entropy_decomposed,
            linear_cross_entropy_parts_decomposed)


_FUSED_LOSS = _fused_loss_targets()


def node_flops(n: fx.Node) -> int:
    """Multiply-add FLOPs (2 per MAC) of one node's forward; 0 for anything not matmul-class."""
    if n.op != "call_function":
        return 0
    t = n.target
    gl = torch.ops.graphllm
    if t in (aten.linear.default,):
        x, w = _shape(n.args[0]), _shape(n.args[1])
        if x and w:
            return 2 * math.prod(x[:-1]) * w[0] * w[1]
    elif t in (gl.matmul_all_reduce.default, gl.all_gather_matmul.default, gl.matmul_reduce_scatter.default):  # x [B, s, K] times w [N, K]; all_gather_matmul multiplies the gathered rows
        x, w = _shape(n.args[0]), _shape(n.args[1])
        if x and w:
            rows = math.prod(x[:-1]) * (n.args[3] if t is gl.all_gather_matmul.default else 1)
            return 2 * rows * w[0] * w[1]
    elif t in _FUSED_LOSS:
        # the LM head's matmul, hidden [*, H] × W [V, H] (this rank's rows under TP). train_step_flops' ×3 counts
        # its two backward matmuls; the backward's recomputation of the logits is not counted, as activation
        # recomputation is not (MFU counts the model's FLOPs, not the schedule's)
        x, w = _shape(n.args[0]), _shape(n.args[1])
        if x and w:
            return 2 * math.prod(x[:-1]) * w[0] * w[1]
    elif t is gl.grouped_matmul.default:
        # every row of x meets one [K, N] weight: x is moe_permute's [T·k, K] (one row per token-expert pair), so
        # this is T·k rows, not T. Under expert parallelism x holds the group's pairs or padded slots, most of them
        # tail rows left uncomputed: the pass records the rank's own T·k pairs as its work (FLOP_ROWS)
        x, w = _shape(n.args[0]), _shape(n.args[1])
        if x and w:
            return 2 * n.meta.get(FLOP_ROWS, x[0]) * w[1] * w[2]
    elif t in (aten.matmul.default, aten.mm.default, aten.bmm.default):
        a, out = _shape(n.args[0]), _shape(n)
        if a and out:
            return 2 * math.prod(out) * a[-1]
    elif t in (aten.scaled_dot_product_attention.default, torch.ops.graphllm.attention.default,
               torch.ops.graphllm.varlen_attention.default,  # packed rows: dense kernels, counted in full
               torch.ops.graphllm.window_attention.default):  # a window: likewise (SDPA with a mask here)
        q, k, v = (_shape(a) for a in n.args[:3])
        if q and k and v:
            return _attention_flops(q, k, v, True)
    elif t is gl.attention_block.default:  # one block of ring attention (context parallelism)
        q, k, v = (_shape(a) for a in n.args[:3])
        if q and k and v:
            return _attention_flops(q, k, v, n.args[6])
    return 0


def forward_flops(gm: fx.GraphModule) -> int:
    """Multiply-add FLOPs (2 per MAC) of one forward pass of a model-stage graph."""
    return sum(node_flops(n) for n in gm.graph.nodes)


def train_step_flops(gm: fx.GraphModule) -> int:
    """Forward + backward: the backward of a matmul costs two matmuls of the same size."""
    return 3 * forward_flops(gm)
