"""How a rank's parameter relates to the model's full parameter (set by the sharding passes).

A parameter without a ParamShard is whole on every rank that holds it. A sharded one is the
`index`-th of `count` equal slices of the full tensor along `dim`, over the group `group`.
Checkpoints, gradient norms and the per-rank report read this; nothing else needs to know how a
parameter was split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_ATTR = "_graphllm_shard"


@dataclass(frozen=True, slots=True)
class ParamShard:
    full_shape: tuple[int, ...]
    dim: int
    index: int
    count: int
    group: str = "tp"

    def slice_of(self, full: torch.Tensor) -> torch.Tensor:
        """This shard's slice of the full tensor (a view)."""
        return full.chunk(self.count, dim=self.dim)[self.index]


def set_shard(param: torch.Tensor, shard: ParamShard) -> None:
    setattr(param, _ATTR, shard)


def shard_of(param: torch.Tensor) -> ParamShard | None:
    return getattr(param, _ATTR, None)


def shard_param(full: torch.nn.Parameter, dim: int, index: int, count: int, group: str = "tp") -> torch.nn.Parameter:
    """A new Parameter holding one slice of `full` (copied, so the full tensor can be freed)."""
    spec = ParamShard(full_shape=tuple(full.shape), dim=dim, index=index, count=count, group=group)
    p = torch.nn.Parameter(spec.slice_of(full.detach()).clone(), requires_grad=full.requires_grad)
    set_shard(p, spec)
    return p
