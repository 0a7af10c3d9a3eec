"""Parallelism: the layout (tp × pp × dp), process groups, parameter sharding metadata, runtimes."""

from graphllm.parallel.layout import Coords, Layout
from graphllm.parallel.sharding import ParamShard, set_shard, shard_of, shard_param

__all__ = ["Coords", "Layout", "ParamShard", "set_shard", "shard_of", "shard_param"]
