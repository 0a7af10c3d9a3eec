"""`graphllm compile`: plan flags → artifact directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console


def add_parser(sub) -> None:
    p = sub.add_parser("compile", help="capture a model, run the pass pipeline, compile, write an artifact")
    p.add_argument("--model", default="tiny-llama", help="preset (tiny-llama, small-llama) or HF checkpoint dir")
    p.add_argument("--out", required=True, type=Path, help="artifact directory to write")
    p.add_argument("--batch-size", type=int, default=4, help="micro-batch size (static)")
    p.add_argument("--seq-len", type=int, default=128, help="sequence length (static)")
    p.add_argument("--backend", default="inductor", help="eager | inductor | npu")
    p.add_argument("--amp", default="fp32", choices=["fp32", "bf16"], help="fp32, or bf16 autocast")
    p.add_argument("--seed", type=int, default=0, help="init seed for preset models")
    p.add_argument("--attn-implementation", choices=["sdpa", "eager"], default=None,
                   help="attention form to capture (default: the model's)")
    p.add_argument("--disable", default="", help="comma-separated pass names to leave out")
    p.add_argument("--pass", dest="extra_passes", action="append", default=[], metavar="MODULE:NAME",
                   help="append a @graph_pass from an importable module (repeatable)")
    p.add_argument("--eod-reset", action="store_true",
                   help="graph takes position_ids: positions and attention reset at each packed sample (packed SFT, "
                        "pretrain with --reset-position-ids --reset-attention-mask)")
    p.add_argument("--device", choices=["cpu", "cuda", "npu"], default="cpu",
                   help="where the model runs (npu is implied by --backend npu)")
    par = p.add_argument_group("parallelism (ranks = tp × pp × dp; several ranks start through torchrun)")
    par.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks")
    par.add_argument("--pp", type=int, default=1, help="pipeline-parallel ranks")
    par.add_argument("--dp", type=int, default=1, help="data-parallel ranks")
    par.add_argument("--vpp", type=int, default=1, help="virtual pipeline stages per pipeline rank (interleaved 1F1B)")
    par.add_argument("--coc-parallel-num", type=int, default=1, choices=[1, 2, 4, 8],
                     help="chunk tensor-parallel collectives to overlap them with matmuls (1: off)")
    par.add_argument("--mc2", action="store_true",
                     help="fuse tensor-parallel matmuls with their collectives (torch_npu MC2 kernels on --backend "
                          "npu; --coc-parallel-num chunks elsewhere)")
    par.add_argument("--tp-plan", choices=["graphllm", "hf"], default="graphllm",
                     help="tensor-parallel plan: graphllm's, or transformers' base_model_tp_plan")
    par.add_argument("--sequence-parallel", action="store_true", help="shard norms/residuals by sequence over tp")
    par.add_argument("--zero1", action="store_true", help="shard AdamW states over the data-parallel group")
    par.add_argument("--micro-batches", type=int, default=1, help="micro-batches per step per data-parallel rank")
    par.add_argument("--pp-layers", default=None, help="layers per pipeline stage, e.g. 3,3,2,2 (default: by FLOPs)")
    rc = p.add_argument_group("activation recomputation (graphllm/recompute.py)")
    rc.add_argument("--recompute", default="none", help="none | full | selective | budget")
    rc.add_argument("--recompute-method", default=None, help="full: uniform (groups of N layers) | block (first N)")
    rc.add_argument("--recompute-layers", type=int, default=None,
                    help="full: N of --recompute-method (default 1); selective: only the first N layers")
    rc.add_argument("--recompute-ops", default=None, help="selective: comma-separated attention,activation,norm")
    rc.add_argument("--recompute-budget", type=float, default=None, help="budget: activation memory fraction in [0, 1]")
    npu = p.add_argument_group("npu (torchair) options")
    npu.add_argument("--npu-mode", choices=["max-autotune", "reduce-overhead"], default="max-autotune",
                     help="GE graph execution, or ACL graph capture")
    npu.add_argument("--npu-graph-dump", choices=["none", "txt", "pbtxt", "py"], default="none",
                     help="torchair graph dump format, into ARTIFACT/graphs/rank0/npu")
    npu.add_argument("--npu-frozen-parameter", action="store_true", help="fixed parameter addresses (inference)")
    npu.add_argument("--npu-tiling-schedule-optimize", action="store_true", help="tiling on AI CPU (static shapes)")
    npu.add_argument("--npu-topology-sorting", choices=["DFS", "BFS", "RDFS", "StableRDFS"], default="DFS",
                     help="GE topological sort strategy")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from graphllm.backends import get_backend
    from graphllm.job import compile_artifact
    from graphllm.launch import in_launched_world, is_rank_zero, relaunch
    from graphllm.plan import CompilePlan, load_pass_spec

    get_backend(args.backend)  # fail fast on a bad backend, before any work
    plan = CompilePlan(model=args.model, batch_size=args.batch_size, seq_len=args.seq_len, backend=args.backend,
                       amp=args.amp, seed=args.seed, attn_implementation=args.attn_implementation,
                       disable=[d for d in args.disable.split(",") if d], device=args.device,
                       npu_mode=args.npu_mode, npu_graph_dump=args.npu_graph_dump,
                       npu_frozen_parameter=args.npu_frozen_parameter,
                       npu_tiling_schedule_optimize=args.npu_tiling_schedule_optimize,
                       npu_topology_sorting=args.npu_topology_sorting, tp=args.tp, pp=args.pp, dp=args.dp,
                       vpp=args.vpp, sequence_parallel=args.sequence_parallel, zero1=args.zero1,
                       micro_batches=args.micro_batches, pp_layers=parse_layers(args.pp_layers),
                       tp_plan=args.tp_plan, coc_parallel_num=args.coc_parallel_num, mc2=args.mc2, recompute=args.recompute,
                       recompute_options=recompute_options(args), eod_reset=args.eod_reset)
    extra = [load_pass_spec(s) for s in args.extra_passes]
    layout = plan.layout()
    if layout.world_size > 1 and not in_launched_world():
        from graphllm.models import load_config

        layout.check_model(load_config(args.model), batch_size=plan.batch_size, seq_len=plan.seq_len)
        return relaunch(layout.world_size, args.argv)
    console = Console(stderr=True, quiet=not is_rank_zero())
    with console.status(f"compiling {args.model} ({args.backend}, {layout.describe()}) …"):
        built, report = compile_artifact(plan, args.out, extra_passes=extra)
    console.print(f"[green]compiled[/] {args.model} ({layout.describe()}) → {args.out} in {built.compile_seconds:.1f} s: "
                  f"{report['parameters']:,} parameters on rank 0, {report['flops_per_step'] / 1e9:.2f} GFLOP/micro-batch")
    for p in report["passes"]:
        if p["added"] or p["removed"]:
            counters = ", ".join(f"{k} {v}" for k, v in p["counters"].items())
            console.print(f"  {p['name']:<16} {p['graph']:<9} {p['nodes_before']:>5} → {p['nodes_after']:<5} {counters}")
    console.print(f"  see {args.out}/report.md; `graphllm inspect {args.out}` lists the graphs")
    return 0


def recompute_options(args: argparse.Namespace) -> dict:
    """--recompute-* flags → CompilePlan.recompute_options; a flag the policy does not take is an error."""
    from graphllm.errors import GraphllmError

    given = {"method": args.recompute_method, "layers": args.recompute_layers, "ops": args.recompute_ops,
             "fraction": args.recompute_budget}
    takes = {"none": (), "full": ("method", "layers"), "selective": ("ops", "layers"), "budget": ("fraction",)}
    flag = {"method": "--recompute-method", "layers": "--recompute-layers", "ops": "--recompute-ops",
            "fraction": "--recompute-budget"}
    for k, v in given.items():
        if v is not None and k not in takes.get(args.recompute, ()):
            raise GraphllmError(f"{flag[k]} does not apply to --recompute {args.recompute}")
    if args.recompute == "budget" and args.recompute_budget is None:
        raise GraphllmError("--recompute budget needs --recompute-budget F (a fraction in [0, 1])")
    return {k: v for k, v in given.items() if v is not None}


def parse_layers(text: str | None) -> list[int] | None:
    from graphllm.errors import GraphllmError

    if not text:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise GraphllmError(f"--pp-layers {text!r}: expected comma-separated layer counts, e.g. 3,3,2,2") from None
