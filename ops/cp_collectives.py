"""Context parallelism's collectives as graphllm ops: the ring shift and the Ulysses all-to-all.

| op                                           | forward                                   | backward                      |
|----------------------------------------------|-------------------------------------------|-------------------------------|
| cp_ring_shift(x, step, size, group)          | send x to rank + step, receive from       | cp_ring_shift(g, -step, ...)  |
|                                              | rank - step (around the group's ring)     | (the reverse ring)            |
| cp_all_to_all(x, scatter, gather, size, grp) | split x along `scatter`, chunk i to rank  | cp_all_to_all(g, gather,      |
|                                              | i; received chunks concatenated along     | scatter, size, group)         |
|                                              | `gather` in rank order                    |                               |

Both are one `_c10d_functional.all_to_all_single` (the ring shift with every split empty but the
neighbour's), which inductor schedules as an asynchronous collective; `lower_collectives` emits the same
calls into the forward/backward graphs, so the issue of the next ring step's keys and values sits before
this step's attention and its wait after it. Groups are named by kind ("cp_ring", "cp_ulysses"), resolved
per rank at run time (ops/groups.py).

torchair has no GE converter for `_c10d_functional.all_to_all_single`: it converts its own
`npu_define.all_to_all_single_npu` (TORCHAIR_ALL_TO_ALL), which it patches `torch.distributed.all_to_all_single`
to. For the npu backend `lower_collectives` emits that op instead, with the counts in elements
(`element_counts`) and the group as torchair names it (`torchair_group`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from graphllm.errors import GraphllmError
from graphllm.ops.groups import GroupResolver, resolver

c10d = torch.ops._c10d_functional


def ring_splits(numel: int, step: int, size: int, rank: int) -> tuple[list[int], list[int]]:
    """(output_split_sizes, input_split_sizes) of all_to_all_single that send to rank+step, receive from
    rank-step."""
    send, recv = [0] * size, [0] * size
    send[(rank + step) % size] = numel
    recv[(rank - step) % size] = numel
    return recv, send


def element_counts(rows: list[int], row_numel: int) -> tuple[list[int], list[int]]:
    """(counts, displacements) of torchair's all_to_all_single_npu for split sizes in rows of `row_numel`
    elements: the op counts elements of the flattened input, each rank's piece right after the previous one's
    (how torchair's own `_all_to_all_single` converts split sizes)."""
    counts = [r * row_numel for r in rows]
    return counts, [sum(counts[:i]) for i in range(len(counts))]


def torchair_group(groups: GroupResolver, kind: str) -> tuple[str, list[int]]:
    """(tag, global ranks in group-rank order) of this rank's group of `kind`, as torchair's all_to_all_single
    patch passes them (`c10d._get_group_tag`, `get_process_group_ranks`). Its converter finds the group by
    them and asks it for the HCCL communicator's name itself, so unlike the MC2 kernels' `hcom`
    (ops/lowering_npu_mc2.hcom_name) nothing here needs the device."""
    pg = groups.process_group(kind)
    return dist.distributed_c10d._get_group_tag(pg), dist.get_process_group_ranks(pg)


TORCHAIR_ALL_TO_ALL = "npu_define::all_to_all_single_npu"
"""torchair's all-to-all: `(Tensor input, SymInt[] send_counts, SymInt[] send_displacements, SymInt[] recv_counts,
SymInt[] recv_displacements, str tag, int[] ranks, int group_size) -> Tensor`, defined by
torchair/_ge_concrete_graph/ge_converter/experimental/hcom_alltoall.py when torchair is imported (the npu
backend imports it before any pass runs), and by graphllm.preflight.emulation for the npu-emulated backend."""


def torchair_all_to_all():
    """The TORCHAIR_ALL_TO_ALL overload, or one line saying that neither torchair nor its emulation is loaded."""
    ns, name = TORCHAIR_ALL_TO_ALL.split("::")
    packet = getattr(getattr(torch.ops, ns), name, None)  # an op not defined (yet) raises AttributeError
    if packet is None:
        raise GraphllmError(f"the npu lowering of context parallelism needs torch.ops.{ns}.{name}, which torchair "
                            "defines (backend npu) or graphllm.preflight.emulation (backend npu-emulated); "
                            "neither is loaded in this process")
    return packet.default


def ring_shift_decomposed(x: Tensor, step: int, size: int, group_name: str, rank: int) -> Tensor:
    recv, send = ring_splits(x.numel(), step, size, rank)
    flat = x.contiguous().view(-1)
    return c10d.wait_tensor(c10d.all_to_all_single(flat, recv, send, group_name)).view(x.shape)


def all_to_all_decomposed(x: Tensor, scatter_dim: int, gather_dim: int, size: int, group_name: str) -> Tensor:
    moved = x.movedim(scatter_dim, 0).contiguous()  # rank i's chunk is rows [i·n/size, (i+1)·n/size)
    split = [moved.shape[0] // size] * size
    got = c10d.wait_tensor(c10d.all_to_all_single(moved, split, split, group_name))
    pieces = [p.movedim(0, scatter_dim) for p in got.chunk(size, 0)]  # from each rank, in rank order
    return torch.cat(pieces, dim=gather_dim).contiguous()


@torch.library.custom_op("graphllm::cp_ring_shift", mutates_args=())
def cp_ring_shift(x: Tensor, step: int, size: int, group: str) -> Tensor:
    r = resolver()
    return ring_shift_decomposed(x, step, size, r.name(group), r.local_rank(group))


@torch.library.custom_op("graphllm::cp_all_to_all", mutates_args=())
def cp_all_to_all(x: Tensor, scatter_dim: int, gather_dim: int, size: int, group: str) -> Tensor:
    return all_to_all_decomposed(x, scatter_dim, gather_dim, size, resolver().name(group))


@cp_ring_shift.register_fake
def _(x: Tensor, step: int, size: int, group: str) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@cp_all_to_all.register_fake
def _(x: Tensor, scatter_dim: int, gather_dim: int, size: int, group: str) -> Tensor:
    shape = list(x.shape)
    torch._check(shape[scatter_dim] % size == 0, lambda: "cp_all_to_all: scatter dim not divisible by the group")
    shape[scatter_dim] //= size
    shape[gather_dim] *= size
    return x.new_empty(shape)


def _setup_shift(ctx, inputs, output):
    _, ctx.step, ctx.size, ctx.group = inputs


def _setup_a2a(ctx, inputs, output):
    _, ctx.scatter_dim, ctx.gather_dim, ctx.size, ctx.group = inputs


cp_ring_shift.register_autograd(
    lambda ctx, g: (torch.ops.graphllm.cp_ring_shift(g, -ctx.step, ctx.size, ctx.group), None, None, None),
    setup_context=_setup_shift)
cp_all_to_all.register_autograd(
    lambda ctx, g: (torch.ops.graphllm.cp_all_to_all(g, ctx.gather_dim, ctx.scatter_dim, ctx.size, ctx.group),
                    None, None, None, None),
    setup_context=_setup_a2a)

CP_COLLECTIVE_OPS = {
    torch.ops.graphllm.cp_ring_shift.default: "all_to_all",
    torch.ops.graphllm.cp_all_to_all.default: "all_to_all",
}
"""Each op and the communication it performs (for the report's communication table)."""
