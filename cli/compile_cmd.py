"""`graphllm compile`: plan flags → artifact directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from graphllm.cli.console import make_console


def add_parser(sub) -> None:
    from graphllm.job_config import add_config_flag
    from graphllm.options import add_flags
    from graphllm.plan import CompilePlan

    p = sub.add_parser("compile", help="capture a model, run the pass pipeline, compile, write an artifact",
                       description="Flags are the fields of graphllm.plan.CompilePlan (docs/options.md); --config "
                                   "job.toml sets them from a file's [compile] section (docs/config_files.md).")
    p.add_argument("--out", required=True, type=Path,
                   help="artifact directory to write, required (here or as `out` in --config's [compile]); an "
                        "artifact there is replaced, its runs/ and profile/ kept")
    p.add_argument("--dry-run", action="store_true",
                   help="with --backend npu, on a machine without an NPU: build every graph with torch_npu's kernels "
                        "emulated on CPU and check each op against torchair (exit 2 on the first op it cannot "
                        "convert); writes an artifact that runs on an Ascend machine")
    p.add_argument("--torch-npu-wheel", type=Path, metavar="PATH",
                   help="the torch_npu 2.13.0 wheel file (or its unpacked folder) the pre-flight reads; default: the "
                        "installed torch_npu, else one downloaded once into graphllm's cache")
    add_flags(p, CompilePlan)
    add_config_flag(p, "compile")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from graphllm.npu_preflight import wheel_env

    with wheel_env(args.torch_npu_wheel):
        return _compile(args)


def _compile(args: argparse.Namespace) -> int:
    from graphllm.artifact import write_invocation
    from graphllm.backends import get_backend
    from graphllm.job import compile_artifact
    from graphllm.job_config import command_line_for_ranks, invocation
    from graphllm.launch import in_launched_world, is_rank_zero, relaunch
    from graphllm.options import from_flags
    from graphllm.npu_preflight import converter_index_and_label, emulated_plan
    from graphllm.plan import CompilePlan

    plan = from_flags(CompilePlan, args)
    # fail fast, before any work: a backend whose runtime is missing; for a dry run (which needs only the wheel's
    # sources) a plan that is not for npu, or a missing or wrong wheel
    get_backend(emulated_plan(plan).backend if args.dry_run else plan.backend)
    if args.dry_run or args.torch_npu_wheel is not None:
        converter_index_and_label(args.torch_npu_wheel)
    layout = plan.layout
    if layout.world_size > 1 and not in_launched_world():
        from graphllm.models import load_config

        layout.check_model(load_config(plan.model), batch_size=plan.batch_size, seq_len=plan.seq_len)
        with command_line_for_ranks(args.command_line):
            return relaunch(layout.world_size, args.argv)
    console = make_console(stderr=True, quiet=not is_rank_zero())
    with console.status(f"compiling {plan.model} ({plan.backend}, {layout.describe()}) …"):
        built, report = compile_artifact(plan, args.out, dry_run=args.dry_run)
        if is_rank_zero():
            write_invocation(args.out, invocation(args, plan))  # flags, their sources, command line, commit
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
    pre = report.get("preflight")
    if pre is not None:
        from graphllm.cli.npu_coverage import print_summary
        from graphllm.errors import GraphllmError

        print_summary(console, pre)
        if pre["blocking"]:
            raise GraphllmError(pre["blocking"])
    return 0
