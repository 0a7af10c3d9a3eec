"""`graphllm profile`: run an artifact's training step under torch.profiler and say where time goes.

Per rank: the top ops by self time with their FLOPs and achieved FLOP/s; time by the pass that
introduced each op; what the median step is made of; peak memory; model FLOP utilisation against this
machine's matmul peak (graphllm.step_log.device_peak: measured once per machine and cached). Writes a
Chrome/Perfetto trace and a JSON summary per rank under ARTIFACT/profile/. On an NPU the same number of
steps then run under torch_npu.profiler, whose device trace (CANN kernels, HCCL, AI Core utilisation)
lands in ARTIFACT/profile/npu_rank<r>/.

Each profiled step runs inside a `graphllm.profile/step` range on the training thread, and every figure
is a sum of self times inside those ranges, on the profiler's one clock, so the parts of a step add up
to the step (FIGURES says what each one is):
    step = compute + communication + no op,   exposed communication ⊆ communication.
Per-step figures are those of the median step (the lower middle one for an even count: a step that
ran), never a mean of the parts set against a median of the whole. A collective's work on gloo's own
threads is not on the training thread: only the time the training thread spends in collective ops
counts, and of that the time spent waiting for one to finish (`wait_tensor`, a blocking gloo call) is
exposed communication — what no computation hid.

Time by pass: an op inside a graphllm op (its kernel's ATen calls) counts for the pass that created the
graphllm op; an inductor kernel is shared among the passes of the nodes it fuses
(graphllm/profile_kernels.py); other ops inside the compiled step count by name (`op_origins`); ops
outside it are runtime (optimizer, loop).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from graphllm.passes.manager import PASS_META_KEY
from graphllm.profile_kernels import KERNEL, KernelOrigins, kernel_names_active, model_passes, node_passes, traced_pass
from graphllm.step_log import device_peak, flops_per_step, peak_rss_bytes

COMM_MARKERS = ("c10d", "all_reduce", "allreduce", "all_gather", "allgather", "reduce_scatter", "reducescatter",
                "gloo", "nccl", "hccl", "wait_tensor", "record_param_comms", "broadcast", "send", "recv")
WAIT_MARKERS = ("wait_tensor", "wait", "gloo:all_reduce", "gloo:all_gather", "gloo:reduce_scatter")
GRAPH_REGIONS = ("CompiledFunction", "Torch-Compiled Region", "## Call CompiledFxGraph", "PipelineStage", "stage")
"""Profiler ranges that enclose the compiled graphs' execution."""
STEP_RANGE = "graphllm.profile/step"
"""The range around each profiled training step."""
NO_OP = "no op (Python between ops, profiler)"
CHATTER = (b"USDT:", b"STAGE:")
"""Line prefixes of kineto's progress messages (profiler_start/stop, completed stages) on stderr."""
FIGURES = {
    "step_s": "wall time of the step (its graphllm.profile/step range)",
    "compute_s": "self time of every op in the step that is not a collective: the graphs, the optimizer, the loop",
    "communication_s": "self time of collective ops on the training thread (issuing and waiting)",
    "exposed_communication_s": "the part of communication spent waiting for a collective to finish",
    "no_op_s": "time in the step under no op: Python between ops and the profiler's own work",
}
"""What each per-step figure is; step = compute + communication + no op."""


def is_communication(name: str) -> bool:
    if KERNEL.match(name):  # a generated kernel's name lists its nodes, never a collective
        return False
    low = name.lower()
    return any(m in low for m in COMM_MARKERS)


def is_wait(name: str) -> bool:
    low = name.lower()
    return is_communication(name) and any(m in low for m in WAIT_MARKERS)


def _op_key(target: Any) -> str:
    """Profiler event name of an FX call target: aten.mm.default -> aten::mm."""
    name = getattr(target, "name", None)
    text = name() if callable(name) else str(target)
    return text.split(".")[0] if "::" in text else "::".join(text.split(".")[:2])


def _model_votes(built) -> dict[str, Counter]:
    """Profiler op name -> how many model graph nodes of each pass call it."""
    votes: dict[str, Counter] = defaultdict(Counter)
    for n in built.result.model_graph.graph.nodes:
        if n.op == "call_function":
            votes[_op_key(n.target)][n.meta.get(PASS_META_KEY, "capture")] += 1
    return votes


def model_op_origins(built) -> dict[str, str]:
    """Profiler op name -> the pass whose model graph nodes call it (the most frequent)."""
    return {op: c.most_common(1)[0][0] for op, c in _model_votes(built).items()}


