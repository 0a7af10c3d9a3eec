"""graphllm's collective ops: Megatron-Core's tensor/sequence-parallel region mappings as graph nodes.

Each op names its process group by kind ("tp"), resolved to this rank's group at run time by the
resolver the parallel runtime installs (ops/groups.py), so graphs are the same on every run. The
autograd rule of each op is the conjugate collective, which is what makes the sharded model's gradients equal the unsharded ones:

| op                               | forward                     | backward                     |
|----------------------------------|-----------------------------|------------------------------|
| tp_copy(x)                       | identity                    | all-reduce (sum)             |
| tp_reduce(x)                     | all-reduce (sum)            | identity                     |
| tp_reduce_max(x)                 | all-reduce (max)            | — (callers pass detached x)  |
| tp_gather(x, dim, size)          | all-gather along dim        | split (this rank's chunk)    |
| tp_split(x, dim, size)           | split (this rank's chunk)   | all-gather along dim         |
| sp_gather(x, dim, size)          | all-gather along dim        | reduce-scatter along dim     |
| sp_reduce_scatter(x, dim, size)  | reduce-scatter along dim    | all-gather along dim         |

The reference kernels call `torch.ops._c10d_functional` (the eager backend runs them); the
`lower_collectives` train pass rewrites the forward/backward graphs to the same `_c10d_functional`
calls for inductor and torchair, which schedule them as collectives.
"""

from __future__ import annotations

import torch
from torch import Tensor

from graphllm.ops.cp_collectives import CP_COLLECTIVE_OPS
from graphllm.ops.groups import resolver

c10d = torch.ops._c10d_functional


def group_name_of(group: str) -> str:
    """The c10d group name of a graphllm group kind ("tp") on this rank."""
    return resolver().name(group)


def all_reduce_decomposed(x: Tensor, op: str, group_name: str) -> Tensor:
    return c10d.wait_tensor(c10d.all_reduce(x.contiguous(), op, group_name))


def all_gather_decomposed(x: Tensor, dim: int, size: int, group_name: str) -> Tensor:
    """Concatenate the group's tensors along `dim` (functional all-gather concatenates along dim 0)."""
    moved = x.movedim(dim, 0).contiguous()
    out = c10d.wait_tensor(c10d.all_gather_into_tensor(moved, size, group_name))
    return out.movedim(0, dim).contiguous()


def reduce_scatter_decomposed(x: Tensor, dim: int, size: int, group_name: str) -> Tensor:
    """Sum over the group, keep this rank's 1/size slice along `dim`."""
    moved = x.movedim(dim, 0).contiguous()
    out = c10d.wait_tensor(c10d.reduce_scatter_tensor(moved, "sum", size, group_name))
    return out.movedim(0, dim).contiguous()


@torch.library.custom_op("graphllm::tp_copy", mutates_args=())
def tp_copy(x: Tensor, group: str) -> Tensor:
    return x.clone()


@torch.library.custom_op("graphllm::tp_reduce", mutates_args=())
def tp_reduce(x: Tensor, group: str) -> Tensor:
    return all_reduce_decomposed(x, "sum", group_name_of(group))


@torch.library.custom_op("graphllm::tp_reduce_max", mutates_args=())
def tp_reduce_max(x: Tensor, group: str) -> Tensor:
    return all_reduce_decomposed(x, "max", group_name_of(group))


def split_decomposed(x: Tensor, dim: int, size: int, rank: int) -> Tensor:
    return x.chunk(size, dim)[rank].contiguous()


def _group_rank(group: str) -> int:
    return resolver().local_rank(group)


@torch.library.custom_op("graphllm::tp_gather", mutates_args=())
def tp_gather(x: Tensor, dim: int, size: int, group: str) -> Tensor:
    return all_gather_decomposed(x, dim, size, group_name_of(group))


@torch.library.custom_op("graphllm::tp_split", mutates_args=())
def tp_split(x: Tensor, dim: int, size: int, group: str) -> Tensor:
    # a chunk along dim 0 of a contiguous x is already contiguous, i.e. a view of x: a custom op may not alias
    return split_decomposed(x, dim, size, _group_rank(group)).clone()


@torch.library.custom_op("graphllm::sp_gather", mutates_args=())
def sp_gather(x: Tensor, dim: int, size: int, group: str) -> Tensor:
    return all_gather_decomposed(x, dim, size, group_name_of(group))


@torch.library.custom_op("graphllm::sp_reduce_scatter", mutates_args=())
def sp_reduce_scatter(x: Tensor, dim: int, size: int, group: str) -> Tensor:
    return reduce_scatter_decomposed(x, dim, size, group_name_of(group))


def _same(x: Tensor, *_) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _gathered(x: Tensor, dim: int, size: int, group: str) -> Tensor:
    shape = list(x.shape)
    shape[dim] *= size
    return x.new_empty(shape)


def _scattered(x: Tensor, dim: int, size: int, group: str) -> Tensor:
    shape = list(x.shape)
    shape[dim] //= size
    return x.new_empty(shape)


for _op in (tp_copy, tp_reduce, tp_reduce_max):
    _op.register_fake(_same)
for _op in (sp_gather, tp_gather):
    _op.register_fake(_gathered)
for _op in (sp_reduce_scatter, tp_split):
    _op.register_fake(_scattered)


def _setup_group(ctx, inputs, output):
    ctx.group = inputs[-1]


def _setup_dim(ctx, inputs, output):
    _, ctx.dim, ctx.size, ctx.group = inputs


def _conjugate_along_dim(conjugate):
    """Backward of a dim collective: its conjugate with the same dim, size and group."""
    return lambda ctx, g: (conjugate(g, ctx.dim, ctx.size, ctx.group), None, None, None)


tp_copy.register_autograd(lambda ctx, g: (torch.ops.graphllm.tp_reduce(g, ctx.group), None),
                          setup_context=_setup_group)
tp_reduce.register_autograd(lambda ctx, g: (g, None), setup_context=_setup_group)
for _op, _conjugate in ((sp_gather, sp_reduce_scatter), (sp_reduce_scatter, sp_gather),
                        (tp_gather, tp_split), (tp_split, tp_gather)):
    _op.register_autograd(_conjugate_along_dim(_conjugate), setup_context=_setup_dim)

COLLECTIVE_OPS = {
    torch.ops.graphllm.tp_copy.default: "identity",
    torch.ops.graphllm.tp_reduce.default: "all_reduce",
    torch.ops.graphllm.tp_reduce_max.default: "all_reduce",
    torch.ops.graphllm.tp_gather.default: "all_gather",
    torch.ops.graphllm.tp_split.default: "identity",
    torch.ops.graphllm.sp_gather.default: "all_gather",
    torch.ops.graphllm.sp_reduce_scatter.default: "reduce_scatter",
    **CP_COLLECTIVE_OPS,
}
"""Each collective op and the communication it performs in its forward direction."""
