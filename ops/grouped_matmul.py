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


def _groups(t: Tensor, group_sizes: Tensor) -> tuple[Tensor, ...]:
    """The rows of each group (the tail past the last group is left out)."""
    sizes = group_sizes.tolist()
    return t.split([*sizes, t.shape[0] - sum(sizes)], dim=0)[:-1]


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
    out = x.new_zeros((x.shape[0], weight.shape[2]))
    for g, (xg, og) in enumerate(zip(_groups(x, group_sizes), _groups(out, group_sizes))):
        torch.matmul(xg, weight[g], out=og)
    return out


@grouped_matmul.register_fake
def _(x, weight, group_sizes):
    check_group_sizes(x, weight, group_sizes)
    return x.new_empty((x.shape[0], weight.shape[2]))


@torch.library.custom_op("graphllm::grouped_matmul_weight_grad", mutates_args=())
def grouped_matmul_weight_grad(x: Tensor, grad: Tensor, group_sizes: Tensor) -> Tensor:
    """[G, K, N]: for each group g, x_gᵀ @ grad_g (zeros for an empty group)."""
    out = x.new_zeros((group_sizes.shape[0], x.shape[1], grad.shape[1]))
    for g, (xg, dg) in enumerate(zip(_groups(x, group_sizes), _groups(grad, group_sizes))):
        if xg.shape[0]:
            torch.matmul(xg.t(), dg, out=out[g])
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
    dx = ops.grouped_matmul(grad, weight.transpose(1, 2).contiguous(), group_sizes)
    return dx, ops.grouped_matmul_weight_grad(x, grad, group_sizes), None


grouped_matmul.register_autograd(_backward, setup_context=_setup)
register_autocast_policy("graphllm::grouped_matmul", torch.bfloat16)
register_autocast_policy("graphllm::grouped_matmul_weight_grad", torch.bfloat16)
