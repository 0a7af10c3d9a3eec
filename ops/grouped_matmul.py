"""graphllm::grouped_matmul — one matmul per group of rows: the expert layer of a mixture of experts.

    y[rows of group g] = x[rows of group g] @ weight[g]        x [T, K], weight [G, K, N] -> y [T, N]

Rows are sorted by group (token permutation puts each expert's tokens together); `group_sizes` [G]
int64 counts them (a group may be empty). Rows past the last group (sum < T: the pairs another
expert-parallel rank computes, or that a capacity limit dropped; ops/moe_dispatch.py) come out zero. The sizes are data, so no shape depends on them and
the op stays one static graph node: its kernels loop over the groups (here; torch_npu's
npu_grouped_matmul on the NPU, ops/lowering_npu.py).

Backward: dx = grouped_matmul(dy, weightᵀ, group_sizes) (the same op); dweight[g] = x_gᵀ dy_g, a
second op `grouped_matmul_weight_grad` so a backend can map it to its own kernel.
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


def check_group_sizes(x: Tensor, weight: Tensor, group_sizes: Tensor) -> None:
    torch._check(x.dim() == 2 and weight.dim() == 3 and x.shape[1] == weight.shape[1],
                 lambda: f"grouped_matmul: x [T, K] and weight [G, K, N], got {tuple(x.shape)}, {tuple(weight.shape)}")
    torch._check(group_sizes.dim() == 1 and group_sizes.shape[0] == weight.shape[0],
                 lambda: f"grouped_matmul: group_sizes must be [G={weight.shape[0]}], got {tuple(group_sizes.shape)}")


@torch.library.custom_op("graphllm::grouped_matmul", mutates_args=())
def grouped_matmul(x: Tensor, weight: Tensor, group_sizes: Tensor) -> Tensor:
    check_group_sizes(x, weight, group_sizes)
    if int(group_sizes.sum()) > x.shape[0]:
        raise ValueError(f"grouped_matmul: group_sizes sum to {int(group_sizes.sum())}, x has {x.shape[0]} rows")
    # every row is written once: by its group's matmul, or zeroed in the tail (no full-size memset first)
    ranges = _row_ranges(group_sizes)
    out = x.new_empty((x.shape[0], weight.shape[2]))
    out[ranges[-1][2] if ranges else 0:].zero_()
    for g, a, b in ranges:
        torch.matmul(x[a:b], weight[g], out=out[a:b])
    return out


@grouped_matmul.register_fake
def _(x, weight, group_sizes):
    check_group_sizes(x, weight, group_sizes)
    return x.new_empty((x.shape[0], weight.shape[2]))


@torch.library.custom_op("graphllm::grouped_matmul_weight_grad", mutates_args=())
def grouped_matmul_weight_grad(x: Tensor, grad: Tensor, group_sizes: Tensor) -> Tensor:
    """[G, K, N]: for each group g, x_gᵀ @ grad_g (zeros for an empty group)."""
    ranges = _row_ranges(group_sizes)
    out = x.new_empty((group_sizes.shape[0], x.shape[1], grad.shape[1]))
    filled = {g for g, _, _ in ranges}
    for g in range(out.shape[0]):
        if g not in filled:
            out[g].zero_()
    for g, a, b in ranges:
        torch.matmul(x[a:b].t(), grad[a:b], out=out[g])
    return out


@grouped_matmul_weight_grad.register_fake
def _(x, grad, group_sizes):
    return x.new_empty((group_sizes.shape[0], x.shape[1], grad.shape[1]))


def _setup(ctx, inputs, output):
    x, weight, group_sizes = inputs
    ctx.save_for_backward(x, weight, group_sizes)


def _backward(ctx, grad):
    x, weight, group_sizes = ctx.saved_tensors
    ops = torch.ops.graphllm
    weight_t = weight.transpose(1, 2)  # [G, N, K]
    dx = ops.grouped_matmul(grad, weight_t.contiguous(), group_sizes)
    if weight_t.is_contiguous():
        # the weight is a transposed view of a [G, N, K] parameter (transformers' expert layout, models/moe.py):
        # compute its gradient as dyᵀ x [G, N, K], so its transpose is laid out like the parameter and autograd
        # accumulates it without a strided copy of every expert matrix each step (same dot products)
        return dx, ops.grouped_matmul_weight_grad(grad, x, group_sizes).transpose(1, 2), None
    return dx, ops.grouped_matmul_weight_grad(x, grad, group_sizes), None


grouped_matmul.register_autograd(_backward, setup_context=_setup)
register_autocast_policy("graphllm::grouped_matmul", torch.bfloat16)
register_autocast_policy("graphllm::grouped_matmul_weight_grad", torch.bfloat16)
