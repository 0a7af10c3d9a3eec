"""The enumeration behind `graphllm plan`: tp × cp × pp × vpp × dp × micro-batch × recompute × ZeRO-1 on a
number of devices, each layout checked by graphllm's own Layout rules, each priced by graphllm.planner.predict.

A mixture-of-experts model adds ep (divisors of dp that divide the expert count) × the token dispatcher at
ep > 1 × expert tensor parallelism at tp > 1 (--etp 1 or tp), each measured on its own graphs (the expert-parallel pass on the fake process group: the rank's expert
shard, its dispatch buffers and collectives). bf16 parameters and optimizer offload are priced
through `MemoryOptions` (graphllm/planner/predict.py): `memory_options` makes `Space.options` from the features
`graphllm plan --memory-features` names. Activation offload is not enumerated: how much of the saved bytes a policy
moves is known only from its own partition, which the measurements do not run.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from graphllm.errors import GraphllmError
from graphllm.planner.devices import DeviceSpec
from graphllm.planner.measure import Key, Measurement, measure_group
from graphllm.planner.predict import MemoryOptions, Prediction, estimate
from graphllm.planning.layout import Layout

RECOMPUTE_CHOICES = ("none", "selective", "full")
MBS_CHOICES = (1, 2, 4, 8)
VPP_CHOICES = (1, 2, 4)
MIN_CP_TOKENS = 4096
"""Context parallelism is enumerated only while each rank keeps at least this many tokens of a row."""


@dataclass(kw_only=True)
class Space:
    """What the search may choose; None: the defaults described on each field."""

    tp: tuple[int, ...] | None = None
    """Default: divisors of the device count up to the devices of one node."""
    cp: tuple[int, ...] | None = None
    """Default: divisors of the device count leaving each rank ≥ MIN_CP_TOKENS tokens of a row."""
    mbs: tuple[int, ...] = MBS_CHOICES
    vpp: tuple[int, ...] = VPP_CHOICES
    recompute: tuple[str, ...] = RECOMPUTE_CHOICES
    zero1: tuple[bool, ...] = (False, True)
    ep: tuple[int, ...] | None = None
    """Default (an MoE model): the divisors of dp that divide its experts; a dense model: 1."""
    dispatchers: tuple[str, ...] = ("allgather", "alltoall")
    """--moe-dispatcher choices tried at ep > 1."""
    expert_tp: tuple[bool, ...] = (False, True)
    """At tp > 1 with an MoE model: experts whole on each tp rank (--etp 1), split over tp (--etp = --tp), or both."""
    capacity_factor: float | None = None
    """--moe-capacity-factor of every MoE plan (None: dropless). A choice of the model's numerics, not of the
    layout, so it is priced as given rather than searched."""
    options: tuple[MemoryOptions, ...] = (MemoryOptions(),)
    """The extension point for bf16 parameters / offload: each is priced for every layout."""


@dataclass(kw_only=True)
class Candidate:
    layout: Layout
    mbs: int
    recompute: str
    prediction: Prediction
    fits: bool
    options: MemoryOptions = field(default_factory=MemoryOptions)
    dispatcher: str = "allgather"
    """--moe-dispatcher (read only at ep > 1)."""

    @property
    def tokens_per_second(self) -> float:
        return 0.0 if not self.prediction.step_seconds["total"] else \
            self.layout.dp * self.layout.micro_batches * self.mbs / self.prediction.step_seconds["total"]


@dataclass(kw_only=True)
class SearchResult:
    candidates: list[Candidate]
    """Every priced plan, fitting ones first, fastest first."""
    pruned: Counter
    """Why layouts were refused: the reason's first words → count."""
    measured: int
    """Graph captures made (one per tp × cp × params dtype; each partitioned once per recompute policy)."""
    seconds: float

    @property
    def fitting(self) -> list[Candidate]:
        return [c for c in self.candidates if c.fits]


MEMORY_FEATURES = ("params-bf16", "offload-optimizer")
"""What `graphllm plan --memory-features` may add to the search (each on and off)."""


