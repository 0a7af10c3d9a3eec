"""graphllm's MC2 ops: a tensor-parallel matmul and its collective as one op (MindSpeed's MC2).

| op                                              | forward                                   |
|-------------------------------------------------|-------------------------------------------|
| matmul_all_reduce(x, w, bias, group, chunks)     | all_reduce(x @ wᵀ) + bias                 |
| all_gather_matmul(x, w, bias, size, group, chunks) | (gather(x) @ wᵀ + bias, gather(x))      |
| matmul_reduce_scatter(x, w, bias, size, group, chunks) | reduce_scatter(x @ wᵀ) + bias       |

`x` is [B, S, K] with the sequence on dim 1 (the dimension sequence parallelism gathers and scatters);
`w` is an nn.Linear weight [N, K]; `bias` [N] is added once, after the collective (torch_npu's fused
kernels take no bias for the scatter/gather forms). all_gather_matmul also returns the gathered input,
as `npu_all_gather_base_mm(gather_output=True)` does, so other linears reading the same gathered
activation (k and v beside q; up beside gate) use it without a second all-gather.

Backward rules are graphllm's, written with the conjugate MC2 op so a backend that fuses the forward
fuses the backward too: the input gradient of matmul_reduce_scatter is all_gather_matmul(g, wᵀ), that of
all_gather_matmul is a reduce-scatter of g @ w (matmul_reduce_scatter when nothing else read the gathered
input), and that of matmul_all_reduce is g @ w (an all-reduce's backward is the identity).

Three implementations: the reference kernel (the eager backend: one whole collective), the chunked
decomposition (every other non-NPU backend: `chunks` pieces along the sequence, each with its own
graphllm collective, which is CoC; see passes/coc.py), and torch_npu's fused kernels
(ops/lowering_npu_mc2.py).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from graphllm.ops.autocast import register_autocast_policy
from graphllm.ops.collectives import (all_gather_decomposed, all_reduce_decomposed, group_name_of,
                                      reduce_scatter_decomposed)

gl = torch.ops.graphllm
SEQ_DIM = 1


def add_bias(y: Tensor, bias: Optional[Tensor]) -> Tensor:
    """y + bias, once, after the collective (the MC2 ops' bias convention)."""
    return y if bias is None else y + bias.to(y.dtype)


# -- reference kernels (eager backend) ------------------------------------------------------------
@torch.library.custom_op("graphllm::matmul_all_reduce", mutates_args=())
def matmul_all_reduce(x: Tensor, weight: Tensor, bias: Optional[Tensor], group: str, chunks: int) -> Tensor:
    return add_bias(all_reduce_decomposed(F.linear(x, weight), "sum", group_name_of(group)), bias)


@torch.library.custom_op("graphllm::all_gather_matmul", mutates_args=())
def all_gather_matmul(x: Tensor, weight: Tensor, bias: Optional[Tensor], size: int, group: str,
                      chunks: int) -> tuple[Tensor, Tensor]:
    gathered = all_gather_decomposed(x, SEQ_DIM, size, group_name_of(group))
    return F.linear(gathered, weight, bias), gathered


@torch.library.custom_op("graphllm::matmul_reduce_scatter", mutates_args=())
def matmul_reduce_scatter(x: Tensor, weight: Tensor, bias: Optional[Tensor], size: int, group: str,
                          chunks: int) -> Tensor:
    return add_bias(reduce_scatter_decomposed(F.linear(x, weight), SEQ_DIM, size, group_name_of(group)), bias)


def _out_shape(x: Tensor, weight: Tensor, seq: int) -> list[int]:
    return [x.shape[0], seq, weight.shape[0]]


@matmul_all_reduce.register_fake
def _(x, weight, bias, group, chunks):
    return x.new_empty(_out_shape(x, weight, x.shape[1]))


@all_gather_matmul.register_fake
def _(x, weight, bias, size, group, chunks):
    return x.new_empty(_out_shape(x, weight, x.shape[1] * size)), x.new_empty((x.shape[0], x.shape[1] * size, x.shape[2]))


@matmul_reduce_scatter.register_fake
def _(x, weight, bias, size, group, chunks):
    torch._check(x.shape[1] % size == 0, lambda: f"sequence {x.shape[1]} must divide by the group size {size}")
    return x.new_empty(_out_shape(x, weight, x.shape[1] // size))


# -- backward rules --------------------------------------------------------------------------------
def _weight_grads(g: Tensor, x: Tensor, has_bias: bool) -> tuple[Tensor, Tensor | None]:
    """∂/∂w and ∂/∂bias of y = x @ wᵀ + bias for output gradient g (both [B, S, ·])."""
    g2, x2 = g.flatten(0, -2), x.flatten(0, -2)
    return g2.t().matmul(x2), (g2.sum(0) if has_bias else None)


def _setup(ctx, inputs, output):
    x, weight, bias, *rest = inputs
    ctx.group, ctx.chunks = rest[-2:]
    ctx.size = rest[0] if len(rest) == 3 else None  # matmul_all_reduce has no size argument
    ctx.has_bias = bias is not None
    saved_input = output[1] if isinstance(output, tuple) else x  # all_gather_matmul: the gathered input
    ctx.save_for_backward(saved_input, weight)
    ctx.set_materialize_grads(False)  # an unread gathered output gets no gradient (None), not zeros


def _matmul_all_reduce_backward(ctx, g):
    x, weight = ctx.saved_tensors
    return (g.matmul(weight), *_weight_grads(g, x, ctx.has_bias), None, None)


def _all_gather_matmul_backward(ctx, g, g_gathered):
    gathered, weight = ctx.saved_tensors
    if g is None:  # only the gathered output was read
        return gl.sp_reduce_scatter(g_gathered, SEQ_DIM, ctx.size, ctx.group), None, None, None, None, None
    if g_gathered is None:
        gx = gl.matmul_reduce_scatter(g, weight.t(), None, ctx.size, ctx.group, ctx.chunks)
    else:
        gx = gl.sp_reduce_scatter(g.matmul(weight) + g_gathered, SEQ_DIM, ctx.size, ctx.group)
    return (gx, *_weight_grads(g, gathered, ctx.has_bias), None, None, None)


def _matmul_reduce_scatter_backward(ctx, g):
    x, weight = ctx.saved_tensors
    gx, g_full = gl.all_gather_matmul(g, weight.t(), None, ctx.size, ctx.group, ctx.chunks)
    gw, _ = _weight_grads(g_full, x, False)
    gb = g.flatten(0, -2).sum(0) if ctx.has_bias else None  # the bias was added after the scatter
    return gx, gw, gb, None, None, None


matmul_all_reduce.register_autograd(_matmul_all_reduce_backward, setup_context=_setup)
all_gather_matmul.register_autograd(_all_gather_matmul_backward, setup_context=_setup)
matmul_reduce_scatter.register_autograd(_matmul_reduce_scatter_backward, setup_context=_setup)
for _qualname in ("graphllm::matmul_all_reduce", "graphllm::all_gather_matmul", "graphllm::matmul_reduce_scatter"):
    register_autocast_policy(_qualname, torch.bfloat16)  # matmuls: bf16 under amp, as linear is


# -- chunked decompositions (CoC): what non-NPU backends run ----------------------------------------
def _pieces(seq: int, chunks: int) -> int:
    return chunks if chunks > 1 and seq % chunks == 0 else 1


def matmul_all_reduce_decomposed(x: Tensor, weight: Tensor, bias: Optional[Tensor], group: str,
                                 chunks: int) -> Tensor:
    """Sequence slices, each multiplied and all-reduced on its own, concatenated."""
    parts = x.chunk(_pieces(x.shape[1], chunks), SEQ_DIM)
    return add_bias(torch.cat([gl.tp_reduce(F.linear(p, weight), group) for p in parts], SEQ_DIM), bias)


def all_gather_matmul_decomposed(x: Tensor, weight: Tensor, bias: Optional[Tensor], size: int, group: str,
                                 chunks: int) -> tuple[Tensor, Tensor]:
    """Slice j of every rank is gathered ([B, size·c, K], rank-major) and multiplied; the pieces are
    interleaved back into the whole gather's order (rank r's rows, then r+1's)."""
    b, s, _ = x.shape
    n = _pieces(s, chunks)
    c = s // n
    gathered = [gl.sp_gather(p, SEQ_DIM, size, group) for p in x.chunk(n, SEQ_DIM)]

    def interleave(ts: list[Tensor]) -> Tensor:  # n × [B, size·c, D] -> [B, size·s, D]
        return torch.cat([t.view(b, size, 1, c, t.shape[-1]) for t in ts], 2).reshape(b, size * s, ts[0].shape[-1])

    return interleave([F.linear(p, weight, bias) for p in gathered]), interleave(gathered)


def matmul_reduce_scatter_decomposed(x: Tensor, weight: Tensor, bias: Optional[Tensor], size: int, group: str,
                                     chunks: int) -> Tensor:
    """Chunk j takes every rank's j-th slice of rows, is multiplied and reduce-scattered; this rank's
    n results concatenate to its [B, S/size, N]."""
    b, seq, k = x.shape
    n = _pieces(seq // size, chunks)
    c = seq // size // n
    x5 = x.reshape(b, size, n, c, k)
    outs = [gl.sp_reduce_scatter(F.linear(x5[:, :, j].reshape(b, size * c, k), weight), SEQ_DIM, size, group)
            for j in range(n)]
    return add_bias(torch.cat(outs, SEQ_DIM), bias)


MC2_OPS = {
    gl.matmul_all_reduce.default: "all_reduce",
    gl.all_gather_matmul.default: "all_gather",
    gl.matmul_reduce_scatter.default: "reduce_scatter",
}
"""Each MC2 op and the communication it performs in its forward direction."""
