"""Data-parallel gradient averaging, the global gradient norm, ZeRO-1 AdamW, layout-independent optimizer state.

- `reduce_gradients`: average `.grad` over the data-parallel group in flat per-dtype buckets, each
  all-reduce issued async so the buckets overlap one another (used when the backward graph did not
  already reduce them).
- `grad_norm` / `clip_grad_norm`: the norm of the whole model's gradient: shards' squares summed over
  their shard group, whole parameters counted once, then summed over pipeline ranks (disjoint
  parameters). Data- and context-parallel replicas hold identical (averaged) gradients and are not summed.
- `ZeroAdamW`: ZeRO stage 1. All parameters are laid end to end in one index space cut into dp
  near-equal ranges; each rank keeps AdamW state for its range only and updates it. AdamW is
  elementwise, so updating a slice equals updating the whole tensor; the ranges are then all-gathered
  back into the parameters.
- `optimizer_state` / `load_optimizer_state`: AdamW state in a layout-independent form, one entry per
  parameter shaped like the local parameter (what checkpoints store).

Frozen parameters (requires_grad False: LoRA's base model) take no part: no gradient is averaged for them,
they hold no optimizer state, and checkpoints store none for them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from graphllm.errors import GraphllmError
from graphllm.planning.sharding import shard_of

STATE_KEYS = ("exp_avg", "exp_avg_sq")
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s guard against a zero norm
# torch 2.13 renamed all_gather_into_tensor (now deprecated, with a warning) to all_gather_single
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _unique(params) -> list[nn.Parameter]:
    """Parameters in first-seen order, each once (tied weights appear under several names)."""
    return list({id(p): p for p in params}.values())


def _size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def wire_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype gradients of `dtype` are averaged in: fp32 for bf16/fp16 gradients (--params-dtype bf16), as
    Megatron does for bf16 (arguments.py: bf16 forces accumulate_allreduce_grads_in_fp32). A bf16 sum rounds to 8
    mantissa bits at every partial sum of the reduction (dp - 1 roundings, in an order that depends on the
    collective's algorithm); in fp32 the mean is rounded once, when written back into the bf16 gradient. It costs
    twice a bf16 all-reduce's bytes. Other dtypes travel as they are."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def reduce_gradients(params: Sequence[nn.Parameter], group: dist.ProcessGroup | None, *,
                     bucket_bytes: int = 25 * 2**20, divide_by: int | None = None) -> int:
    """Average `.grad` over `group` (sum, then divide by its size, or by `divide_by`) in flat per-dtype buckets of
    about `bucket_bytes` (bf16/fp16 gradients reduced in fp32: `wire_dtype`); a missing gradient counts as zeros
    and receives the average. Returns the number of buckets (0 when there is nothing to do)."""
    size = _size(group)
    divisor = divide_by or size
    if size == 1:
        for p in _unique(params):
            if divisor != 1 and p.grad is not None:
                p.grad.div_(divisor)
        return 0
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in _unique(params):
        if not p.requires_grad:
            continue  # frozen: no gradient to average (zeros would cost the whole base model's all-reduce)
        by_dtype.setdefault(p.grad.dtype if p.grad is not None else p.dtype, []).append(p)
    buckets: list[tuple[torch.dtype, list[nn.Parameter]]] = []
    for dtype, ps in by_dtype.items():
        bucket, used = [], 0
        for p in ps:
            nbytes = p.numel() * wire_dtype(dtype).itemsize
            if bucket and used + nbytes > bucket_bytes:
                buckets.append((dtype, bucket))
                bucket, used = [], 0
            bucket.append(p)
            used += nbytes
        buckets.append((dtype, bucket))
    pending = []
    for dtype, bucket in buckets:
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros(p.shape, dtype=dtype, device=p.device))
                          .reshape(-1).to(wire_dtype(dtype))
                          for p in bucket])  # [sum of the bucket's numels]
        pending.append((dtype, bucket, flat, dist.all_reduce(flat, group=group, async_op=True)))
    for dtype, bucket, flat, work in pending:
        work.wait()
        flat /= divisor
        for p, g in zip(bucket, flat.split([p.numel() for p in bucket])):
            if p.grad is None:
                p.grad = g.view(p.shape).to(dtype, copy=True)
            else:
                p.grad.copy_(g.view(p.shape))
    return len(buckets)


SHARD_GROUPS = (("tp",), ("ep",), ("ep", "tp"))
"""The groups parameters are sharded over (tensor and expert parallelism, and both: expert tensor parallelism);
their replicas hold equal shards."""


def reduce_replicas(params: Sequence[nn.Parameter], layout, group_of) -> None:
    """Average each gradient over the parameter's replicas: the dp (dp·cp) group, or for a shard of the experts
    (expert parallelism) its expert-data-parallel group (× cp). An expert shard's gradient already sums the gradients
    of the ep group's tokens (the dispatch's backward brought them), so it is divided by dp all the same."""
    experts = [p for p in params if (s := shard_of(p)) is not None and "ep" in s.groups]
    expert_ids = {id(p) for p in experts}
    dense = [p for p in params if id(p) not in expert_ids]
    reduce_gradients(dense, group_of(layout.grad_kind))
    # without expert tensor parallelism each tp rank routed 1/tp of the tokens (passes/expert_parallel.py): add
    # them up; an expert-tensor-parallel shard's gradient is whole already (every tp rank saw every token)
    token_split = [p for p in experts if "tp" not in shard_of(p).groups]
    if token_split and layout.tp > 1 and not layout.sequence_parallel:  # (under it the graph's tp_copy sums them)
        reduce_gradients(token_split, group_of("tp"), divide_by=1)
    if experts:
        reduce_gradients(experts, group_of(layout.expert_grad_kind), divide_by=layout.group_size(layout.grad_kind))


def _group(st, kind: str) -> dist.ProcessGroup | None:
    """This rank's group of `kind`, or None when there is no state or the group has one rank."""
    if st is None or st.layout.group_size(kind) == 1:
        return None
    return st.group(kind)


