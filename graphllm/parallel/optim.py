"""Data-parallel gradient averaging, the global gradient norm, and ZeRO-1 AdamW.

- `reduce_gradients`: average gradients over the data-parallel group in flat buckets (async, so the
  buckets' all-reduces overlap one another) — used when the backward graph did not already reduce them.
- `grad_norm` / `clip_grad_norm`: the norm of the whole model's gradient: shards' squares summed over
  their tensor-parallel group, whole parameters counted once, then summed over pipeline ranks.
- `ZeroAdamW`: ZeRO stage 1. All parameters are laid end to end in one index space, cut into dp
  near-equal ranges; each rank keeps AdamW state for its range only, updates it (AdamW is elementwise,
  so the result is bitwise the unsharded update), and the ranges are all-gathered back into the
  parameters.
- `optimizer_state` / `load_optimizer_state`: AdamW state in a layout-independent form, one entry per
  parameter shaped like the local parameter (for checkpoints).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from graphllm.parallel.sharding import shard_of

STATE_KEYS = ("exp_avg", "exp_avg_sq")


def reduce_gradients(params: Sequence[nn.Parameter], group: Any, *, bucket_bytes: int = 25 * 2**20) -> int:
    """Average `.grad` over `group` in flat per-dtype buckets; a missing gradient counts as zeros.
    Returns the number of buckets (0 when there is nothing to do)."""
    if group is None or dist.get_world_size(group) == 1:
        return 0
    size = dist.get_world_size(group)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets: list[list[nn.Parameter]] = []
    used = 0
    for p in params:
        nbytes = p.grad.numel() * p.grad.element_size()
        if not buckets or used + nbytes > bucket_bytes or buckets[-1][0].grad.dtype != p.grad.dtype:
            buckets.append([])
            used = 0
        buckets[-1].append(p)
        used += nbytes
    flats, works = [], []
    for bucket in buckets:
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        flats.append(flat)
        works.append(dist.all_reduce(flat, group=group, async_op=True))
    for bucket, flat, work in zip(buckets, flats, works):
        work.wait()
        flat /= size
        offset = 0
        for p in bucket:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n
    return len(buckets)


def _group(st, kind: str):
    if st is None or getattr(st.layout, kind) == 1:
        return None
    return st.group(kind)


def grad_norm(named_params: dict[str, nn.Parameter], st) -> torch.Tensor:
    """Global L2 norm (fp32 scalar) of the whole model's gradient, identical on every rank."""
    sharded = torch.zeros((), dtype=torch.float32)
    whole = torch.zeros((), dtype=torch.float32)
    for p in named_params.values():
        if p.grad is None:
            continue
        sq = p.grad.detach().float().pow(2).sum()
        if shard_of(p) is not None:
            sharded += sq
        else:
            whole += sq
    tp = _group(st, "tp")
    if tp is not None:
        dist.all_reduce(sharded, group=tp)
    total = sharded + whole
    pp = _group(st, "pp")
    if pp is not None:
        dist.all_reduce(total, group=pp)
    return total.sqrt()


def clip_grad_norm(named_params: dict[str, nn.Parameter], max_norm: float, st) -> float:
    """torch.nn.utils.clip_grad_norm_ semantics over the global norm; returns the norm before clipping."""
    norm = grad_norm(named_params, st)
    if max_norm > 0 and math.isfinite(max_norm):
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        grads = [p.grad for p in named_params.values() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, coef)
    return float(norm)


