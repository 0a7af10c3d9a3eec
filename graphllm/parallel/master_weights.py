"""AdamW on fp32 master weights: bf16 parameters (Megatron's O2), ZeRO-1 sharding, optimizer offload.

`MasterAdamW` is the optimizer `Engine.make_optimizer` builds for `--params-dtype bf16` or `--offload-optimizer`
(plain fp32 training keeps torch's fused AdamW or optim.ZeroAdamW):

- The parameters (and so the gradients and the graph's matmuls) may be bf16. For each trainable element this rank
  updates, the optimizer keeps an fp32 master weight and fp32 exp_avg / exp_avg_sq, steps on the master with the
  gradient widened to fp32 — torch's fused AdamW kernel (`torch._fused_adamw_`, what AdamW(fused=True) runs), so
  the update is bitwise torch AdamW's on fp32 copies — and writes the master, rounded, back into the parameter.
  An fp32 parameter is its own master (a view: nothing is copied).
- ZeRO-1: all parameters are laid end to end in one index space cut into `group`-size near-equal ranges (as
  optim.ZeroAdamW); a rank keeps masters and moments for its range only, and after the update the ranges are
  all-gathered, in the parameters' dtype (bf16: half the bytes of an fp32 all-gather), into every rank's params.
- Offload: masters and moments live in host memory between steps (graphllm.parallel.offload: pinned where the
  device has pinned memory) and are streamed through the device for the step, `chunk_numel` elements at a time:
  copied in without waiting, updated, copied back without waiting; one wait at the end of the step makes the host
  copies complete. The device holds one chunk's master, moments and fp32 gradient at a time.
- State (`gathered_state` / `load_gathered_state`, which optim.optimizer_state / load_optimizer_state call) is
  per parameter and layout-independent, like optim's; it also carries the fp32 masters of non-fp32 parameters
  under "master", which the checkpoint stores as the model's weights (graphllm.parallel.checkpoint), so a
  checkpoint of a bf16 run is an fp32 model any layout, at either params dtype, resumes exactly.

Masters are taken from the parameters at the first step (or from a loaded state), so weights loaded after the
optimizer was built (a weights-only checkpoint) are what it trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from graphllm.errors import GraphllmError
from graphllm.parallel import offload as off
from graphllm.parallel.optim import STATE_KEYS, RangeSharded, _all_gather, _entry
from graphllm.planning.optimizer_memory import OFFLOAD_CHUNK_NUMEL

MASTER = "master"
"""gathered_state's key of the fp32 master weights (non-fp32 parameters only)."""


@dataclass(slots=True)
class _Segment:
    """A part of one parameter inside this rank's range, within one streamed chunk."""

    param: nn.Parameter
    lo: int  # [lo, hi) in the parameter's flat index space
    hi: int
    at: int  # offset of lo in this rank's range
    decay: bool  # a matrix: weight decay applies (norms and biases: none), as graphllm.train.decay_groups
    master: torch.Tensor  # fp32 [hi - lo]: a view of an fp32 parameter, else a copy (on the host when offloaded)
    exp_avg: torch.Tensor  # fp32 [hi - lo], beside the master
    exp_avg_sq: torch.Tensor
    step: torch.Tensor  # fp32 scalar on the device: what the fused kernel counts (as torch.optim.AdamW keeps it)
    is_view: bool  # `master` is the parameter itself (fp32 and contiguous): nothing to copy or stream


