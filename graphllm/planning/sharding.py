"""How a rank's parameter relates to the model's full parameter (set by the sharding passes).

A parameter without a ParamShard is whole on every rank that holds it. A sharded one is the
`index`-th of `count` equal slices of the full tensor along `dim`, over the group `group` — of each of
`blocks` blocks along `dim` for a fused gate | up weight — and may be split again over another group (`inner`:
an expert-parallel slice split over tensor-parallel ranks).
Checkpoints, gradient norms and the per-rank report read this; nothing else needs to know how a
parameter was split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from graphllm.errors import GraphllmError

_ATTR = "_graphllm_shard"


@dataclass(frozen=True, slots=True)
class ParamShard:
    full_shape: tuple[int, ...]
    dim: int
    index: int
    count: int
    group: str = "tp"
    blocks: int = 1
    """`dim` is `blocks` equal blocks (a fused expert MLP's gate | up rows): the shard is the index-th chunk of
    each block, concatenated, so the rank's gate and up rows stay paired (expert tensor parallelism)."""
    inner: ParamShard | None = None
    """A further split of this slice over another group (expert tensor parallelism: the ep slice over tp);
    its full_shape is this slice's shape."""

    def slice_of(self, full: torch.Tensor) -> torch.Tensor:
        """This shard's slice of the full tensor (a view when `blocks` is 1)."""
        if self.blocks == 1:
            part = full.chunk(self.count, dim=self.dim)[self.index]
        else:
            part = torch.cat([b.chunk(self.count, dim=self.dim)[self.index]
                              for b in full.chunk(self.blocks, dim=self.dim)], dim=self.dim)
        return self.inner.slice_of(part) if self.inner is not None else part

    @property
    def levels(self) -> tuple[ParamShard, ...]:
        """This split and the ones inside it, outermost first."""
        return (self,) + (self.inner.levels if self.inner is not None else ())

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(level.group for level in self.levels)


Level = tuple[int, int, int, str, int]
"""(dim, index, count, group, blocks) of one split, as `nested_shard` takes them."""


def nested_shard(full_shape: tuple[int, ...], levels: Sequence[Level]) -> ParamShard | None:
    """The ParamShard of `levels` applied in turn (each to the previous one's slice); splits of one are left
    out, and None when nothing is split."""
    levels = [level for level in levels if level[2] > 1]
    if not levels:
        return None
    dim, index, count, group, blocks = levels[0]
    if full_shape[dim] % (count * blocks):
        raise GraphllmError(f"a parameter shaped {tuple(full_shape)} cannot be split in {count} along dim {dim}"
                            f"{f' in each of its {blocks} blocks' if blocks > 1 else ''}")
    inner_shape = tuple(n // count if d == dim else n for d, n in enumerate(full_shape))
    return ParamShard(tuple(full_shape), dim, index, count, group, blocks, nested_shard(inner_shape, levels[1:]))


def set_shard(param: torch.Tensor, shard: ParamShard) -> None:
    setattr(param, _ATTR, shard)


def shard_of(param: torch.Tensor) -> ParamShard | None:
    return getattr(param, _ATTR, None)


def shard_param(full: torch.nn.Parameter, dim: int, index: int, count: int, group: str = "tp") -> torch.nn.Parameter:
    """A new Parameter holding one slice of `full` (copied, so the full tensor can be freed)."""
    spec = ParamShard(full_shape=tuple(full.shape), dim=dim, index=index, count=count, group=group)
    return _holding(full, spec)


def shard_param_nested(full: torch.nn.Parameter, levels: Sequence[Level]) -> torch.nn.Parameter:
    """`full` split by `levels` (nested_shard); `full` itself when no level splits it."""
    spec = nested_shard(tuple(full.shape), levels)
    return full if spec is None else _holding(full, spec)


def _holding(full: torch.nn.Parameter, spec: ParamShard) -> torch.nn.Parameter:
    p = torch.nn.Parameter(spec.slice_of(full.detach()).clone(), requires_grad=full.requires_grad)
    set_shard(p, spec)
    return p
