"""FLOPs of a model graph, counted from node shapes (matmul-class ops only, as MFU figures do)."""

from __future__ import annotations

import math

import torch
import torch.fx as fx

aten = torch.ops.aten


def _shape(n) -> tuple[int, ...] | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _attention_flops(q, k, v, causal: bool) -> int:
    # q kᵀ and p v: 2 matmuls of B·H·Sq·Sk·D multiply-adds each; the causal half is still computed
    # by dense kernels, so it is counted in full (the usual MFU convention).
    b, h, sq, d = q
    sk = k[2]
    return 2 * 2 * b * h * sq * sk * d


def forward_flops(gm: fx.GraphModule) -> int:
    """Multiply-add FLOPs (2 per MAC) of one forward pass of a model-stage graph."""
    total = 0
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        t = n.target
        out = _shape(n)
        if t in (aten.linear.default,):
            x, w = _shape(n.args[0]), _shape(n.args[1])
            if x and w:
                total += 2 * math.prod(x[:-1]) * w[0] * w[1]
        elif t in (aten.matmul.default, aten.mm.default, aten.bmm.default):
            a = _shape(n.args[0])
            if a and out:
                total += 2 * math.prod(out) * a[-1]
        elif t in (aten.scaled_dot_product_attention.default, torch.ops.graphllm.attention.default):
            q, k, v = (_shape(a) for a in n.args[:3])
            if q and k and v:
                total += _attention_flops(q, k, v, True)
    return total


def train_step_flops(gm: fx.GraphModule) -> int:
    """Forward + backward: the backward of a matmul costs two matmuls of the same size."""
    return 3 * forward_flops(gm)