class MasterAdamW(RangeSharded):
    """AdamW with fp32 master weights and moments for this rank's range of the parameters (all of them without
    ZeRO-1), optionally offloaded to host memory. `.grad` must already be averaged over the data-parallel group."""

    def __init__(self, named_params: dict[str, nn.Parameter], *, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, group: dist.ProcessGroup | None, offload: bool = False,
                 chunk_numel: int = OFFLOAD_CHUNK_NUMEL):
        if chunk_numel < 1:
            raise GraphllmError(f"MasterAdamW chunk_numel must be ≥ 1, got {chunk_numel}")
        super().__init__(named_params, group)
        self.offload = offload
        # resident or offloaded, the same chunks: offload changes where the state lives, never the arithmetic (the
        # fused kernel's vector loop and scalar tail fall differently on differently cut slices: ulps apart)
        self.chunk_numel = chunk_numel
        self.segments = [s for p, offset in zip(self.params, self.offsets) for s in self._cut(p, offset)]
        chunks: dict[int, list[_Segment]] = {}
        for s in self.segments:
            chunks.setdefault(s.at // self.chunk_numel, []).append(s)
        self.chunks = list(chunks.values())
        defaults = {"lr": lr, "betas": betas, "eps": eps}
        self.param_groups = [{**defaults, "weight_decay": weight_decay}, {**defaults, "weight_decay": 0.0}]
        """[matrices, the rest], as graphllm.train.decay_groups; the loop sets "lr" before each step."""
        self._fresh = True  # masters are (re)taken from the parameters at the first step unless a state is loaded

    def _cut(self, p: nn.Parameter, offset: int) -> list[_Segment]:
        """`p`'s part of this rank's range, cut where a chunk ends."""
        lo, hi = self.range_of(p, offset)
        home = off.HOST if self.offload else self.device
        is_view = p.dtype == torch.float32 and p.is_contiguous()
        flat = p.detach().view(-1) if is_view else p.detach().reshape(-1)
        out = []
        while lo < hi:
            at = offset + lo - self.start
            b = min(hi, lo + self.chunk_numel - at % self.chunk_numel)
            n = b - lo
            if is_view:
                master = flat[lo:b]  # the parameter is its own master
            elif self.offload:
                master = off.host_copy(flat[lo:b], self.device)
            else:
                master = flat[lo:b].to(torch.float32, copy=True)
            state = [off.host_zeros(n, self.device) if self.offload else torch.zeros(n, device=home) for _ in range(2)]
            out.append(_Segment(p, lo, b, at, p.dim() >= 2, master, *state,
                                torch.zeros((), dtype=torch.float32, device=self.device), is_view))
            lo = b
        return out

    @torch.no_grad()
    def step(self) -> None:
        """Update this rank's range, chunk by chunk, from the parameters' gradients; then all-gather the ranges."""
        if self._fresh:
            self.sync_from_params()
        local = torch.zeros(self.shard, dtype=self.dtype, device=self.device)  # this rank's range, updated
        for chunk in self.chunks:
            self._step_chunk(chunk, local)
        if self.offload:
            off.wait(self.device)  # the host copies are complete before anything reads them (a checkpoint)
        self.publish(local)

    def _step_chunk(self, chunk: list[_Segment], local: torch.Tensor) -> None:
        copied = [s for s in chunk if self.offload and not s.is_view]
        masters = dict(zip(map(id, copied), off.to_device([s.master for s in copied], self.device)))
        master = [masters.get(id(s), s.master) for s in chunk]
        live = [i for i, s in enumerate(chunk) if s.param.grad is not None]  # no gradient: skipped, as AdamW does
        moments = [[chunk[i].exp_avg for i in live], [chunk[i].exp_avg_sq for i in live]]
        dev = [off.to_device(m, self.device) for m in moments] if self.offload else moments
        for group, decay in zip(self.param_groups, (True, False)):
            mine = [k for k, i in enumerate(live) if chunk[i].decay == decay]
            if not mine:
                continue
            steps = [chunk[live[k]].step for k in mine]
            torch._foreach_add_(steps, 1)
            beta1, beta2 = group["betas"]
            torch._fused_adamw_([master[live[k]] for k in mine],
                                [_grad(chunk[live[k]]) for k in mine],
                                [dev[0][k] for k in mine], [dev[1][k] for k in mine], [], steps,
                                lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                                eps=group["eps"], amsgrad=False, maximize=False)
        if self.offload:
            off.to_host([s.master for s in copied], [masters[id(s)] for s in copied])
            off.to_host(moments[0] + moments[1], dev[0] + dev[1])
        for s, m in zip(chunk, master):
            local[s.at:s.at + s.hi - s.lo] = m

    def sync_from_params(self) -> None:
        """Take the masters from the parameters (after the parameters were written without a state to load)."""
        with torch.no_grad():
            for s in self.segments:
                if not s.is_view:
                    s.master.copy_(s.param.detach().reshape(-1)[s.lo:s.hi])
        self._fresh = False

    def state_numel(self) -> int:
        """Elements of AdamW moments (exp_avg, exp_avg_sq) this rank holds."""
        return 2 * sum(s.hi - s.lo for s in self.segments)

    def master_numel(self) -> int:
        """Elements of fp32 master copies this rank holds (an fp32 parameter is its own master: none)."""
        return sum(s.hi - s.lo for s in self.segments if not s.is_view)

    def gathered_state(self, named_params: dict[str, nn.Parameter]) -> dict:
        """optim.optimizer_state's form (collective over the group): {"step", "state": {fqn: {exp_avg,
        exp_avg_sq}}, "master": {fqn: fp32 master}} — masters for non-fp32 parameters only, on the parameter's
        device (the checkpoint stores them in place of the parameter); the moments on the host when offloaded."""
        if self._fresh:
            self.sync_from_params()
        named = {n: p for n, p in named_params.items() if p.requires_grad}
        keys = STATE_KEYS + ((MASTER,) if self.dtype != torch.float32 else ())  # the same on every rank
        where = {id(p): off for p, off in zip(self.params, self.offsets)}
        out: dict = {"state": {n: {} for n in named}, MASTER: {}}
        for key in keys:  # one key at a time: the gathered buffer is 4 bytes per element, on the device
            local = torch.zeros(self.shard, dtype=torch.float32, device=self.device)
            for s in self.segments:
                t = s.master if key == MASTER else getattr(s, key)
                local[s.at:s.at + s.hi - s.lo] = t
            full = local
            if self.group is not None:
                full = torch.empty(self.shard * self.world, dtype=torch.float32, device=self.device)
                _all_gather(full, local, group=self.group)
            for name, p in named.items():
                o = where.get(id(p))
                if key == MASTER:
                    if o is not None and p.dtype != torch.float32:
                        out[MASTER][name] = full[o:o + p.numel()].view(p.shape).clone()
                    continue
                t = full[o:o + p.numel()].view(p.shape) if o is not None else torch.zeros(p.shape, device=self.device)
                out["state"][name][key] = t.to(off.HOST if self.offload else self.device, copy=True)
        step = torch.tensor(max((float(s.step) for s in self.segments), default=0.0), device=self.device)
        if self.group is not None:
            dist.all_reduce(step, op=dist.ReduceOp.MAX, group=self.group)
        out["step"] = int(step)
        return out

    def load_masters(self, named_params: dict[str, nn.Parameter], masters: dict[str, torch.Tensor]) -> None:
        """Take the masters of this rank's range from fp32 weights {fqn: tensor shaped like the local parameter}
        (a weights-only checkpoint: the moments stay fresh); parameters without one keep theirs."""
        names = {id(p): n for n, p in named_params.items()}
        self.sync_from_params()
        with torch.no_grad():
            for s in self.segments:
                m = masters.get(names[id(s.param)])
                if m is not None and not s.is_view:
                    s.master.copy_(m.reshape(-1)[s.lo:s.hi])

    def load_gathered_state(self, named_params: dict[str, nn.Parameter], d: dict) -> None:
        """Inverse of `gathered_state` into this rank's range; after the parameters were loaded. A state without
        masters (saved by an fp32 run, whose parameters are fp32 masters) takes them from the parameters."""
        names = {id(p): n for n, p in named_params.items()}
        masters = d.get(MASTER) or {}
        with torch.no_grad():
            for s in self.segments:
                name = names[id(s.param)]
                src = _entry(d, name, s.param)
                if not s.is_view:
                    m = masters.get(name, s.param.detach())
                    s.master.copy_(m.reshape(-1)[s.lo:s.hi])
                s.exp_avg.copy_(src["exp_avg"].reshape(-1)[s.lo:s.hi])
                s.exp_avg_sq.copy_(src["exp_avg_sq"].reshape(-1)[s.lo:s.hi])
                s.step.fill_(float(d["step"]))
        self._fresh = False


def _grad(s: _Segment) -> torch.Tensor:
    """The segment's gradient, widened to fp32 (a bf16 gradient's values are exact in fp32)."""
    return s.param.grad.reshape(-1)[s.lo:s.hi].to(torch.float32)
