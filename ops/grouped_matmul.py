"""graphllm::grouped_matmul — one matmul per group of rows: the expert layer of a mixture of experts.

    y[rows of group g] = x[rows of group g] @ weight[g]        x [T, K], weight [G, K, N] -> y [T, N]
    with transpose_weight:  x[rows of group g] @ weight[g]ᵀ     weight [G, N, K] (transformers' expert layout)

Rows are sorted by group (token permutation puts each expert's tokens together); `group_sizes` [G]
int64 counts them (a group may be empty). Rows past the last group (sum < T: the pairs another
expert-parallel rank computes, or that a capacity limit dropped; ops/moe_dispatch.py) come out zero. The sizes are data, so no shape depends on them and
the op stays one static graph node: its kernels loop over the groups (here; torch_npu's
npu_grouped_matmul on the NPU, ops/lowering_npu.py).

Backward: dx = grouped_matmul(dy, weight, group_sizes, not transpose_weight) (the same op, on the same saved
weight); dweight[g] = x_gᵀ dy_g (dy_gᵀ x_g for a transposed weight), a second op `grouped_matmul_weight_grad` so a
backend can map it to its own kernel.

The layout is a flag, not a transposed view, so no graph holds a transposed copy of an expert weight: the
forward casts the stored [G, N, K] parameter once (bf16 under autocast), the backward reads that same tensor, and
the BLAS call takes the transpose as a stride. (Before the flag, the backward's `weightᵀ.contiguous()` made
inductor save a transposed and a twice-transposed bf16 copy of every expert weight; on GCC 12.2 at -O3 the
fused C++ kernel that made the second copy came out wrong — NaN gradients in bf16 MoE training, docs/moe.md.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from graphllm.ops.autocast import register_autocast_policy


def _row_ranges(group_sizes: Tensor) -> list[tuple[int, int, int]]:
    """(group, first row, end row) of each non-empty group; rows are sorted by group."""
    out, start = [], 0
    for g, n in enumerate(group_sizes.tolist()):
        if n:
            out.append((g, start, start + n))
        start += n
    return out


def check_group_sizes(x: Tensor, weight: Tensor, group_sizes: Tensor, transpose_weight: bool = False) -> None:
    k_dim, layout = (2, "[G, N, K]") if transpose_weight else (1, "[G, K, N]")
    torch._check(x.dim() == 2 and weight.dim() == 3 and x.shape[1] == weight.shape[k_dim],
                 lambda: f"grouped_matmul: x [T, K] and weight {layout}, got {tuple(x.shape)}, {tuple(weight.shape)}")
    torch._check(group_sizes.dim() == 1 and group_sizes.shape[0] == weight.shape[0],
                 lambda: f"grouped_matmul: group_sizes must be [G={weight.shape[0]}], got {tuple(group_sizes.shape)}")


def out_features(weight: Tensor, transpose_weight: bool) -> int:
    return weight.shape[1] if transpose_weight else weight.shape[2]


ROW_BUCKET = 32
"""oneDNN, which runs CPU matmuls in bf16 and fp16, builds and JIT-compiles a kernel for every new shape it meets
(about 1 ms on one Sapphire Rapids core: ten times an expert's GEMM here) and caches it. A group's row count
changes every step, so in those dtypes each group's matmul runs on a whole number of ROW_BUCKET rows and the
shapes repeat (benchmarks/README.md, moe_step). fp32 goes to a BLAS with no per-shape cost and is left alone."""


def _row_bucket(x: Tensor) -> int:
    return ROW_BUCKET if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) else 1


@torch.library.custom_op("graphllm::grouped_matmul", mutates_args=())
def grouped_matmul(x: Tensor, weight: Tensor, group_sizes: Tensor, transpose_weight: bool = False) -> Tensor:
    check_group_sizes(x, weight, group_sizes, transpose_weight)
    if int(group_sizes.sum()) > x.shape[0]:
        raise ValueError(f"grouped_matmul: group_sizes sum to {int(group_sizes.sum())}, x has {x.shape[0]} rows")
    ranges, bucket, rows = _row_ranges(group_sizes), _row_bucket(x), x.shape[0]
    out = x.new_empty((rows, out_features(weight, transpose_weight)))
    for g, a, b in ranges:  # in row order: a group's rounded-up rows spill only into the next group's, which follow
        w = weight[g].t() if transpose_weight else weight[g]
        end = a + -(-(b - a) // bucket) * bucket
        if end > rows:  # the last group, near the end of x: a whole number of buckets, then the remainder
            end = a + (b - a) // bucket * bucket
            torch.matmul(x[end:b], w, out=out[end:b])
        if end > a:
            torch.matmul(x[a:end], w, out=out[a:end])
    # every row is written once by its group's matmul, or zeroed here in the tail (no full-size memset first)
    out[ranges[-1][2] if ranges else 0:].zero_()
    return out


@grouped_matmul.register_fake
def _(x, weight, group_sizes, transpose_weight=False):
    check_group_sizes(x, weight, group_sizes, transpose_weight)
    return x.new_empty((x.shape[0], out_features(weight, transpose_weight)))


@torch.library.custom_op("graphllm::grouped_matmul_weight_grad", mutates_args=())
def grouped_matmul_weight_grad(x: Tensor, grad: Tensor, group_sizes: Tensor) -> Tensor:
    """[G, K, N]: for each group g, x_gᵀ @ grad_g (zeros for an empty group)."""
    ranges = _row_ranges(group_sizes)
    out = x.new_empty((group_sizes.shape[0], x.shape[1], grad.shape[1]))
    filled = {g for g, _, _ in ranges}
    for g in range(out.shape[0]):
        if g not in filled:
            out[g].zero_()
    bucket = _row_bucket(x)
    for g, a, b in ranges:  # summed over the group's rows: a whole number of buckets, then the remainder added
        mid = a + (b - a) // bucket * bucket
        if mid > a:
            torch.matmul(x[a:mid].t(), grad[a:mid], out=out[g])
        else:
            out[g].zero_()
        if mid < b:
            out[g].addmm_(x[mid:b].t(), grad[mid:b])
    return out


@grouped_matmul_weight_grad.register_fake
def _(x, grad, group_sizes):
    return x.new_empty((group_sizes.shape[0], x.shape[1], grad.shape[1]))


def _setup(ctx, inputs, output):
    x, weight, group_sizes, transpose_weight = inputs
    ctx.save_for_backward(x, weight, group_sizes)
    ctx.transpose_weight = transpose_weight


def _backward(ctx, grad):
    x, weight, group_sizes = ctx.saved_tensors
    ops = torch.ops.graphllm
    dx = ops.grouped_matmul(grad, weight, group_sizes, not ctx.transpose_weight)
    if ctx.transpose_weight:  # dweight[g] [N, K] = dy_gᵀ x_g, laid out like the parameter
        return dx, ops.grouped_matmul_weight_grad(grad, x, group_sizes), None, None
    return dx, ops.grouped_matmul_weight_grad(x, grad, group_sizes), None, None


grouped_matmul.register_autograd(_backward, setup_context=_setup)
register_autocast_policy("graphllm::grouped_matmul", torch.bfloat16)
register_autocast_policy("graphllm::grouped_matmul_weight_grad", torch.bfloat16)
