"""`graphllm run ARTIFACT`: train the compiled graph on the built-in corpus."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="train an artifact's compiled graph (built-in corpus and tokenizer)")
    p.add_argument("artifact", type=Path)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics", type=Path, default=None, help="JSON-lines file (default ARTIFACT/runs/metrics.jsonl)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    p.add_argument("--save", type=Path, default=None, help="checkpoint root: writes ROOT/step_<N>/ (any layout can load it)")
    p.add_argument("--save-interval", type=int, default=0, help="save every N steps (and always after the last)")
    p.add_argument("--keep-last", type=int, default=0, help="keep only the newest N checkpoints (0: keep all)")
    p.add_argument("--load", type=Path, default=None, help="resume from a checkpoint dir, or the newest under a root")
    p.add_argument("--nproc", type=int, default=None,
                   help="local ranks to start (default: the plan's tp × pp × dp); under torchrun, leave it out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from graphllm.data import BatchSpec, TokenBatches, builtin_token_ids, builtin_tokenizer
    from graphllm.errors import GraphllmError
    from graphllm.artifact import read_plan
    from graphllm.job import load_artifact
    from graphllm.launch import in_launched_world, is_rank_zero, relaunch
    from graphllm.plan import CompilePlan
    from graphllm.train import MetricsWriter, TrainConfig, config_dict, train_steps

    world = CompilePlan.from_json(read_plan(args.artifact)["plan"], str(args.artifact)).layout().world_size
    if args.nproc is not None and args.nproc != world:
        raise GraphllmError(f"--nproc {args.nproc} does not match the artifact's layout, which needs {world} ranks; "
                            f"use --nproc {world} or recompile with another layout")
    if world > 1 and not in_launched_world():
        return relaunch(world, args.argv)

    cfg = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio,
                      weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed)
    console = Console(stderr=True, quiet=not is_rank_zero())
    with console.status("loading artifact and compiling …"):
        data, built = load_artifact(args.artifact)
    plan = built.plan
    with console.status("preparing the built-in corpus and tokenizer (cached after the first run) …"):
        tok = builtin_tokenizer()
        if tok.vocab_size > built.model.config.vocab_size:
            raise GraphllmError(f"the built-in tokenizer has {tok.vocab_size} tokens but {plan.model} has a "
                                f"vocabulary of {built.model.config.vocab_size}; use a model with a larger vocab_size")
        batches = TokenBatches(builtin_token_ids(tok), BatchSpec(batch_size=plan.global_batch_size,
                                                                 seq_len=plan.seq_len, seed=cfg.seed))
    console.print(f"[green]ready[/] {plan.model} ({plan.backend}, {plan.amp}) compiled in {built.compile_seconds:.1f} s; "
                  f"training {cfg.steps} steps of {plan.global_batch_size}×{plan.seq_len} tokens on {plan.layout().describe()}")
    metrics_path = args.metrics or args.artifact / "runs" / "metrics.jsonl"
    writer = MetricsWriter(metrics_path if is_rank_zero() else None, {"plan": plan.to_json(), "train": config_dict(cfg)})
    records = []
    progress = Progress(TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
                        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                        disable=args.no_progress or not is_rank_zero())
    try:
        with progress:
            task = progress.add_task("train", total=cfg.steps, loss=float("nan"), tps=0.0)
            def batch_at(step: int):
                return tuple(t.to(plan.device) for t in batches.train_batch(step))

            opt = built.engine.make_optimizer(cfg)
            start = 0
            if args.load is not None:
                from graphllm.resume import load_step

                start = load_step(args.load, built, opt)
                console.print(f"resumed from {args.load} at step {start}")
                progress.update(task, completed=start)
            for rec in train_steps(built.engine, batch_at, cfg, optimizer=opt, start_step=start):
                records.append(rec)
                if rec["step"] % max(1, cfg.log_interval) == 0 or rec["step"] == cfg.steps:
                    writer.write(rec)
                progress.update(task, completed=rec["step"], loss=rec["loss"], tps=rec["tokens_per_s"])
                if args.save is not None and (rec["step"] == cfg.steps or (
                        args.save_interval > 0 and rec["step"] % args.save_interval == 0)):
                    from graphllm.resume import save_step

                    where = save_step(args.save, built, opt, rec["step"], keep_last=args.keep_last)
                    writer.write({"event": "checkpoint", "step": rec["step"], "path": str(where)})
                if args.no_progress:
                    console.print(f"step {rec['step']:>5} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
                                  f"{rec['tokens_per_s']:,.0f} tok/s")
    finally:
        writer.close()
    tps = statistics.median(r["tokens_per_s"] for r in records)
    console.print(f"[green]done[/]: loss {records[0]['loss']:.4f} → {records[-1]['loss']:.4f} over {len(records)} steps, "
                  f"median {tps:,.0f} tok/s; metrics in {metrics_path}")
    return 0
