"""Where a training step's time goes: torch.profiler over a few steps of each contender of train_step.py.

Ops are grouped by self CPU time into matmul, attention, loss, optimizer, inductor-generated fused
kernels (`cpp_fused_*`, visible because `cpp.enable_kernel_profile` is switched on here) and other ATen
ops (elementwise, copies, reductions). The matmul table compares the same GEMM shapes across contenders.
Profiling adds overhead to every op, so compare the groups, not the totals, with train_step.py.

    python benchmarks/profile_step.py --model tiny-llama --amp fp32 --steps 5
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step as ts  # noqa: E402  (sets the inductor cache dir before torch is imported)

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from graphllm.models import PRESETS, load_model  # noqa: E402

GROUPS = [  # first match wins
    ("matmul", re.compile(r"^aten::(mm|addmm|bmm|baddbmm|_mm|mkldnn_.*mm.*|_addmm_activation)$")),
    ("attention", re.compile(r"scaled_dot_product|flash_attention|_efficient_attention|graphllm::attention")),
    ("loss", re.compile(r"log_softmax|nll_loss|cross_entropy|logsumexp")),
    ("optimizer", re.compile(r"_fused_adam|Optimizer\.step|_foreach_")),
    # an inductor kernel that only converts dtypes and moves data: autocast's weight casts, fp32 gradient casts
    ("inductor dtype casts",
     re.compile(r"cpp_fused(_(_to_copy|_unsafe_view|view|t|transpose|permute|clone|expand))+_\d+$")),
    ("inductor fused", re.compile(r"^(graph_\d+_)?cpp_fused|^kernel_cpp|^cpp_")),
    ("copy / layout", re.compile(r"^aten::(copy_|clone|contiguous|_to_copy|to|empty_strided|empty|as_strided|"
                                 r"t|transpose|view|reshape|_unsafe_view|expand|permute|cat|zero_|fill_|zeros)$")),
]


def group_of(name: str) -> str:
    for g, rx in GROUPS:
        if rx.search(name):
            return g
    return "other aten / python" if name.startswith("aten::") else "other"


def profile_contender(c: ts.Contender, batches, steps: int):
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            c.step(batches, "profile")
    return prof


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(PRESETS), default="tiny-llama")
    p.add_argument("--amp", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--steps", type=int, default=5, help="profiled steps per contender (after 3 warm-up)")
    p.add_argument("--top", type=int, default=15, help="rows of the per-op table per contender")
    p.add_argument("--contenders", nargs="+", choices=ts.CONTENDERS, default=list(ts.CONTENDERS))
    p.add_argument("--graphllm-disable", nargs="*", default=[], metavar="PASS", help="graphllm passes to leave out")
    p.add_argument("--trace-dir", type=Path, default=None, help="write a chrome trace per contender here")
    args = p.parse_args(argv)
    import torch._inductor.config as ic

    ic.cpp.enable_kernel_profile = True  # name each generated C++ kernel in the profile
    console = Console(width=None if sys.stdout.isatty() else 150)
    batch, seq = ts.SHAPES[args.model]
    source = load_model(args.model, seed=0)
    batches = ts.make_batches(source.config.vocab_size, batch, seq, 0)
    groups: dict[str, dict[str, float]] = {}
    mm_shapes: dict[str, dict[str, tuple[int, float]]] = {}
    totals: dict[str, float] = {}
    for name in args.contenders:
        c = ts.build(name, source, batches[0], args.amp, tuple(args.graphllm_disable))
        for _ in range(4):  # first (compiling) step + 3 warm-up
            c.step(batches, "warmup")
        prof = profile_contender(c, batches, args.steps)
        if args.trace_dir:
            args.trace_dir.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(args.trace_dir / f"{args.model}_{args.amp}_{name}.json"))
        steps = [s["total"] for s in c.steps if s["tag"] == "profile"]
        totals[name] = ts.median(steps)
        avgs = prof.key_averages()
        g = defaultdict(float)
        for e in avgs:
            g[group_of(e.key)] += e.self_cpu_time_total / 1e6 / args.steps
        groups[name] = dict(g)
        shapes = {}
        for e in prof.key_averages(group_by_input_shape=True):
            if group_of(e.key) == "matmul":
                # inductor calls mm.out (a third, output shape); eager calls mm: key on the two operands
                ins = [tuple(x) for x in e.input_shapes if x][:2]
                key = f"{e.key} {' x '.join(str(list(x)) for x in ins)}"
                flops = 2 * ins[0][0] * ins[0][1] * ins[1][1] if len(ins) == 2 and len(ins[0]) == len(ins[1]) == 2 else 0
                n, sec = shapes.get(key, (0, 0.0, 0))[:2]
                shapes[key] = (n + e.count / args.steps, sec + e.self_cpu_time_total / 1e6 / args.steps, flops)
        mm_shapes[name] = shapes
        t = Table(title=f"{ts.LABELS[name]}: top ops by self CPU time per step ({args.model} {args.amp})")
        for col in ("op", "group", "calls/step", "self ms/step"):
            t.add_column(col, justify="left" if col in ("op", "group") else "right")
        for e in sorted(avgs, key=lambda e: -e.self_cpu_time_total)[: args.top]:
            t.add_row(e.key[:70], group_of(e.key), f"{e.count / args.steps:.0f}",
                      f"{e.self_cpu_time_total / 1e3 / args.steps:.1f}")
        console.print(t)
        del c

    names = list(groups)
    all_groups = sorted({k for g in groups.values() for k in g}, key=lambda k: -max(g.get(k, 0) for g in groups.values()))
    t = Table(title=f"self CPU time per step by group, ms (profiled, {args.steps} steps; step wall time under profiler last)")
    t.add_column("group")
    for n in names:
        t.add_column(ts.LABELS[n], justify="right")
    for k in all_groups:
        t.add_row(k, *(f"{1e3 * groups[n].get(k, 0):.1f}" for n in names))
    t.add_row("[bold]sum of self times", *(f"{1e3 * sum(groups[n].values()):.1f}" for n in names))
    t.add_row("[bold]step wall (median)", *(f"{1e3 * totals[n]:.1f}" for n in names))
    console.print(t)

    t = Table(title="matmul calls by input shapes: calls/step and self ms/step")
    t.add_column("op and input shapes")
    for n in names:
        t.add_column(ts.LABELS[n], justify="right")
    keys = sorted({k for s in mm_shapes.values() for k in s},
                  key=lambda k: -max(s.get(k, (0, 0))[1] for s in mm_shapes.values()))
    for k in keys:
        def cell(n: str, k: str = k) -> str:
            if k not in mm_shapes[n]:
                return "—"
            calls, sec, flops = mm_shapes[n][k]
            rate = f", {calls * flops / sec / 1e9:.0f} GFLOP/s" if flops and sec else ""
            return f"{calls:.0f}× {1e3 * sec:.1f} ms{rate}"
        t.add_row(k[:90], *(cell(n) for n in names))
    console.print(t)
    # Amdahl: the GEMMs, attention and AdamW run the same kernels on every side (compare the tables above);
    # if a side spent nothing else, how fast could it be relative to the others' measured step?
    fixed = {n: sum(groups[n].get(k, 0) for k in ("matmul", "attention", "optimizer")) for n in names}
    for n in names:
        rest = sum(groups[n].values()) - fixed[n]
        ceil = ", ".join(f"{totals[o] / fixed[n]:.2f}× {ts.LABELS[o]}" for o in names if o != n)
        console.print(f"{ts.LABELS[n]}: matmul + attention + AdamW {1e3 * fixed[n]:.1f} ms, everything else "
                      f"{1e3 * rest:.1f} ms; with everything else at zero it would be at most {ceil} "
                      "(against profiled step times, which the profiler inflates most for many-small-op eager steps: "
                      "redo the division with train_step.py's medians)")


if __name__ == "__main__":
    main()