class ZeroAdamW:
    """AdamW whose states and update are sharded over the data-parallel `group` (ZeRO-1)."""

    def __init__(self, named_params: dict[str, nn.Parameter], *, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, group: Any):
        self.params = list({id(p): p for p in named_params.values()}.values())
        self.group = group
        self.world = dist.get_world_size(group) if group is not None else 1
        rank = dist.get_rank(group) if group is not None else 0
        self.total = sum(p.numel() for p in self.params)
        self.shard = -(-self.total // self.world)
        self.start, self.end = rank * self.shard, min(self.total, (rank + 1) * self.shard)
        self.pieces: list[tuple[nn.Parameter, int, int, nn.Parameter]] = []  # param, lo, hi (in param), piece
        decay, no_decay = [], []
        offset = 0
        for p in self.params:
            lo, hi = max(self.start, offset), min(self.end, offset + p.numel())
            if lo < hi:
                piece = nn.Parameter(p.detach().reshape(-1)[lo - offset:hi - offset].clone())
                self.pieces.append((p, lo - offset, hi - offset, piece))
                (decay if p.dim() >= 2 else no_decay).append(piece)
            offset += p.numel()
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.inner = torch.optim.AdamW([g for g in groups if g["params"]] or [{"params": [nn.Parameter(torch.zeros(1))]}],
                                       lr=lr, betas=betas, eps=eps, fused=True)

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    @torch.no_grad()
    def step(self) -> None:
        for p, lo, hi, piece in self.pieces:
            piece.copy_(p.detach().reshape(-1)[lo:hi])  # the parameters are the truth (a checkpoint load writes them)
            piece.grad = (p.grad.reshape(-1)[lo:hi].clone() if p.grad is not None else torch.zeros_like(piece))
        self.inner.step()
        local = torch.zeros(self.shard, dtype=self.params[0].dtype)  # this rank's range, updated
        for p, lo, hi, piece in self.pieces:
            base = self._offset(p) + lo - self.start
            local[base:base + hi - lo] = piece.detach()
        full = torch.empty(self.shard * self.world, dtype=local.dtype)
        if self.group is not None:
            dist.all_gather_into_tensor(full, local, group=self.group)
        else:
            full = local
        offset = 0
        for p in self.params:
            p.copy_(full[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def _offset(self, param: nn.Parameter) -> int:
        offset = 0
        for p in self.params:
            if p is param:
                return offset
            offset += p.numel()
        raise KeyError("parameter not managed by this optimizer")

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        for *_, piece in self.pieces:
            piece.grad = None

    def state_numel(self) -> int:
        """Elements of AdamW state this rank holds (for the memory report and its test)."""
        return sum(v.numel() for s in self.inner.state.values() for k, v in s.items() if k in STATE_KEYS)


def optimizer_state(opt: Any, named_params: dict[str, nn.Parameter]) -> dict:
    """{"step": int, "state": {fqn: {"exp_avg", "exp_avg_sq"}}}, tensors shaped like the local params."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    step = 0
    if isinstance(opt, ZeroAdamW):
        pieces = {id(p): (lo, hi, piece) for p, lo, hi, piece in opt.pieces}
        for name, p in named_params.items():
            entry = {k: torch.zeros(p.numel(), dtype=torch.float32) for k in STATE_KEYS}
            if id(p) in pieces:
                lo, hi, piece = pieces[id(p)]
                s = opt.inner.state.get(piece, {})
                for k in STATE_KEYS:
                    if k in s:
                        entry[k][lo:hi] = s[k]
                if "step" in s:
                    step = max(step, int(s["step"]))
            out[name] = entry
        if opt.group is not None:  # the ranges are disjoint: a sum assembles them
            for entry in out.values():
                for t in entry.values():
                    dist.all_reduce(t, group=opt.group)
            box = torch.tensor(step)
            dist.all_reduce(box, op=dist.ReduceOp.MAX, group=opt.group)
            step = int(box)
        out = {n: {k: t.view_as(named_params[n]) for k, t in e.items()} for n, e in out.items()}
    else:
        for name, p in named_params.items():
            s = opt.state.get(p, {})
            out[name] = {k: (s[k].detach().clone() if k in s else torch.zeros_like(p, dtype=torch.float32))
                         for k in STATE_KEYS}
            if "step" in s:
                step = max(step, int(s["step"]))
    return {"step": step, "state": out}


def load_optimizer_state(opt: Any, named_params: dict[str, nn.Parameter], d: dict) -> None:
    """Inverse of `optimizer_state` for this rank's optimizer (AdamW or ZeroAdamW)."""
    step = torch.tensor(float(d["step"]), dtype=torch.float32)
    if isinstance(opt, ZeroAdamW):
        by_id = {id(p): n for n, p in named_params.items()}
        for p, lo, hi, piece in opt.pieces:
            src = d["state"][by_id[id(p)]]
            opt.inner.state[piece] = {"step": step.clone(),
                                      **{k: src[k].reshape(-1)[lo:hi].clone().float() for k in STATE_KEYS}}
        return
    for name, p in named_params.items():
        src = d["state"][name]
        opt.state[p] = {"step": step.clone(), **{k: src[k].clone().to(p.dtype).view_as(p) for k in STATE_KEYS}}