def op_origins(built) -> dict[str, str]:
    """Profiler op name -> the pass whose graph nodes call it (the most frequent). The model graph votes,
    and so do the forward/backward graph nodes a train pass stamped. An op the model graph never calls
    (one that autograd or a graphllm op's decomposition brings in: aten::mm,
    aten::_scaled_dot_product_flash_attention_for_cpu_backward) is voted by the forward/backward graph
    nodes calling it, each for the pass it was traced from (graphllm.profile_kernels.traced_pass;
    capture for an op the lowered model graph calls directly)."""
    votes = _model_votes(built)
    named, model_ops = model_passes(built), set(votes)
    for gm in built.result.train_stage.graphs.values():
        for n in gm.graph.nodes:
            if n.op == "call_function" and (PASS_META_KEY in n.meta or _op_key(n.target) not in model_ops):
                votes[_op_key(n.target)][traced_pass(n, named) or "capture"] += 1
    return {op: c.most_common(1)[0][0] for op, c in votes.items()}


def origin_of(name: str, origins: dict[str, str]) -> str:
    if name in origins:
        return origins[name]
    if KERNEL.match(name) or name.startswith("graph_") or "inductor" in name.lower():
        return "inductor (fused)"
    if is_communication(name):
        return "communication"
    if name.startswith("aten::"):
        return "capture"
    return "runtime (graph glue)"


def _context(e) -> tuple[Any, Any, bool, bool]:
    """(its step range or None, the outermost graphllm op around it or itself, in a compiled graph, in the backward)."""
    step, owner, in_graph, backward, parent = None, e, False, False, e.cpu_parent
    while parent is not None:
        if parent.name == STEP_RANGE:
            step = parent
        elif parent.name.startswith("graphllm::"):
            owner = parent
        elif parent.name.startswith(GRAPH_REGIONS):
            in_graph = True
            backward |= parent.name.startswith("CompiledFunctionBackward")
        parent = parent.cpu_parent
    return step, owner, in_graph, backward


def by_origin(events, origins: dict[str, str], kernels: KernelOrigins | None = None) -> dict[str, float]:
    """Self time per origin over the profiled steps (module docstring); the step ranges' own self time is
    NO_OP, so the values add up to the profiled steps' wall time."""
    out: Counter = Counter()
    for e in events:
        if e.is_async:
            continue
        if e.name == STEP_RANGE:
            out[NO_OP] += e.self_cpu_time_total / 1e6
            continue
        step, owner, in_graph, backward = _context(e)
        if step is None:
            continue
        t = e.self_cpu_time_total / 1e6
        shares = kernels.shares(e.name, "backward" if backward else "forward") if kernels and owner is e else None
        if shares is not None:
            for origin, share in shares.items():
                out[origin] += t * share
            continue
        if owner is e and not in_graph and not e.name.startswith(GRAPH_REGIONS):
            origin = "communication" if is_communication(e.name) else "runtime (optimizer, loop)"
        else:
            origin = origin_of(owner.name, origins)
        out[origin] += t
    return dict(out.most_common())


def step_breakdown(events) -> list[dict[str, float]]:
    """Per profiled step, in order: FIGURES, from the self times of the ops inside its range. An op inside
    a collective (its copies, its wait) counts as communication, and as exposed inside a wait."""
    steps = sorted((e for e in events if e.name == STEP_RANGE and not e.is_async), key=lambda e: e.time_range.start)
    index = {id(s): i for i, s in enumerate(steps)}
    rows = [{"step_s": s.time_range.elapsed_us() / 1e6, "compute_s": 0.0, "communication_s": 0.0,
             "exposed_communication_s": 0.0, "no_op_s": s.self_cpu_time_total / 1e6} for s in steps]
    for e in events:
        if e.is_async or e.name == STEP_RANGE:
            continue
        step, comm, wait, p = None, False, False, e
        while p is not None:
            if p.name == STEP_RANGE:
                step = p
            else:
                comm, wait = comm or is_communication(p.name), wait or is_wait(p.name)
            p = p.cpu_parent
        if step is None:
            continue
        row, t = rows[index[id(step)]], e.self_cpu_time_total / 1e6
        row["communication_s" if comm else "compute_s"] += t
        if wait:
            row["exposed_communication_s"] += t
    return rows


