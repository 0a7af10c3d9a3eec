"""`graphllm compile`: plan flags → artifact directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from graphllm.cli.console import make_console


def add_parser(sub) -> None:
    from graphllm.options import add_flags
    from graphllm.plan import CompilePlan

    p = sub.add_parser("compile", help="capture a model, run the pass pipeline, compile, write an artifact",
                       description="Flags are the fields of graphllm.plan.CompilePlan (docs/options.md).")
    p.add_argument("--out", required=True, type=Path,
                   help="artifact directory to write (an artifact there is replaced; its runs/ and profile/ are kept)")
    add_flags(p, CompilePlan)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from graphllm.backends import get_backend
    from graphllm.job import compile_artifact
    from graphllm.launch import in_launched_world, is_rank_zero, relaunch
    from graphllm.options import from_flags
    from graphllm.plan import CompilePlan

    plan = from_flags(CompilePlan, args)
    get_backend(plan.backend)  # fail fast on a backend whose runtime is missing, before any work
    layout = plan.layout
    if layout.world_size > 1 and not in_launched_world():
        from graphllm.models import load_config

        layout.check_model(load_config(plan.model), batch_size=plan.batch_size, seq_len=plan.seq_len)
        return relaunch(layout.world_size, args.argv)
    console = make_console(stderr=True, quiet=not is_rank_zero())
    with console.status(f"compiling {plan.model} ({plan.backend}, {layout.describe()}) …"):
        built, report = compile_artifact(plan, args.out)
    console.print(f"[green]compiled[/] {plan.model} ({layout.describe()}) → {args.out} in {built.compile_seconds:.1f} s: "
                  f"{report['parameters']:,} parameters on rank 0, {report['flops_per_step'] / 1e9:.2f} GFLOP/micro-batch")
    changed = [p for p in report["passes"] if p["added"] or p["removed"]]
    name_w = max((len(p["name"]) for p in changed), default=0)  # columns fit the longest pass and graph names
    graph_w = max((len(p["graph"]) for p in changed), default=0)
    for p in changed:
        counters = ", ".join(f"{k} {v}" for k, v in p["counters"].items())
        console.print(f"  {p['name']:<{name_w}} {p['graph']:<{graph_w}} {p['nodes_before']:>5} → {p['nodes_after']:<5} "
                      f"{counters}", highlight=False)
    console.print(f"  see {args.out}/report.md; `graphllm inspect {args.out}` lists the graphs, "
                  f"`--pipeline` the steps that made them")
    return 0