def memory_options(features: tuple[str, ...]) -> tuple[MemoryOptions, ...]:
    """Every on/off combination of `features` (names of MEMORY_FEATURES), the plain plan first."""
    unknown = [f for f in features if f not in MEMORY_FEATURES]
    if unknown:
        raise GraphllmError(f"--memory-features {','.join(unknown)}: unknown; choose from {', '.join(MEMORY_FEATURES)}")
    dtypes = ("fp32", "bf16") if "params-bf16" in features else ("fp32",)
    offloads = (False, True) if "offload-optimizer" in features else (False,)
    return tuple(MemoryOptions(params_dtype=d, offload_optimizer=o) for d in dtypes for o in offloads)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_layouts(cfg, *, devices: int, seq_len: int, global_batch: int, spec: DeviceSpec,
                      space: Space) -> tuple[list[tuple[Layout, int]], Counter]:
    """(layout, micro-batch size) pairs graphllm accepts for `cfg`, and why the others were refused."""
    pruned: Counter = Counter()
    out = []
    tps = space.tp or tuple(d for d in divisors(devices) if d <= spec.devices_per_node)
    for tp in tps:
        if devices % tp:
            pruned[f"--tp {tp} does not divide {devices} devices"] += 1
            continue
        cps = space.cp or tuple(d for d in divisors(devices // tp) if d == 1 or seq_len // d >= MIN_CP_TOKENS)
        for cp in cps:
            if (devices // tp) % cp:
                pruned[f"tp×cp does not divide {devices} devices"] += 1
                continue
            for pp in divisors(devices // (tp * cp)):
                _layouts_at(cfg, tp, cp, pp, devices // (tp * cp * pp), seq_len, global_batch, space, out, pruned)
    return out, pruned


def _layouts_at(cfg, tp, cp, pp, dp, seq_len, global_batch, space, out, pruned) -> None:
    if cp > 1 and _moe(cfg) and space.capacity_factor is not None:
        pruned["--moe-capacity-factor with --cp"] += 1  # graphllm compile refuses it (MoeConfig.check_plan)
        return
    if global_batch % dp:
        pruned[f"--global-batch {global_batch} not divisible by dp"] += 1
        return
    for mbs in space.mbs:
        if (global_batch // dp) % mbs:
            pruned["rows per dp rank not divisible by the micro-batch size"] += 1
            continue
        m = global_batch // dp // mbs
        etps = tuple(dict.fromkeys(tp if split else 1 for split in space.expert_tp)) if tp > 1 and _moe(cfg) else (1,)
        for vpp, zero1, ep, etp in itertools.product(space.vpp if pp > 1 else (1,), space.zero1 if dp > 1 else (False,),
                                                     _eps(cfg, dp, space), etps):
            try:  # sequence parallelism with tp (with experts, not under a capacity factor: graphllm compile refuses it)
                sp = tp > 1 and (not _moe(cfg) or space.capacity_factor is None)
                layout = Layout(tp=tp, cp=cp, pp=pp, dp=dp, vpp=vpp, sequence_parallel=sp, zero1=zero1,
                                micro_batches=m, ep=ep, etp=etp)
                layout.check_model(cfg, batch_size=mbs, seq_len=seq_len)
            except GraphllmError as e:
                pruned[_reason(str(e))] += 1
                continue
            out.append((layout, mbs))


def _moe(cfg) -> bool:
    return getattr(cfg, "num_experts", 0) > 0


def _eps(cfg, dp: int, space: Space) -> tuple[int, ...]:
    if space.ep is not None:
        return space.ep
    return tuple(e for e in divisors(dp) if cfg.num_experts % e == 0) if _moe(cfg) else (1,)


def _reason(message: str) -> str:
    """A refusal's message up to its first ':' or ';' (the numbers differ, the rule does not)."""
    cut = min((i for i in (message.find(":"), message.find(";")) if i > 0), default=len(message))
    return message[:cut][:90]


def search(cfg, *, devices: int, spec: DeviceSpec, seq_len: int, global_batch: int, amp: str = "bf16",
           space: Space | None = None, jobs: int | None = None, cache_dir: Path | None = None,
           progress=None) -> SearchResult:
    """Price every accepted layout of `devices` devices; raise a one-line GraphllmError when none is accepted."""
    t0 = time.perf_counter()
    space = space or Space()
    if devices < 1 or global_batch < 1 or seq_len < 1:
        raise GraphllmError("--devices, --global-batch and --seq-len must be ≥ 1")
    if seq_len > cfg.max_position_embeddings:
        raise GraphllmError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings "
                            f"{cfg.max_position_embeddings}")
    layouts, pruned = enumerate_layouts(cfg, devices=devices, seq_len=seq_len, global_batch=global_batch, spec=spec,
                                        space=space)
    if not layouts:
        why = "; ".join(f"{r} ({n}×)" for r, n in pruned.most_common(3)) or "no choices"
        raise GraphllmError(f"no layout of {devices} devices fits the model and --global-batch {global_batch}: {why}")
    dtypes = {o.params_dtype for o in space.options}
    def key(lay: Layout, rc: str, dt: str, disp: str) -> Key:
        return Key(tp=lay.tp, cp=lay.cp, sp=lay.sequence_parallel, recompute=rc, mbs=1, seq_len=seq_len, amp=amp,
                   params_dtype=dt, min_cut=spec.min_cut, ep=lay.ep, moe_dispatcher=disp,
                   moe_capacity=space.capacity_factor, etp=lay.etp)

    def dispatchers(lay: Layout) -> tuple[str, ...]:
        return space.dispatchers if lay.ep > 1 else ("allgather",)

    keys = {key(lay, rc, dt, d) for lay, _ in layouts for rc in space.recompute for dt in dtypes
            for d in dispatchers(lay)}
    measured = measure_all(cfg, list(keys), jobs=jobs, cache_dir=cache_dir, progress=progress)
    cands = []
    for (layout, mbs), rc, opt in itertools.product(layouts, space.recompute, space.options):
        for disp in dispatchers(layout):
            m = measured[key(layout, rc, opt.params_dtype, disp)]
            p = estimate(cfg, layout, m, spec, mbs=mbs, seq_len=seq_len, amp=amp, scale=mbs, options=opt)
            cands.append(Candidate(layout=layout, mbs=mbs, recompute=rc, prediction=p,
                                   fits=p.memory["total"] <= spec.memory, options=opt, dispatcher=disp))
    cands.sort(key=lambda c: (not c.fits, c.prediction.step_seconds["total"] if c.fits
                              else c.prediction.memory["total"], c.options.count))  # fastest fitting, then smallest
    captures = len({dataclasses.replace(k, recompute="none") for k in keys})
    return SearchResult(candidates=cands, pruned=pruned, measured=captures, seconds=time.perf_counter() - t0)


def measure_all(cfg, keys: list[Key], *, jobs: int | None = None, cache_dir: Path | None = None,
                progress=None) -> dict[Key, Measurement]:
    """Every key measured (one capture per group of keys differing only in recompute), in `jobs` forked
    processes (default: the idle CPUs, at most 4)."""
    groups: dict[Key, list[Key]] = {}
    for k in keys:
        groups.setdefault(dataclasses.replace(k, recompute="none"), []).append(k)
    if jobs is None:
        idle = (os.cpu_count() or 1) - round(os.getloadavg()[0])
        jobs = max(1, min(idle, 4))
    jobs = min(jobs, len(groups))
    out: dict[Key, Measurement] = {}
    if jobs <= 1:
        for i, group in enumerate(groups.values()):
            out.update(measure_group(cfg, group, cache_dir=cache_dir))
            if progress:
                progress(i + 1, len(groups))
        return out
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # fork: the workers inherit the imported modules (no re-import); they allocate nothing (fake tensors)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("fork")) as pool:
        futures = [pool.submit(measure_group, cfg, group, cache_dir=cache_dir) for group in groups.values()]
        for i, f in enumerate(as_completed(futures)):
            out.update(f.result())
            if progress:
                progress(i + 1, len(groups))
    return out


def smallest(result: SearchResult) -> Candidate:
    """The candidate with the least memory on its worst rank."""
    return min(result.candidates, key=lambda c: c.prediction.memory["total"])


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def describe_misfit(result: SearchResult, spec: DeviceSpec) -> str:
    """One line: no layout fits; the smallest found and what dominates it."""
    c = smallest(result)
    mem = c.prediction.memory
    parts = ", ".join(f"{k} {gib(mem[k])}" for k in ("parameters", "gradients", "optimizer", "activations", "buffers"))
    return (f"no plan fits in {gib(spec.memory)} per device: the smallest, {c.layout.describe()} micro-batch {c.mbs} "
            f"recompute {c.recompute}, needs {gib(mem['total'])} on rank {c.prediction.rank} ({parts}); "
            f"{c.prediction.dominant} dominates — add devices, or a larger --device-memory")


