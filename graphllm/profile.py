"""`graphllm profile`: run an artifact's training step under torch.profiler and say where time goes.

Per rank: the top ops by self time with their FLOPs and achieved FLOP/s; time by the pass that
introduced each op (attributed by op name from the rank's graphs: a graphllm op to the pass that
created it, ATen ops to capture, inductor's fused kernels to "inductor (fused)"); compute vs
communication vs exposed communication; peak memory; model FLOP utilisation against this machine's
matmul peak (graphllm.step_log.device_peak: measured once per machine and cached). Writes a Chrome/Perfetto trace and a JSON summary per rank under
ARTIFACT/profile/. On an NPU the same number of steps then run under torch_npu.profiler, whose device
trace (CANN kernels, HCCL, AI Core utilisation) lands in ARTIFACT/profile/npu_rank<r>/.

Communication on the host is the time the training thread spends in collective ops; the part spent
waiting for a collective to finish (`wait_tensor`, a blocking gloo call) is exposed communication —
what no computation hid.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from graphllm.passes.manager import PASS_META_KEY
from graphllm.step_log import device_peak, flops_per_step, peak_rss_bytes

COMM_MARKERS = ("c10d", "all_reduce", "allreduce", "all_gather", "allgather", "reduce_scatter", "reducescatter",
                "gloo", "nccl", "hccl", "wait_tensor", "record_param_comms", "broadcast", "send", "recv")
WAIT_MARKERS = ("wait_tensor", "wait", "gloo:all_reduce", "gloo:all_gather", "gloo:reduce_scatter")
GRAPH_REGIONS = ("CompiledFunction", "Torch-Compiled Region", "## Call CompiledFxGraph", "PipelineStage", "stage")
"""Profiler ranges that enclose the compiled graphs' execution."""


def is_communication(name: str) -> bool:
    low = name.lower()
    return any(m in low for m in COMM_MARKERS)


def is_wait(name: str) -> bool:
    low = name.lower()
    return any(m in low for m in WAIT_MARKERS)


def _op_key(target: Any) -> str:
    """Profiler event name of an FX call target: aten.mm.default -> aten::mm."""
    name = getattr(target, "name", None)
    text = name() if callable(name) else str(target)
    return text.split(".")[0] if "::" in text else "::".join(text.split(".")[:2])


def op_origins(built) -> dict[str, str]:
    """Profiler op name -> the pass whose graph nodes call it (the most frequent, model graph first)."""
    votes: dict[str, Counter] = defaultdict(Counter)
    for n in built.result.model_graph.graph.nodes:
        if n.op == "call_function":
            votes[_op_key(n.target)][n.meta.get(PASS_META_KEY, "capture")] += 1
    for gm in built.result.train_stage.graphs.values():  # train passes' own nodes (aot's carry no pass)
        for n in gm.graph.nodes:
            if n.op == "call_function" and PASS_META_KEY in n.meta:
                votes[_op_key(n.target)][n.meta[PASS_META_KEY]] += 1
    return {op: c.most_common(1)[0][0] for op, c in votes.items()}


def origin_of(name: str, origins: dict[str, str]) -> str:
    if name in origins:
        return origins[name]
    if name.startswith(("cpp_fused", "triton_", "graph_")) or "inductor" in name.lower():
        return "inductor (fused)"
    if is_communication(name):
        return "communication"
    if name.startswith("aten::"):
        return "capture"
    return "runtime (graph glue)"


