"""`graphllm profile ARTIFACT`: top ops, time by pass, compute vs communication, MFU; trace + JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from graphllm.cli.console import make_console, print_table
from rich.table import Table


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="profile an artifact's training step (torch.profiler): where the time goes")
    p.add_argument("artifact", type=Path, help="the directory `graphllm compile --out` wrote")
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--warmup", type=int, default=2, help="steps run before profiling (compilation, allocator)")
    p.add_argument("--top", type=int, default=15, help="rows in the top-ops table")
    p.add_argument("--out", type=Path, default=None, help="trace/summary directory (default ARTIFACT/profile)")
    p.add_argument("--by-layer", action="store_true",
                   help="time per decoder layer, forward and backward: profiler ranges around each layer's nodes, "
                        "run on the eager backend (inductor would fuse across them)")
    p.set_defaults(func=run)


def _s(x: float) -> str:
    return f"{x * 1e3:,.1f} ms"


def _short(op: str, width: int = 72) -> str:
    """An op name cut to `width` characters (an inductor kernel's name lists every node it fuses; the JSON has it whole)."""
    return op if len(op) <= width else op[: width - 1] + "…"


def _check_out(out: Path | None) -> None:
    """Refuse an --out that cannot become a directory before any work (the trace is written at the end)."""
    from graphllm.errors import GraphllmError

    for p in [out, *out.parents] if out is not None else []:
        if p.exists():
            if not p.is_dir():
                where = f"--out {out}" if p == out else f"--out {out}: {p}"
                raise GraphllmError(f"{where} is a file, not a directory; the trace and summary go into a directory: "
                                    "give a new or an existing directory")
            return


def run(args: argparse.Namespace) -> int:
    from graphllm.artifact import read_plan
    from graphllm.errors import GraphllmError
    from graphllm.job import load_artifact
    from graphllm.launch import in_launched_world, is_rank_zero, relaunch
    from graphllm.plan import CompilePlan
    from graphllm.profile import profile_built
    from graphllm.profile_kernels import kernel_profiling

    if args.steps < 1 or args.warmup < 0:
        raise GraphllmError(f"--steps must be ≥ 1 and --warmup ≥ 0 (got {args.steps}, {args.warmup})")
    _check_out(args.out)
    world = CompilePlan.from_json(read_plan(args.artifact)["plan"], str(args.artifact)).layout.world_size
    if world > 1 and not in_launched_world():
        return relaunch(world, args.argv)
    console = make_console(stderr=True, quiet=not is_rank_zero())
    out = args.out or args.artifact / "profile"
    with kernel_profiling():  # inductor: a profiler range per kernel, named after the nodes it fuses
        with console.status("loading artifact and compiling …"):
            _, built = load_artifact(args.artifact, purpose="profile_layers" if args.by_layer else "train")
        with console.status(f"profiling {args.steps} steps after {args.warmup} warm-up steps …"):
            s = profile_built(built, out, steps=args.steps, warmup=args.warmup, top=args.top)
    print_summary(console, s)
    console.print(f"trace (chrome://tracing, ui.perfetto.dev) and summary in {out}/")
    return 0


def print_summary(console, s: dict) -> None:
    """The tables (totals over the profiled steps, shares of their wall time) and the median step's parts."""
    wall, n = s["profiled_s"], s["steps"]
    table = Table(title=f"top ops by self time, rank {s['rank']} (all {n} profiled steps)")
    for col in ("op", "calls", "self time", "share", "GFLOP", "GFLOP/s"):
        table.add_column(col, justify="left" if col == "op" else "right")
    for r in s["top_ops"]:
        table.add_row(_short(r["op"]), str(r["calls"]), _s(r["self_s"]), f"{100 * r['self_s'] / wall:.1f}%",
                      f"{r['flops'] / 1e9:,.2f}" if r["flops"] else "", f"{r['flop_per_s'] / 1e9:,.1f}" if r["flops"] else "")
    print_table(console, table)
    origin = Table(title=f"time by the pass that introduced the op (all {n} profiled steps)")
    origin.add_column("origin")
    origin.add_column("self time", justify="right")
    origin.add_column("share", justify="right")
    for name, t in s["by_origin_s"].items():
        origin.add_row(name, _s(t), f"{100 * t / wall:.1f}%")
    print_table(console, origin)
    if s["by_layer_s"]:
        layers = Table(title=f"self time by layer (eager kernels of the same graphs; all {n} profiled steps)")
        for col in ("module", "forward", "backward", "share"):
            layers.add_column(col, justify="left" if col == "module" else "right")
        for name, t in s["by_layer_s"].items():
            both = t["forward"] + t["backward"]
            layers.add_row(name, _s(t["forward"]), _s(t["backward"]), f"{100 * both / wall:.1f}%")
        print_table(console, layers)
    m = s["median_step"]
    console.print(
        f"median step {_s(m['step_s'])} of {n} ({_s(min(s['step_times_s']))} – {_s(max(s['step_times_s']))}) = "
        f"compute {_s(m['compute_s'])} + communication {_s(m['communication_s'])} "
        f"(exposed {_s(m['exposed_communication_s'])}) + no op {_s(m['no_op_s'])}")
    console.print("  compute: ops that are not collectives (graphs, optimizer, loop) · communication: collective ops "
                  "on the training thread, exposed: waiting for one · no op: Python between ops, the profiler")
    console.print(
        f"{s['achieved_flop_per_s'] / 1e9:,.1f} GFLOP/s in the median step = MFU {100 * s['mfu']:.1f}% of the cached "
        f"{s['measured_peak_flop_per_s'] / 1e9:,.0f} GFLOP/s matmul peak · peak RSS {s['peak_rss_bytes'] / 2**20:,.0f} MiB")