def summarize(prof, *, flops_per_step: int, peak: float, origins: dict[str, str], top: int,
              kernels: KernelOrigins | None = None) -> dict[str, Any]:
    events = prof.events()
    per_step = step_breakdown(events)
    assert per_step, f"no {STEP_RANGE} range in the profile"  # profile_built opens one per step
    times = [r["step_s"] for r in per_step]
    median = per_step[times.index(statistics.median_low(times))]
    wall = sum(times)
    rows = []
    for e in prof.key_averages():
        self_s = e.self_cpu_time_total / 1e6
        if self_s > 0 and e.key != STEP_RANGE:
            rows.append({"op": e.key, "calls": e.count, "self_s": self_s, "flops": int(e.flops or 0),
                         "flop_per_s": (e.flops or 0) / self_s})
    rows.sort(key=lambda r: -r["self_s"])
    totals = {k: sum(r[k] for r in per_step) for k in FIGURES if k != "step_s"}
    step = median["step_s"]
    return {
        "steps": len(per_step), "median_step_s": step, "step_times_s": times, "profiled_s": wall,
        "median_step": median, "per_step": per_step, "figures": FIGURES,
        **totals, "self_time_s": totals["compute_s"] + totals["communication_s"],
        "flops_per_step": flops_per_step, "achieved_flop_per_s": flops_per_step / step,
        "measured_peak_flop_per_s": peak, "mfu": flops_per_step / step / peak,
        "by_origin_s": by_origin(events, origins, kernels), "top_ops": rows[:top],
        "inductor_kernels": kernels.listing() if kernels else {},
    }


@contextlib.contextmanager
def without_profiler_chatter() -> Iterator[None]:
    """Drop kineto's progress lines (CHATTER) from stderr while the profiler starts or stops, passing on
    every other line. Kineto writes them to file descriptor 2 at a level (USDT) above ERROR, so
    KINETO_LOG_LEVEL could only hide them together with its errors."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no standard error to filter
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            for line in held:
                if not line.startswith(CHATTER):
                    os.write(2, line)


def profile_steps(one_step, steps: int, device: str = "cpu"):
    """`steps` calls of `one_step` under torch.profiler, each inside a STEP_RANGE range. On cuda the GPU's
    kernels are recorded too (the trace's device timeline) and each step ends with a synchronize, so a step's
    range holds its device work; the figures stay host-side (self CPU time)."""
    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities, with_flops=True, profile_memory=True, record_shapes=False)
    with without_profiler_chatter():
        prof.start()
    try:
        for _ in range(steps):
            with record_function(STEP_RANGE):
                one_step()
                if cuda:
                    torch.cuda.synchronize()
    finally:
        with without_profiler_chatter():
            prof.stop()
    return prof


def profile_built(built, out_dir: Path, *, steps: int, warmup: int, top: int, seed: int = 0) -> dict[str, Any]:
    """Warm up, then profile `steps` training steps of a built artifact on this rank. Inductor kernels are
    attributed to passes when the artifact was compiled inside profile_kernels.kernel_profiling()."""
    from graphllm.train import TrainConfig

    plan = built.plan
    cfg = TrainConfig(steps=warmup + steps)
    opt = built.engine.make_optimizer(cfg)
    g = torch.Generator().manual_seed(seed)
    vocab = built.model.config.vocab_size
    rows = plan.global_batch_size
    from graphllm.job import example_batch

    positions = tuple(t.to(plan.device) for t in example_batch(plan, rows)[2:])  # position_ids of --eod-reset

    def one_step():
        ids = torch.randint(0, vocab, (rows, plan.seq_len), generator=g).to(plan.device)
        labels = torch.randint(0, vocab, (rows, plan.seq_len), generator=g).to(plan.device)
        built.engine.forward_backward(ids, labels, *positions)  # position_ids when the graph takes them
        built.engine.clip_grad_norm(cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        one_step()
    prof = profile_steps(one_step, steps, plan.device)
    if plan.device == "npu":  # the device side: torch_npu's profiler over as many more steps
        from graphllm.npu_backend import npu_profile

        with npu_profile(out_dir / f"npu_rank{built.rank}"):
            for _ in range(steps):
                one_step()
    origins = op_origins(built)
    kernels = None
    if plan.backend == "inductor" and kernel_names_active():  # a directly called op fused: by its model-graph callers
        direct = model_op_origins(built)
        kernels = KernelOrigins(node_passes(built, lambda target: direct.get(_op_key(target), "capture")))
    summary = summarize(prof, flops_per_step=flops_per_step(built), origins=origins, top=top, kernels=kernels,
                        peak=device_peak(plan.device, torch.bfloat16 if plan.amp == "bf16" else torch.float32))
    from graphllm.profile_layers import by_layer

    summary["by_layer_s"] = by_layer(prof.events())  # empty unless the graphs carry layer_markers' ranges
    summary["peak_rss_bytes"] = peak_rss_bytes()
    summary["rank"] = built.rank
    out_dir.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out_dir / f"trace_rank{built.rank}.json"))
    (out_dir / f"summary_rank{built.rank}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