def by_origin(events, origins: dict[str, str]) -> dict[str, float]:
    """Self time per origin. An op inside a graphllm op (its kernel's ATen calls) counts for the pass
    that created the graphllm op; other ops inside the compiled step count by name (ATen ops for
    capture: the model and its autograd); ops outside it (optimizer, loop, data) are "runtime"."""
    out: Counter = Counter()
    for e in events:
        owner, in_graph, parent = e, False, e.cpu_parent
        while parent is not None:
            if parent.name.startswith("graphllm::"):
                owner = parent
            if parent.name.startswith(GRAPH_REGIONS):
                in_graph = True
            parent = parent.cpu_parent
        if owner is e and not in_graph and not e.name.startswith(GRAPH_REGIONS):
            origin = "communication" if is_communication(e.name) else "runtime (optimizer, loop)"
        else:
            origin = origin_of(owner.name, origins)
        out[origin] += e.self_cpu_time_total / 1e6
    return dict(out.most_common())


def summarize(prof, *, steps: int, step_times: list[float], flops_per_step: int, peak: float,
              origins: dict[str, str], top: int) -> dict[str, Any]:
    rows = []
    comm = exposed = total = 0.0
    for e in prof.key_averages():
        self_s = e.self_cpu_time_total / 1e6
        if self_s <= 0:
            continue
        total += self_s
        if is_communication(e.key):
            comm += self_s
            if is_wait(e.key):
                exposed += self_s
        rows.append({"op": e.key, "calls": e.count, "self_s": self_s, "flops": int(e.flops or 0),
                     "flop_per_s": (e.flops or 0) / self_s if self_s else 0.0})
    rows.sort(key=lambda r: -r["self_s"])
    step = statistics.median(step_times)
    return {
        "steps": steps, "median_step_s": step, "step_times_s": step_times,
        "flops_per_step": flops_per_step, "achieved_flop_per_s": flops_per_step / step,
        "measured_peak_flop_per_s": peak, "mfu": flops_per_step / step / peak,
        "self_time_s": total, "compute_s": total - comm, "communication_s": comm, "exposed_communication_s": exposed,
        "by_origin_s": by_origin(prof.events(), origins), "top_ops": rows[:top],
    }


def profile_built(built, out_dir: Path, *, steps: int, warmup: int, top: int, seed: int = 0) -> dict[str, Any]:
    """Warm up, then profile `steps` training steps of a built artifact on this rank."""
    from graphllm.train import TrainConfig

    plan = built.plan
    cfg = TrainConfig(steps=warmup + steps)
    opt = built.engine.make_optimizer(cfg)
    g = torch.Generator().manual_seed(seed)
    vocab = built.model.config.vocab_size
    rows = plan.global_batch_size
    from graphllm.job import example_batch

    positions = example_batch(plan, rows)[2:]  # (position_ids 0..S-1,) for an --eod-reset plan, else ()

    def one_step():
        ids = torch.randint(0, vocab, (rows, plan.seq_len), generator=g)
        labels = torch.randint(0, vocab, (rows, plan.seq_len), generator=g)
        built.engine.forward_backward(ids, labels, *positions)  # position_ids when the graph takes them
        built.engine.clip_grad_norm(cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        one_step()
    times = []
    with profile(activities=[ProfilerActivity.CPU], with_flops=True, profile_memory=True, record_shapes=False) as prof:
        for _ in range(steps):
            t0 = time.perf_counter()
            one_step()
            times.append(time.perf_counter() - t0)
    if plan.device == "npu":  # the device side: torch_npu's profiler over as many more steps
        from graphllm.npu_backend import npu_profile

        with npu_profile(out_dir / f"npu_rank{built.rank}"):
            for _ in range(steps):
                one_step()
    summary = summarize(prof, steps=steps, step_times=times, flops_per_step=flops_per_step(built),
                        peak=device_peak(plan.device, torch.bfloat16 if plan.amp == "bf16" else torch.float32),
                        origins=op_origins(built), top=top)
    from graphllm.profile_layers import by_layer

    summary["by_layer_s"] = by_layer(prof.events())  # empty unless the graphs carry layer_markers' ranges
    summary["peak_rss_bytes"] = peak_rss_bytes()
    summary["rank"] = built.rank
    out_dir.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out_dir / f"trace_rank{built.rank}.json"))
    (out_dir / f"summary_rank{built.rank}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


