"""One rank's measured side of benchmarks/plan_validation.py: peak memory and step times of a compiled plan.

Run by plan_validation.py, one process per rank (torchrun for several ranks; a plain subprocess for one), so every
rank starts from a fresh address space:

    python benchmarks/plan_measure.py --plan plan.json --out DIR [--steps 6 --warmup 2 --threads 1]

The rank builds the plan (graphllm.job.build: capture, passes, inductor compile, one warm-up step), makes the
plan's optimizer (ZeRO-1 when the plan says so), runs `--warmup` optimizer steps (the optimizer's states exist
from the first), then `--steps` timed steps, then one more step under the profiler for its memory. It writes
DIR/rank<r>.json.

What "measured peak memory" is (the figure compared with the prediction), per rank:

    allocator peak = live tensor bytes at a step's start + the peak, during that step, of the bytes torch's CPU
                     allocator handed out minus those it took back.

It is the CPU counterpart of `torch.cuda.max_memory_allocated()` over one steady-state step: tensor storage only
(parameters, gradients, optimizer states, saved activations, temporaries, communication and pipeline buffers),
without the Python/torch baseline, loaded kernels, or glibc's cached free memory. The live bytes at the step's
start are every CPU tensor storage reachable from Python (gc), each counted once; the in-step peak comes from
torch.profiler's allocation events (profile_memory: every allocation and free of the CPU allocator, inductor's
buffers included). Frees of blocks allocated before the profiler started are not reported to it (the previous
step's batch), so the in-step peak can only err upward, by at most those blocks; tensors alive at the step's start
that only C++ holds (a communication library's own buffers) are not in the start figure. The step's
phases (forward, backward, clip, optimizer) are profiler ranges around the engine's and optimizer's calls, so the
result says in which phase the peak falls and what the first forward leaves allocated (`forward_held`).

Reported beside it, for reference, not compared: RSS growth = VmHWM over the timed steps (the high-water mark is
reset after the warm-up steps by writing 5 to /proc/self/clear_refs, so compile's own peak is not in it) minus the
RSS after imports; it includes compile's leftovers (Dynamo/inductor state, loaded kernels) and allocator slack.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` when run as a script
from common import current_rss_bytes, ensure_inductor_cache, peak_rss_bytes  # noqa: E402


def live_tensor_bytes() -> int:
    """Bytes of every CPU tensor storage reachable from Python, each storage once (fake and meta tensors skipped)."""
    gc.collect()
    seen: set[int] = set()
    total = 0
    for obj in gc.get_objects():
        if type(obj) not in (torch.Tensor, torch.nn.Parameter) or obj.device.type != "cpu":
            continue
        try:
            storage = obj.untyped_storage()
            ptr = storage.data_ptr()
        except (RuntimeError, NotImplementedError):  # FakeTensor / FunctionalTensor wrappers hold no memory
            continue
        if ptr and ptr not in seen:
            seen.add(ptr)
            total += storage.nbytes()
    return total


PHASE_PREFIX = "plan_validation::"


def mark_phase(obj, attr: str, phase: str) -> None:
    """Wrap `obj.attr` (a method or callable attribute) in a profiler range named PHASE_PREFIX + phase."""
    fn = getattr(obj, attr)

    def marked(*args, **kwargs):
        with torch.profiler.record_function(PHASE_PREFIX + phase):
            return fn(*args, **kwargs)
    setattr(obj, attr, marked)


def allocation_peak(run) -> tuple[object, dict]:
    """Run `run()` under torch.profiler's memory tracking. Returns its result and, in bytes above the level at the
    start: `peak` (of allocated − freed), `peak_phase` (the innermost marked phase holding that moment; "backward"
    is forward_backward outside any forward), `phase_peaks`, `forward_held` (what the first forward leaves
    allocated: its saved activations and outputs), `events`."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = run()
    allocs, phases, stack = [], [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            allocs.append((e.start_time_ns, e.extra_fields.alloc_size))
        elif e.name.startswith(PHASE_PREFIX):
            phases.append((e.start_time_ns, e.end_time_ns, e.name[len(PHASE_PREFIX):]))
        stack.extend(e.children)
    phases.sort()

    def phase_at(t: int) -> str:
        inside = [name for t0, t1, name in phases if t0 <= t <= t1]
        if inside and inside[-1] == "forward_backward":
            return "backward"
        return inside[-1] if inside else "other"

    running = peak = 0
    peak_phase, phase_peaks, level_at = "none", {}, []
    for t, size in sorted(allocs):
        running += size
        level_at.append((t, running))
        name = phase_at(t)
        phase_peaks[name] = max(phase_peaks.get(name, 0), running)
        if running > peak:
            peak, peak_phase = running, name
    forwards = [(t0, t1) for t0, t1, name in phases if name == "forward"]
    held = None
    if forwards:
        t0, t1 = forwards[0]
        held = _level(level_at, t1) - _level(level_at, t0)
    return out, {"peak": peak, "peak_phase": peak_phase, "phase_peaks": phase_peaks, "forward_held": held,
                 "events": len(allocs)}


def _level(levels: list[tuple[int, int]], t: int) -> int:
    """The running level at time `t` (after the last allocation event at or before it)."""
    return next((lv for when, lv in reversed(levels) if when <= t), 0)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def optimizer_state_bytes(opt) -> int:
    inner = getattr(opt, "inner", opt)  # ZeroAdamW wraps a torch AdamW over this rank's ranges
    inner = inner if inner is not None else opt
    return sum(t.numel() * t.element_size() for s in getattr(inner, "state", {}).values() for t in s.values()
               if isinstance(t, torch.Tensor))


def measure(plan_dict: dict, *, steps: int, warmup: int) -> dict:
    """Build the plan on this rank, run warm-up + timed + one profiled step; the figures of the module docstring."""
    from graphllm.job import build
    from graphllm.plan import CompilePlan
    from graphllm.report import rank_memory
    from graphllm.train import TrainConfig, train_steps

    rss_imports = current_rss_bytes()
    plan = CompilePlan.from_json(plan_dict, "plan_validation")
    t0 = time.perf_counter()
    built = build(plan)
    build_s = time.perf_counter() - t0
    cfg = TrainConfig(steps=warmup + steps + 1, lr=1e-4, warmup_steps=1)
    engine = built.engine
    opt = engine.make_optimizer(cfg)
    for obj, attr, phase in ((engine, "forward_backward", "forward_backward"), (engine, "step_fn", "forward"),
                             (engine, "clip_grad_norm", "clip"), (opt, "step", "optimizer")):
        if getattr(obj, attr, None) is not None:
            mark_phase(obj, attr, phase)
    it = train_steps(engine, random_batches(plan, built.model.config.vocab_size), cfg, optimizer=opt)
    for _ in range(warmup):
        next(it)
    probe = rank_probe()
    hwm_reset = reset_peak_rss()
    times = [next(it)["step_time_s"] for _ in range(steps)]
    rss_hwm = peak_rss_bytes()
    live = live_tensor_bytes()
    rec, step = allocation_peak(lambda: next(it))
    return {
        "rank": built.rank, "world_size": plan.layout.world_size, "coords": _coords(built),
        "threads": torch.get_num_threads(), "probe": probe, "build_s": build_s, "step_times_s": times,
        "median_step_s": statistics.median(times), "profiled_step_s": rec["step_time_s"], "loss": rec["loss"],
        "memory": {"live_at_step_start": live, "in_step_peak": step["peak"], "allocator_peak": live + step["peak"],
                   "peak_phase": step["peak_phase"], "phase_peaks": step["phase_peaks"],
                   "forward_held": step["forward_held"], "allocation_events": step["events"],
                   "parameters": sum(p.numel() * p.element_size() for p in engine.params),
                   "optimizer_states": optimizer_state_bytes(opt), "rss_after_imports": rss_imports,
                   "rss_hwm_steady": rss_hwm, "rss_growth_peak": rss_hwm - rss_imports, "hwm_reset": hwm_reset},
        "report_memory": rank_memory(built),
    }


def rank_probe() -> dict[str, float]:
    """The planner's cpu probe (graphllm.planner.devices.cpu_spec: matmul FLOP/s, copy and link bytes/s) taken in this
    rank, right before its timed steps: the rates this rank had under the machine's load then (ranks share cores)."""
    try:
        from graphllm.planner.devices import cpu_spec
    except ImportError:
        return {}
    spec = cpu_spec(threads=torch.get_num_threads(), refresh=True)
    out = {"peak_flops": spec.peak_flops, "hbm_bandwidth": spec.hbm_bandwidth,
           "link_bandwidth": spec.intra_node_bandwidth, "collective_latency": spec.collective_latency}
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        out.update(gloo_probe())
    return out


def gloo_probe(nbytes: int = 16 * 2**20) -> dict[str, float]:
    """The world group's own collective rates now, every rank taking part: the median seconds of a 4-byte all_reduce
    (the per-call α) and the bus bytes/s of an `nbytes` one (a ring all_reduce moves 2(n−1)/n of its payload)."""
    import torch.distributed as dist

    n = dist.get_world_size()

    def median_s(x: torch.Tensor, repeats: int) -> float:
        times = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    alpha = median_s(torch.ones(1), 20)
    big = median_s(torch.ones(nbytes // 4), 3)
    return {"collective_latency": alpha, "link_bandwidth": 2 * (n - 1) / n * nbytes / max(big - alpha, 1e-9)}


def random_batches(plan, vocab: int):
    """step → (input_ids, labels) of the plan's global batch, the same on every rank (each takes its rows)."""
    gen = torch.Generator().manual_seed(1234)

    def batch_at(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(0, vocab, (plan.global_batch_size, plan.seq_len + 1), generator=gen)
        return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    return batch_at


def _coords(built) -> dict[str, int]:
    st = built.engine.st
    c = st.coords if st is not None else None
    return {k: getattr(c, k, 0) for k in ("pp", "dp", "tp", "cp")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", type=Path, required=True, help="a CompilePlan as JSON (CompilePlan.to_json)")
    ap.add_argument("--out", type=Path, required=True, help="directory for rank<r>.json")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    args = ap.parse_args()
    ensure_inductor_cache()
    torch.set_num_threads(args.threads)
    for module in ("graphllm.job", "torch._inductor.compile_fx"):  # before the RSS baseline: not the plan's memory
        importlib.import_module(module)

    result = measure(json.loads(args.plan.read_text()), steps=args.steps, warmup=args.warmup)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{result['rank']}.json").write_text(json.dumps(result, indent=1))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
