"""`graphllm plan`: the fastest layouts of a model on a number of devices, predicted from its graphs
(graphllm/planner/, docs/planner.md); `--emit` prints the `graphllm compile` command of the best one."""

from __future__ import annotations

import argparse
import json
import shlex

from pathlib import Path

from graphllm.cli.console import make_console, print_table


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"values must be ≥ 1, got {text!r}")
    return values


def _features(text: str) -> tuple[str, ...]:
    from graphllm.planner.search import MEMORY_FEATURES

    values = tuple(v for v in text.split(",") if v)
    if not values or any(v not in MEMORY_FEATURES for v in values):
        raise argparse.ArgumentTypeError(f"--memory-features takes a comma-separated subset of "
                                         f"{','.join(MEMORY_FEATURES)}")
    return values


def _expert_tp(text: str) -> tuple[bool, ...]:
    """--etp 1 | tp | 1,tp → whether the experts are split over tp, per choice."""
    values = tuple(v for v in text.split(",") if v)
    if not values or any(v not in ("1", "tp") for v in values):
        raise argparse.ArgumentTypeError("--etp takes 1, tp or 1,tp (experts whole on each tp rank, or split over "
                                         "the tp ranks)")
    return tuple(dict.fromkeys(v == "tp" for v in values))


def _names(text: str) -> tuple[str, ...]:
    from graphllm.planner.search import RECOMPUTE_CHOICES

    values = tuple(v for v in text.split(",") if v)
    bad = [v for v in values if v not in RECOMPUTE_CHOICES]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"--recompute takes a comma-separated subset of {','.join(RECOMPUTE_CHOICES)}")
    return values


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="predict memory and step time of every layout on N devices; print the best",
                       description="Enumerates tp × cp × pp × vpp × dp (× ep and the token dispatcher for a "
                                   "mixture-of-experts model), micro-batch size, recompute and ZeRO-1; "
                                   "predicts per-rank memory and step time from the model's graphs, captured on fake "
                                   "tensors (no weights are allocated). See docs/planner.md.")
    p.add_argument("--model", required=True, help="a preset (tiny-llama, small-llama), a config-only preset "
                   "(llama2-70b, llama2-7b), an HF checkpoint directory (only config.json is read) or a Hub id")
    p.add_argument("--devices", type=int, required=True, help="accelerators in the job")
    p.add_argument("--device", required=True, help="a2, a3, h100, h200, or cpu (measured here)")
    p.add_argument("--device-memory", metavar="SIZE", help="memory per device a plan may use, e.g. 64GiB (default: "
                   "the device table's)")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence")
    p.add_argument("--global-batch", type=int, required=True, help="sequences per optimizer step")
    p.add_argument("--amp", choices=("bf16", "fp32"), default="bf16", help="autocast precision of the plans")
    p.add_argument("--top", type=int, default=10, help="plans to print")
    p.add_argument("--emit", action="store_true", help="print the `graphllm compile` command of the best plan")
    p.add_argument("--json", type=Path, metavar="PATH", help="write every priced plan to PATH")
    p.add_argument("--tp", type=_ints, metavar="N,N", help="tensor-parallel sizes to try (default: divisors up to "
                   "one node's devices)")
    p.add_argument("--cp", type=_ints, metavar="N,N", help="context-parallel sizes to try (default: those leaving "
                   "each rank ≥ 4096 tokens of a row)")
    p.add_argument("--ep", type=_ints, metavar="N,N", help="expert-parallel sizes to try (a mixture-of-experts "
                   "model; default: the divisors of dp that divide its experts)")
    p.add_argument("--etp", type=_expert_tp, metavar="1,tp", help="expert tensor parallelism to try at tp > 1 (a "
                   "mixture-of-experts model): 1 (experts whole on each tp rank), tp (split over tp), or 1,tp (default)")
    p.add_argument("--moe-capacity-factor", type=float, metavar="F", help="price every plan of a mixture-of-"
                   "experts model with this expert capacity (graphllm compile's flag; default: dropless)")
    p.add_argument("--micro-batch-sizes", type=_ints, metavar="N,N", help="micro-batch sizes to try (default 1,2,4,8)")
    p.add_argument("--recompute", type=_names, metavar="P,P", help="recompute policies to try (default "
                   "none,selective,full)")
    p.add_argument("--memory-features", type=_features, metavar="F,F", default=(),
                   help="memory features the search may turn on, each tried on and off: params-bf16 (--params-dtype "
                        "bf16: fp32 master weights in the optimizer), offload-optimizer")
    p.add_argument("--jobs", type=int, default=None, help="processes measuring graphs (default: CPUs, at most 4)")
    p.add_argument("--no-cache", action="store_true", help="measure every graph again (default: kept under "
                   "~/.cache/graphllm/planner)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from graphllm.errors import GraphllmError
    from graphllm.planner.devices import device_spec, parse_bytes
    from graphllm.planner.models import plan_model
    from graphllm.planner.search import Space, describe_misfit, memory_options, search

    memory = parse_bytes(args.device_memory) if args.device_memory else None
    spec = device_spec(args.device, memory=memory)  # unknown names: the known ones, exit 2
    if args.top < 1:
        raise GraphllmError("--top must be ≥ 1")
    cfg, compile_model = plan_model(args.model)
    space = Space(tp=args.tp, cp=args.cp, ep=args.ep, options=memory_options(tuple(args.memory_features)),
                  capacity_factor=_capacity_factor(args.moe_capacity_factor, cfg))
    if args.micro_batch_sizes:
        space.mbs = args.micro_batch_sizes
    if args.recompute:
        space.recompute = args.recompute
    if args.etp:
        space.expert_tp = args.etp
    cache_root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    cache = None if args.no_cache else cache_root / "graphllm" / "planner"
    err = make_console(stderr=True)
    result = search(cfg, devices=args.devices, spec=spec, seq_len=args.seq_len, global_batch=args.global_batch,
                    amp=args.amp, space=space, jobs=args.jobs, cache_dir=cache)
    if args.json:
        _write_json(args.json, _json(result, args, spec))
    if not result.fitting:
        raise GraphllmError(describe_misfit(result, spec))
    out = make_console()
    print_table(out, _table(result, args, spec))
    err.print(f"{len(result.candidates)} plans priced ({len(result.fitting)} fit), {sum(result.pruned.values())} "
              f"layouts refused, {result.measured} captures, {result.seconds:.1f} s; figures are the worst "
              "rank's (the rank column), step time for the whole global batch", highlight=False)
    if args.emit:
        print(emit_command(result.fitting[0], compile_model, args, spec_name=args.device))
    return 0


def _write_json(path: Path, data) -> None:
    """Written beside and renamed: a full disk or a second plan writing the same file never leaves half of one."""
    import contextlib
    import os

    from graphllm.errors import GraphllmError

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise GraphllmError(f"--json {path}: cannot write it ({e.strerror or e}); choose another path or free "
                            "space") from e


def _table(result, args, spec):
    from rich.table import Table

    from graphllm.planner.search import gib

    t = Table(title=f"graphllm plan: {args.model} on {args.devices} × {spec.name} ({gib(spec.memory)}), seq "
                    f"{args.seq_len}, global batch {args.global_batch}, {args.amp}")
    for col in ("#", "layout", "mbs", "m", "recompute", "features", "rank", "memory", "params+grads", "optimizer", "activations",
                "step s", "compute", "comm", "bubble", "tokens/s", "MFU"):
        t.add_column(col, justify="left" if col in ("layout", "recompute", "features") else "right")
    for i, c in enumerate(result.fitting[: args.top], 1):
        p, mem, st = c.prediction, c.prediction.memory, c.prediction.step_seconds
        t.add_row(str(i), c.layout.describe(), str(c.mbs), str(c.layout.micro_batches), c.recompute,
                  _features_of(c), str(p.rank),
                  gib(mem["total"]), gib(mem["parameters"] + mem["gradients"]), gib(mem["optimizer"]),
                  gib(mem["activations"]), f"{st['total']:.3g}", f"{st['compute']:.3g}",
                  f"{st['communication']:.3g}", f"{st['bubble']:.3g}", f"{c.tokens_per_second * args.seq_len:,.0f}",
                  f"{100 * p.mfu:.1f}%")
    return t


def _features_of(c) -> str:
    """The memory features and, at ep > 1, the token dispatcher."""
    if c.layout.ep == 1:
        return c.options.describe()
    return c.dispatcher if c.options.describe() == "-" else f"{c.options.describe()}, {c.dispatcher}"


def _capacity_factor(value: float | None, cfg) -> float | None:
    """--moe-capacity-factor, checked as graphllm compile checks it; refused for a dense model."""
    from graphllm.errors import GraphllmError
    from graphllm.planning.moe_config import MoeConfig

    if value is None:
        return None
    MoeConfig(capacity_factor=value)  # > 0, or one line naming the flag
    if not getattr(cfg, "num_experts", 0):
        raise GraphllmError(f"--moe-capacity-factor {value:g}: {cfg.model_type} is dense (no experts); leave it out")
    return value


def emit_command(c, model: str, args, *, spec_name: str) -> str:
    """The `graphllm compile` command line of candidate `c` (flags as graphllm compile names them)."""
    lay = c.layout
    precision = ["--params-dtype", c.options.params_dtype] if c.options.params_dtype != "fp32" else ["--amp", args.amp]
    argv = ["graphllm", "compile", "--model", model, "--out", "plan-artifact", "--batch-size", str(c.mbs),
            "--seq-len", str(args.seq_len), *precision, "--tp", str(lay.tp), "--pp", str(lay.pp),
            "--dp", str(lay.dp), "--micro-batches", str(lay.micro_batches)]
    if c.options.offload_optimizer:
        argv.append("--offload-optimizer")
    if lay.vpp > 1:
        argv += ["--vpp", str(lay.vpp)]
    if lay.cp > 1:
        argv += ["--cp", str(lay.cp)]
    if lay.ep > 1:
        argv += ["--ep", str(lay.ep), "--moe-dispatcher", c.dispatcher]
    if lay.etp > 1:
        argv += ["--etp", str(lay.etp)]
    if getattr(args, "moe_capacity_factor", None) is not None:
        argv += ["--moe-capacity-factor", f"{args.moe_capacity_factor:g}"]
    if lay.sequence_parallel:
        argv.append("--sequence-parallel")
    if lay.zero1:
        argv.append("--zero1")
    if c.recompute != "none":
        argv += ["--recompute", c.recompute]
    argv += {"h100": ["--device", "cuda"], "h200": ["--device", "cuda"], "a2": ["--backend", "npu"],
             "a3": ["--backend", "npu"]}.get(spec_name, [])
    return shlex.join(argv)


def _json(result, args, spec) -> dict:
    import dataclasses

    rows = []
    for c in result.candidates:
        p = c.prediction
        rows.append({"layout": c.layout.describe(), "tp": c.layout.tp, "pp": c.layout.pp, "vpp": c.layout.vpp,
                     "dp": c.layout.dp, "cp": c.layout.cp, "ep": c.layout.ep, "etp": c.layout.etp,
                     "zero1": c.layout.zero1,
                     "moe_dispatcher": c.dispatcher if c.layout.ep > 1 else None,
                     "micro_batches": c.layout.micro_batches, "micro_batch_size": c.mbs, "recompute": c.recompute,
                     "fits": c.fits, "rank": p.rank, "memory": p.memory, "step_seconds": p.step_seconds,
                     "mfu": p.mfu, "options": dataclasses.asdict(c.options),
                     "ranks": [{k: v for k, v in r.items() if k != "params"} for r in p.ranks]})
    return {"model": args.model, "devices": args.devices, "device": dataclasses.asdict(spec), "seq_len": args.seq_len,
            "global_batch": args.global_batch, "amp": args.amp, "moe_capacity_factor": args.moe_capacity_factor,
            "seconds": result.seconds,
            "pruned": dict(result.pruned), "plans": rows}