def grad_norm(named_params: dict[str, nn.Parameter], st) -> torch.Tensor:
    """Global L2 norm (fp32 scalar, on the parameters' device) of the whole model's gradient, the same on every
    rank."""
    params = _unique(named_params.values())
    device = params[0].device if params else torch.device("cpu")  # nccl/hccl reduce device tensors only
    by_group = {kind: torch.zeros((), dtype=torch.float32, device=device) for kind in SHARD_GROUPS}
    whole = torch.zeros((), dtype=torch.float32, device=device)
    for p in params:
        if p.grad is None:
            continue
        sq = p.grad.detach().float().pow(2).sum()
        shard = shard_of(p)
        groups = tuple(level.group for level in shard.levels if level.count > 1) if shard is not None else ()
        if not groups:
            whole += sq
        elif groups in by_group:
            by_group[groups] += sq
        else:  # another shard group would need its own reduction, in the same order on every rank
            raise GraphllmError(f"grad_norm: a parameter is sharded over {'×'.join(groups)}; only "
                                f"{', '.join('×'.join(g) for g in SHARD_GROUPS)} shards are supported")
    for groups, sq in by_group.items():  # the same order on every rank
        for kind in groups:  # a shard over ep × tp: summed over both
            if (g := _group(st, kind)) is not None:
                dist.all_reduce(sq, group=g)
    sharded = sum(by_group.values())
    total = sharded + whole
    if (pp := _group(st, "pp")) is not None:
        dist.all_reduce(total, group=pp)
    return total.sqrt()


def clip_grad_norm(named_params: dict[str, nn.Parameter], max_norm: float, st,
                   duplicates: frozenset[str] = frozenset()) -> float:
    """torch.nn.utils.clip_grad_norm_ over the global norm (max_norm ≤ 0 or inf: no clipping); returns the
    norm before clipping. `duplicates`: parameters another pipeline rank holds too and counts in the norm."""
    norm = grad_norm({n: p for n, p in named_params.items() if n not in duplicates}, st)
    if max_norm > 0 and math.isfinite(max_norm):
        coef = torch.clamp(max_norm / (norm + CLIP_EPS), max=1.0)
        grads = [p.grad for p in _unique(named_params.values()) if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, coef)
    return float(norm)


@dataclass(slots=True)
class _Piece:
    """The part of one parameter inside this rank's range."""

    param: nn.Parameter
    lo: int  # [lo, hi) in the parameter's flat index space
    hi: int
    at: int  # offset of lo in this rank's range
    tensor: torch.Tensor  # fp32: a view of the parameter, or a master copy when the parameter is not fp32
    is_view: bool


