"""How one parameter is stored in a checkpoint: its stored shape, and a rank's shard of it as a DTensor.

Most parameters are stored as they are. A fused expert weight whose dim d is n equal blocks (gate rows | up
rows, models/moe.py FUSED_BLOCKS) is stored with the block axis explicit — [E, 2I, H] as [E, 2, I, H] —
in every layout, one process included, so that an expert-tensor-parallel shard (the same rows of each block,
planning/sharding.py `blocks`) is one rectangular piece of the stored tensor: Shard(d + 1) over tp, where the
fused form would need two pieces per rank, which a DTensor cannot say. Megatron stores its SwiGLU fc1 the
same way, with an extra axis for the two halves. A checkpoint written before the axis existed (the fused
shape) still loads: the whole tensor is read and each rank takes its slice.

A shard with several levels (expert tensor parallelism: ep on dim 0, then tp) is a DTensor over the
two-dimensional mesh of its groups, one Shard placement per level.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Shard

from graphllm.models.moe import FUSED_BLOCKS
from graphllm.planning.sharding import ParamShard


def fused_blocks(fqn: str, ndim: int) -> tuple[int, int] | None:
    """(dim, blocks) of a parameter stored with an explicit block axis, or None."""
    for suffix, (dim, blocks) in FUSED_BLOCKS.items():
        if (fqn == suffix or fqn.endswith("." + suffix)) and dim < ndim:
            return dim, blocks
    return None


def stored_shape(fqn: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a parameter of (full) `shape` has in a checkpoint."""
    fused = fused_blocks(fqn, len(shape))
    if fused is None:
        return tuple(shape)
    dim, n = fused
    return (*shape[:dim], n, shape[dim] // n, *shape[dim + 1:])


def model_shape(fqn: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The model's shape of a parameter stored with `shape` (the inverse of stored_shape; a shape without the block
    axis, from before it, is the model's already)."""
    fused = fused_blocks(fqn, len(shape) - 1)
    if fused is None or shape[fused[0]] != fused[1]:
        return tuple(shape)
    dim, n = fused
    return (*shape[:dim], n * shape[dim + 1], *shape[dim + 2:])


def stored_view(fqn: str, t: torch.Tensor) -> torch.Tensor:
    """`t` (the full parameter or a rank's shard of it) viewed as its stored form."""
    fused = fused_blocks(fqn, t.dim())
    if fused is None:
        return t
    dim, n = fused
    return t.unflatten(dim, (n, t.shape[dim] // n))


def mesh_problem(fqn: str, shard: ParamShard, st) -> str | None:
    """Why `st` cannot express this shard as a DTensor (None when it can)."""
    fused = fused_blocks(fqn, len(shard.full_shape))
    for level in shard.levels:
        on_blocks = fused is not None and level.dim == fused[0]
        if (level.blocks > 1 or on_blocks) and (not on_blocks or level.blocks != fused[1]):
            return (f"parameter {fqn} is split along dim {level.dim} in {level.blocks} block(s), but its checkpoint "
                    f"form has {'no block axis' if fused is None else f'{fused[1]} blocks on dim {fused[0]}'} "
                    "(models/moe.py FUSED_BLOCKS): a checkpoint cannot hold this shard")
    for level in shard.levels:
        if st is None or st.mesh is None:
            return (f"parameter {fqn} is shard {level.index} of {level.count} but this process has no {level.group} "
                    "group; call init_parallel with the layout that sharded it")
        mesh = st.submesh(level.group)
        if mesh is None:
            return (f"parameter {fqn} is sharded over {level.group!r}, a group this layout ({st.layout.describe()}) "
                    "lacks")
        if mesh.size() != level.count or mesh.get_local_rank() != level.index:
            return (f"parameter {fqn} is shard {level.index} of {level.count} but this rank is "
                    f"{mesh.get_local_rank()} of {mesh.size()} in its {level.group} group")
    return None


def as_dtensor(fqn: str, local: torch.Tensor, shard: ParamShard, st) -> DTensor:
    """This rank's `local` shard (in the model's shape) as a DTensor of the stored form."""
    full = torch.Size(stored_shape(fqn, shard.full_shape))
    fused = fused_blocks(fqn, len(shard.full_shape))
    levels = shard.levels
    groups = tuple(level.group for level in levels)
    mesh = st.submesh(groups[0]) if len(groups) == 1 else st.mesh[groups]
    placements = [Shard(level.dim + (1 if fused is not None and level.dim >= fused[0] else 0)) for level in levels]
    stride = torch.empty(full, device="meta").stride()
    return DTensor.from_local(stored_view(fqn, local), mesh, placements, run_check=False, shape=full, stride=stride)
