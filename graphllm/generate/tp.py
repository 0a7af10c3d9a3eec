"""Tensor-parallel generation: what StaticGenerator adds to its graphs and its loop when `tp > 1`.

Every rank runs the same prefill/decode loop on the same prompts. The graphs get the tensor_parallel
pass (passes/tensor_parallel.py), so each rank holds 1/tp of the attention heads, MLP columns and
vocabulary, and the graph carries the collectives (tp_copy/tp_reduce, and tp_gather of the logits, so
every rank sees the whole vocabulary). The KV cache each rank allocates holds only its own kv heads:
[L, B, Hkv/tp, M, D] (one head when Hkv < tp, the head its query heads share).

Three details make that work on graphs captured from the unsharded model:

- `tp_cache_inputs` (passes/tp_cache_inputs.py, a model pass just before tensor_parallel) gives the decode graph's cache
  placeholders their per-rank shape, so the shape re-propagation inside tensor_parallel carries the
  smaller head count through the attention over the cache;
- each graph is captured from a shallow clone of the model that shares its full Parameters, because
  compiling adopts the shards into the module it captured (graphllm.compile.adopt_parameters) and the
  next bucket's prefill graph must again be captured from the full weights; the shards of later graphs
  then share storage with the first graph's, so the weights are held once per rank (plus the full copy);
- sampled tokens are broadcast from the group's first rank, so a seeded or unseeded sampler cannot
  make ranks diverge (greedy is identical anyway: the gathered logits are).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from graphllm.errors import GraphllmError


def local_kv_heads(kv_heads: int, tp: int) -> int:
    """kv heads one rank holds: its share, or one (a replicated head) when there are fewer than ranks."""
    return max(kv_heads // tp, 1)


def join_tp_group(cfg, tp: int, *, batch_size: int, max_len: int, device: str):
    """This process's ParallelState for a tp-only layout: the existing one, or init_parallel's.

    Refuses (one line each) a --tp the model cannot be split by, and a process that was not started as
    one of `tp` ranks (torchrun / `graphllm generate --tp N`, which relaunches itself)."""
    from graphllm.planning import Layout
    from graphllm.parallel.groups import init_parallel, launched_world, state

    layout = Layout(tp=tp)
    layout.check_model(cfg, batch_size=batch_size, seq_len=max_len)
    st = state()
    if st is not None and st.layout.world_size > 1:
        if st.layout != layout:
            raise GraphllmError(f"generation with --tp {tp} in a process already set up for {st.layout.describe()}; "
                                f"generate with --tp {st.layout.tp} (and no pp/dp) or in a fresh process")
        return st
    if launched_world()[1] != tp:
        raise GraphllmError(f"--tp {tp} needs {tp} processes but this one is not one of them; run "
                            f"`graphllm generate --tp {tp} ...` (it starts the ranks) or torchrun --nproc-per-node {tp}")
    return init_parallel(layout, device)


def shallow_clone(model: nn.Module) -> nn.Module:
    """New module objects sharing every Parameter and buffer of `model` (see module docstring)."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def share_shards(module: nn.Module, shards: dict[str, torch.Tensor]) -> None:
    """Point each sharded Parameter of `module` at the storage of the same shard of an earlier graph
    (its values are equal: the same slice of the same full weight); remember the first of each."""
    from graphllm.planning.sharding import shard_of

    for name, p in module.named_parameters(remove_duplicate=False):
        if shard_of(p) is None:
            continue
        first = shards.setdefault(name, p.data)
        if first is not p.data and first.shape == p.shape:
            p.data = first


def broadcast_tokens(token: torch.Tensor) -> torch.Tensor:
    """`token` [B] of the tp group's first rank, on every rank of the group."""
    import torch.distributed as dist

    from graphllm.parallel.groups import group_for

    pg = group_for("tp")
    dist.broadcast(token, src=dist.get_global_rank(pg, 0), group=pg)
    return token
