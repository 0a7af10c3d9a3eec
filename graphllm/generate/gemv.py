"""decode_gemv: each linear of a decode graph (a few rows) → a float32 broadcast product summed over the
input features, and likewise decode attention's batched matmuls over the cache (q·kᵀ, p·v: a few query
rows per kv head), which inductor compiles into one streaming reduction kernel each. The small operand
is made a float32 buffer of its own (`prims.inductor_force_stride_order`), so inductor does not inline
its producers into the loop.

Why: at batch 1 a decode step reads every weight once and does two flops per weight: each linear is a
matrix-vector product bound by memory bandwidth, not arithmetic. Through BLAS (`aten.mm` → MKL sgemv,
oneDNN's bf16 gemm) this CPU reads the weights at about 40% of its copy bandwidth, and bf16 `bmm` of
decode attention's tiny shapes takes ~100 µs a call (fp32: ~10 µs); inductor's vectorised reductions
stream each weight row once, converting bf16 to float32 in registers (benchmarks/generate.py --blas).

Legal: the same products and sums, accumulated in float32 as BLAS accumulates fp32 and bf16 GEMMs, the
result (plus bias) rounded to the op's dtype once; only the order of the float32 sum differs (fp32
reduction order, the tolerance policy's 1e-5). The product is never materialised by inductor, but would
be op by op: the generator adds this pass for the inductor backend only.

Refuses (leaves it to BLAS): more than `max_rows` rows (a GEMM, which BLAS runs at its compute peak),
weights that are not 2-D, matmuls that are not batched alike on both sides.
"""

from __future__ import annotations

import math

import torch
import torch._inductor.inductor_prims  # noqa: F401 (registers prims.inductor_force_stride_order)
import torch.fx as fx
from torch._guards import detect_fake_mode

from graphllm.passes.graph_edit import emit
from graphllm.passes.manager import PassContext, graph_pass
from graphllm.passes.matching import arg, calls_to

aten = torch.ops.aten


def _call(gm: fx.GraphModule, like: fx.Node, target, *args, **kwargs) -> fx.Node:
    """One new node like `like`, with its `meta["val"]` computed under the capture's fake mode."""
    node = emit(gm, target, args, like, kwargs=kwargs)
    vals = [a.meta["val"] if isinstance(a, fx.Node) else a for a in args]
    with detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)]):
        node.meta["val"] = target(*vals, **kwargs)
    return node


def _float32(gm: fx.GraphModule, like: fx.Node, x: fx.Node) -> fx.Node:
    if x.meta["val"].dtype == torch.float32:
        return x
    return _call(gm, like, aten._to_copy.default, x, dtype=torch.float32)


def _realized_float32(gm: fx.GraphModule, like: fx.Node, x: fx.Node) -> fx.Node:
    """x in float32, as a contiguous buffer of its own: inlined into the reduction, inductor would recompute
    x's producers (a norm, bf16 roundings) once per weight row, which made the bf16 LM head 3x slower than BLAS."""
    xf = _float32(gm, like, x)
    v = xf.meta["val"]
    strides = [math.prod(v.shape[i + 1:]) for i in range(v.dim())]
    return _call(gm, like, torch.ops.prims.inductor_force_stride_order.default, xf, strides)


def _as_reduction(gm: fx.GraphModule, n: fx.Node, a: fx.Node, b: fx.Node, dim: int, bias: fx.Node | None) -> None:
    """Replace `n` by sum(a * b, dim) in float32 (+ bias), rounded to n's dtype."""
    with gm.graph.inserting_before(n):
        y = _call(gm, n, aten.mul.Tensor, a, _float32(gm, n, b))  # never materialised by inductor
        y = _call(gm, n, aten.sum.dim_IntList, y, [dim])  # float32 accumulation
        if bias is not None:
            y = _call(gm, n, aten.add.Tensor, y, _float32(gm, n, bias))
        if n.meta["val"].dtype != torch.float32:
            y = _call(gm, n, aten._to_copy.default, y, dtype=n.meta["val"].dtype)
    n.replace_all_uses_with(y)
    gm.graph.erase_node(n)


@graph_pass("decode_gemv", changes_numerics=True)
def decode_gemv(gm: fx.GraphModule, ctx: PassContext, *, max_rows: int = 8) -> fx.GraphModule:
    replaced = 0
    for n in calls_to(gm, aten.linear.default):  # x [..., K] @ W[N, K]^T
        x, w = n.args[0], n.args[1]
        if w.meta["val"].dim() != 2 or math.prod(x.meta["val"].shape[:-1]) > max_rows:
            continue  # a GEMM (or something that is not a plain linear): BLAS
        with gm.graph.inserting_before(n):
            xu = _call(gm, n, aten.unsqueeze.default, _realized_float32(gm, n, x), -2)  # [..., 1, K]
        _as_reduction(gm, n, xu, w, -1, arg(n, 2, "bias"))  # [..., N, K] summed over K
        replaced += 1
    for n in calls_to(gm, aten.matmul.default):  # batched a [..., m, k] @ b [..., k, n]: decode attention
        a, b = n.args
        av, bv = a.meta["val"], b.meta["val"]
        if av.dim() < 3 or av.dim() != bv.dim() or av.shape[-2] > max_rows:
            continue
        with gm.graph.inserting_before(n):
            au = _call(gm, n, aten.unsqueeze.default, _realized_float32(gm, n, a), -1)  # [..., m, k, 1]
            bu = _call(gm, n, aten.unsqueeze.default, b, -3)  # [..., 1, k, n]
        _as_reduction(gm, n, au, bu, -2, None)  # [..., m, k, n] summed over k
        replaced += 1
    ctx.count("replaced", replaced)
    gm.graph.lint()
    gm.recompile()
    return gm