class RangeSharded:
    """The trainable parameters laid end to end in one index space, cut into `group`-size near-equal ranges: this
    rank's [start, end). What ZeroAdamW and master_weights.MasterAdamW share: the ranges, the all-gather of the
    updated ranges into the parameters, zero_grad."""

    def __init__(self, named_params: dict[str, nn.Parameter], group: dist.ProcessGroup | None):
        self.params = [p for p in _unique(named_params.values()) if p.requires_grad]
        if not self.params:
            raise GraphllmError(f"{type(self).__name__} got no trainable parameters")
        self.group = group if _size(group) > 1 else None
        self.world = _size(self.group)
        rank = dist.get_rank(self.group) if self.group is not None else 0
        self.offsets = list(itertools.accumulate((p.numel() for p in self.params), initial=0))
        self.total = self.offsets[-1]
        self.shard = -(-self.total // self.world)  # range length; the last range is padded to it
        self.start, self.end = min(self.total, rank * self.shard), min(self.total, (rank + 1) * self.shard)
        dtypes = {p.dtype for p in self.params}
        self.dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32  # of the all-gathered buffer
        self.device = self.params[0].device  # the ranges and the all-gather buffer live beside the parameters

    def range_of(self, p: nn.Parameter, offset: int) -> tuple[int, int]:
        """[lo, hi) of `p`'s flat index space inside this rank's range (lo ≥ hi: none of it)."""
        return max(self.start, offset) - offset, min(self.end, offset + p.numel()) - offset

    def publish(self, local: torch.Tensor) -> None:
        """All-gather every rank's updated range (`local`, [shard] in self.dtype) into the parameters."""
        full = local
        if self.group is not None:
            full = torch.empty(self.shard * self.world, dtype=self.dtype, device=self.device)
            _all_gather(full, local, group=self.group)
        chunks = full[:self.total].split([p.numel() for p in self.params])
        torch._foreach_copy_(self.params, [c.view(p.shape).to(p.dtype) for c, p in zip(chunks, self.params)])

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()


class ZeroAdamW(RangeSharded):
    """AdamW whose states and update are sharded over the data-parallel `group` (ZeRO-1).

    Parameter groups, decay only on matrices, and the update are those of graphllm.train.make_optimizer's
    AdamW(fused=True); `.grad` must already be averaged over `group` when `step()` runs. With context
    parallelism the gradients are averaged over dp × cp and the states stay sharded over dp only: the cp
    replicas of each dp group run the same update on the same gradients."""

    def __init__(self, named_params: dict[str, nn.Parameter], *, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, group: dist.ProcessGroup | None):
        super().__init__(named_params, group)
        self.pieces: list[_Piece] = []
        for p, offset in zip(self.params, self.offsets):
            lo, hi = self.range_of(p, offset)
            if lo >= hi:
                continue
            is_view = p.dtype == torch.float32 and p.is_contiguous()
            # a view makes AdamW update the parameter itself, so a checkpoint load into the parameter
            # is seen at once; other dtypes keep an fp32 master copy (refreshed by load_optimizer_state)
            t = p.detach().view(-1)[lo:hi] if is_view else p.detach().reshape(-1)[lo:hi].to(torch.float32, copy=True)
            self.pieces.append(_Piece(p, lo, hi, offset + lo - self.start, t, is_view))
        groups = [{"params": [x.tensor for x in self.pieces if x.param.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [x.tensor for x in self.pieces if x.param.dim() < 2], "weight_decay": 0.0}]
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        if self.pieces:
            fused = self.device.type != "meta"  # the fused kernel exists for real devices (meta: device tests)
            self.inner: torch.optim.AdamW | None = torch.optim.AdamW(groups, **defaults, fused=fused)
            self.param_groups = self.inner.param_groups
        else:  # this rank's range is empty (fewer elements than ranks): nothing to update, lr still settable
            self.inner = None
            self.param_groups = [{**defaults, **g} for g in groups]

    @torch.no_grad()
    def step(self) -> None:
        """Update this rank's range from the parameters' gradients, then all-gather every range."""
        for x in self.pieces:  # a parameter without a gradient is skipped, as torch.optim.AdamW does
            g = x.param.grad
            x.tensor.grad = None if g is None else g.reshape(-1)[x.lo:x.hi].to(torch.float32)
        if self.inner is not None:
            self.inner.step()
        local = torch.zeros(self.shard, dtype=self.dtype, device=self.device)  # this rank's range, updated
        for x in self.pieces:
            x.tensor.grad = None
            local[x.at:x.at + x.hi - x.lo] = x.tensor
        self.publish(local)

    def sync_from_params(self) -> None:
        """Refresh master copies from the parameters (after the parameters were written, e.g. loaded)."""
        with torch.no_grad():
            for x in self.pieces:
                if not x.is_view:
                    x.tensor.copy_(x.param.detach().reshape(-1)[x.lo:x.hi])

    def state_numel(self) -> int:
        """Elements of AdamW state (exp_avg, exp_avg_sq) this rank holds."""
        if self.inner is None:
            return 0
        return sum(v.numel() for s in self.inner.state.values() for k, v in s.items() if k in STATE_KEYS)


def optimizer_state(opt: Any, named_params: dict[str, nn.Parameter]) -> dict:
    """{"step": int, "state": {fqn: {"exp_avg", "exp_avg_sq"}}}, tensors shaped like the local params.

    For a ZeroAdamW this is collective over its group (the ranges are all-gathered). A trainable parameter
    without state gets zeros, a frozen one no entry; "step" is the largest step of any parameter (0 when none
    stepped). An optimizer with fp32 master weights (master_weights.MasterAdamW) answers itself and adds
    "master": {fqn: fp32 master} for its non-fp32 parameters."""
    if hasattr(opt, "gathered_state"):
        return opt.gathered_state(named_params)
    out: dict[str, dict[str, torch.Tensor]] = {}
    named_params = {n: p for n, p in named_params.items() if p.requires_grad}
    if isinstance(opt, ZeroAdamW):
        local = torch.zeros(len(STATE_KEYS), opt.shard)  # [state key, this rank's range]
        step = 0
        for x in opt.pieces:
            s = opt.inner.state.get(x.tensor, {}) if opt.inner is not None else {}
            for i, k in enumerate(STATE_KEYS):
                if k in s:
                    local[i, x.at:x.at + x.hi - x.lo] = s[k]
            step = max(step, int(s.get("step", 0)))
        full, step_t = local, torch.tensor(step, dtype=torch.int64)
        if opt.group is not None:
            full = torch.empty(opt.world * len(STATE_KEYS), opt.shard)  # [rank * state key, range]
            _all_gather(full, local, group=opt.group)
            dist.all_reduce(step_t, op=dist.ReduceOp.MAX, group=opt.group)
            full = full.view(opt.world, len(STATE_KEYS), -1).transpose(0, 1).reshape(len(STATE_KEYS), -1)
        where = {id(p): off for p, off in zip(opt.params, opt.offsets)}
        for name, p in named_params.items():
            off = where.get(id(p))
            out[name] = {k: (full[i, off:off + p.numel()].view(p.shape).clone() if off is not None
                             else torch.zeros(p.shape)) for i, k in enumerate(STATE_KEYS)}
        return {"step": int(step_t), "state": out}
    step = 0
    for name, p in named_params.items():
        s = opt.state.get(p, {})
        out[name] = {k: (s[k].detach().clone() if k in s else torch.zeros_like(p, dtype=torch.float32))
                     for k in STATE_KEYS}
        step = max(step, int(s.get("step", 0)))
    return {"step": step, "state": out}


def _entry(d: dict, name: str, p: torch.Tensor) -> dict:
    src = d["state"].get(name)
    if src is None:
        raise GraphllmError(f"the optimizer state has no entry for parameter {name!r}; load a state saved from this model")
    for k in STATE_KEYS:
        if tuple(src[k].shape) != tuple(p.shape):
            raise GraphllmError(f"optimizer state {name}/{k} has shape {tuple(src[k].shape)} but the parameter has "
                                f"{tuple(p.shape)}; the state must be shaped like this rank's parameter")
    return src


def load_optimizer_state(opt: Any, named_params: dict[str, nn.Parameter], d: dict) -> None:
    """Inverse of `optimizer_state` into this rank's optimizer (a ZeroAdamW takes its own pieces).

    Call it after the parameters were loaded: a ZeroAdamW refreshes its master copies from them."""
    if hasattr(opt, "load_gathered_state"):
        opt.load_gathered_state(named_params, d)
        return
    step = torch.tensor(float(d["step"]), dtype=torch.float32)
    if isinstance(opt, ZeroAdamW):
        opt.sync_from_params()
        names = {id(p): n for n, p in named_params.items()}
        for x in opt.pieces:
            src = _entry(d, names[id(x.param)], x.param)
            opt.inner.state[x.tensor] = {"step": step.clone(),
                                         **{k: src[k].reshape(-1)[x.lo:x.hi].to(torch.float32, copy=True)
                                            for k in STATE_KEYS}}
        return
    managed = {id(p) for g in opt.param_groups for p in g["params"]}
    for name, p in named_params.items():
        if id(p) in managed:  # torch's state_dict() refuses state of parameters it does not hold
            src = _entry(d, name, p)
            opt.state[p] = {"step": step.clone(), **{k: src[k].to(p.dtype, copy=True) for k in STATE_KEYS}}
