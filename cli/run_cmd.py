"""`graphllm run ARTIFACT`: train the compiled graph on indexed datasets (`--data`) or the built-in corpus.

Exit codes: 0 done; 2 a user error (bad flag or data); 143 / 130 stopped by SIGTERM / SIGINT (after
saving the last whole step when `--save` is given); 1 any other failure (after the same save on a
single-rank run).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="train an artifact's compiled graph (on --data, or the built-in corpus)")
    p.add_argument("artifact", type=Path)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--lr-decay-style", choices=["cosine", "linear", "constant"], default="cosine",
                   help="after warmup: decay to lr × min-lr-ratio (cosine or linear) or keep lr")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics", type=Path, default=None, help="JSON-lines file (default ARTIFACT/runs/metrics.jsonl)")
    p.add_argument("--tensorboard", type=Path, default=None, metavar="DIR",
                   help="also write TensorBoard scalars to DIR (needs the tensorboard package)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    p.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms and a fixed thread count: two runs are bitwise equal")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--save", type=Path, default=None,
                   help="checkpoint root: writes ROOT/step_<N>/ (any layout can load it); also on SIGTERM/SIGINT "
                        "or a failing step")
    p.add_argument("--save-interval", type=int, default=0, help="save every N steps (and always after the last)")
    p.add_argument("--keep-last", type=int, default=0, help="keep only the newest N checkpoints (0: keep all)")
    p.add_argument("--load", type=Path, default=None, help="resume from a checkpoint dir, or the newest under a root")
    p.add_argument("--nproc", type=int, default=None,
                   help="local ranks to start (default: the plan's tp × pp × dp); under torchrun, leave it out")
    d = p.add_argument_group("data (graphllm preprocess output; default: the built-in corpus)")
    d.add_argument("--data", nargs="+", default=None, metavar="[WEIGHT] PREFIX",
                   help="a dataset prefix, or weight/prefix pairs to blend: --data 0.7 A 0.3 B")
    d.add_argument("--split", default=None, help="train,valid,test weights over documents (default 969,30,1)")
    d.add_argument("--eval-interval", type=int, default=0, help="validation loss every N steps (0: never)")
    d.add_argument("--eval-iters", type=int, default=10, help="global batches per validation")
    d.add_argument("--reset-position-ids", action="store_true",
                   help="pretrain: positions restart after each document's EOD (with --reset-attention-mask)")
    d.add_argument("--reset-attention-mask", action="store_true",
                   help="pretrain: attention does not cross documents (with --reset-position-ids)")
    p.set_defaults(func=run)


def make_deterministic(threads: int | None) -> int:
    """Deterministic kernels and a fixed intra-op thread count (reduction order depends on it)."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for determinism
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads or torch.get_num_threads())
    return torch.get_num_threads()


def open_feed(args: argparse.Namespace, plan, vocab: int, seed: int):
    """The run's batch source, checked against the compiled graph (vocab, seq_len, EOD-reset) from the
    artifact's plan alone, so bad data fails before the compile."""
    from graphllm.data.datasets import DEFAULT_SPLIT, open_data
    from graphllm.data.feed import BuiltinFeed, DatasetFeed
    from graphllm.errors import GraphllmError

    reset = args.reset_position_ids or args.reset_attention_mask
    if args.reset_position_ids != args.reset_attention_mask:
        raise GraphllmError("give --reset-position-ids and --reset-attention-mask together: graphllm resets positions "
                            "and attention at the same boundaries")
    if reset and not plan.eod_reset:
        raise GraphllmError(f"--reset-position-ids needs an artifact compiled with --eod-reset (its graph takes "
                            f"position ids); recompile {args.artifact} with --eod-reset")
    if args.data is None:
        from graphllm.data import (
            BatchSpec,
            TokenBatches,
            builtin_token_ids,
            builtin_tokenizer,
        )

        if args.split is not None or reset:
            raise GraphllmError("--split and --reset-position-ids apply to --data datasets; give --data PREFIX")
        tok = builtin_tokenizer()
        if tok.vocab_size > vocab:
            raise GraphllmError(f"the built-in tokenizer has {tok.vocab_size} tokens but {plan.model} has a "
                                f"vocabulary of {vocab}; use a model with a larger vocab_size")
        batches = TokenBatches(builtin_token_ids(tok), BatchSpec(batch_size=plan.global_batch_size,
                                                                 seq_len=plan.seq_len, seed=seed))
        return BuiltinFeed(batches, with_positions=plan.eod_reset)
    splits = open_data(args.data, seq_len=plan.seq_len, split=args.split or DEFAULT_SPLIT, reset=reset,
                       vocab_size=vocab)
    if splits.packed and not plan.eod_reset:
        raise GraphllmError(f"--data {' '.join(args.data)} is packed (several samples per row), which needs "
                            f"position ids that restart per sample: recompile {args.artifact} with --eod-reset")
    return DatasetFeed(splits, global_batch_size=plan.global_batch_size, seed=seed, with_positions=plan.eod_reset)


def check_tensorboard(path: Path | None) -> None:
    import importlib.util

    from graphllm.errors import GraphllmError

    if path is not None and importlib.util.find_spec("tensorboard") is None:
        raise GraphllmError("--tensorboard needs the tensorboard package: pip install tensorboard "
                            "(or leave the flag out; metrics still go to the JSON-lines file)")


def open_tensorboard(path: Path | None):
    if path is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(path))


def run(args: argparse.Namespace) -> int:
    from graphllm.artifact import read_plan
    from graphllm.errors import GraphllmError
    from graphllm.job import load_artifact
    from graphllm.launch import in_launched_world, is_rank_zero, relaunch
    from graphllm.plan import CompilePlan
    from graphllm.resume import StopSignals, save_final, save_step
    from graphllm.train import MetricsWriter, TrainConfig, config_dict, train_steps

    plan_data = read_plan(args.artifact)
    plan = CompilePlan.from_json(plan_data["plan"], str(args.artifact))
    world = plan.layout().world_size
    if args.nproc is not None and args.nproc != world:
        raise GraphllmError(f"--nproc {args.nproc} does not match the artifact's layout, which needs {world} ranks; "
                            f"use --nproc {world} or recompile with another layout")
    if world > 1 and not in_launched_world():
        return relaunch(world, args.argv)
    if args.eval_interval < 0 or args.eval_iters < 1:
        raise GraphllmError(f"--eval-interval must be ≥ 0 and --eval-iters ≥ 1, got {args.eval_interval}, {args.eval_iters}")

    cfg = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio,
                      lr_decay_style=args.lr_decay_style, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                      seed=args.seed)
    run_info: dict = {"deterministic": args.deterministic}
    if args.deterministic:
        run_info["threads"] = make_deterministic(args.threads)
    elif args.threads:
        import torch

        torch.set_num_threads(args.threads)
    console = Console(stderr=True, quiet=not is_rank_zero())
    check_tensorboard(args.tensorboard)
    with console.status("opening the data …"):
        feed = open_feed(args, plan, int(plan_data["model"]["config"]["vocab_size"]), cfg.seed)
        valid = feed.valid_batches(args.eval_iters) if args.eval_interval > 0 else []
    with console.status("loading artifact and compiling …"):
        _, built = load_artifact(args.artifact)
    plan = built.plan
    tb = open_tensorboard(args.tensorboard) if is_rank_zero() else None
    source = "the built-in corpus" if args.data is None else " ".join(args.data)
    console.print(f"[green]ready[/] {plan.model} ({plan.backend}, {plan.amp}) compiled in {built.compile_seconds:.1f} s; "
                  f"training {cfg.steps} steps of {plan.global_batch_size}×{plan.seq_len} tokens on {plan.layout().describe()} "
                  f"from {source}")
    metrics_path = args.metrics or args.artifact / "runs" / "metrics.jsonl"
    writer = MetricsWriter(metrics_path if is_rank_zero() else None,
                           {"plan": plan.to_json(), "train": config_dict(cfg), "data": args.data, "run": run_info})
    records: list[dict] = []
    progress = Progress(TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[val]}"),
                        TextColumn("{task.fields[tps]:,.0f} tok/s"), TimeElapsedColumn(), TextColumn("eta"),
                        TimeRemainingColumn(), console=console, disable=args.no_progress or not is_rank_zero())
    opt = built.engine.make_optimizer(cfg)
    start = 0
    if args.load is not None:
        from graphllm.resume import load_step

        extra: dict = {}
        start = load_step(args.load, built, opt, extra_out=extra)
        feed.resume(extra, start, f"--load {args.load}")
        console.print(f"resumed from {args.load} at step {start}")
    status: dict = {}

    def scalars(step: int, values: dict) -> None:
        if tb is not None:
            for k, v in values.items():
                tb.add_scalar(k, v, step)

    try:
        with StopSignals() as signals, progress:
            task = progress.add_task("train", total=cfg.steps, loss=float("nan"), val="", tps=0.0, completed=start)

            def batch_at(step: int):
                return tuple(t.to(plan.device) for t in feed.train_batch(step))

            try:
                for rec in train_steps(built.engine, batch_at, cfg, optimizer=opt, start_step=start, status=status):
                    step = rec["step"]
                    records.append(rec)
                    if step % max(1, cfg.log_interval) == 0 or step == cfg.steps:
                        writer.write(rec)
                        scalars(step, {"train/loss": rec["loss"], "train/lr": rec["lr"],
                                       "train/grad_norm": rec["grad_norm"], "train/tokens_per_s": rec["tokens_per_s"]})
                    val_text = ""
                    if valid and (step % args.eval_interval == 0 or step == cfg.steps):
                        vloss = statistics.fmean(built.engine.eval_loss(*(t.to(plan.device) for t in b)) for b in valid)
                        writer.write({"event": "eval", "step": step, "valid_loss": vloss,
                                      "valid_ppl": math.exp(min(vloss, 50.0)), "batches": len(valid)})
                        scalars(step, {"valid/loss": vloss})
                        val_text = f"val {vloss:.4f}"
                        progress.update(task, val=val_text)
                    progress.update(task, completed=step, loss=rec["loss"], tps=rec["tokens_per_s"])
                    if args.save is not None and (step == cfg.steps or (
                            args.save_interval > 0 and step % args.save_interval == 0)):
                        where = save_step(args.save, built, opt, step, keep_last=args.keep_last,
                                          extra=feed.state(step))
                        writer.write({"event": "checkpoint", "step": step, "path": str(where)})
                    if args.no_progress:
                        console.print(f"step {step:>5} loss {rec['loss']:.4f} lr {rec['lr']:.2e} "
                                      f"{rec['tokens_per_s']:,.0f} tok/s {val_text}".rstrip())
                    if (signum := signals.requested()) is not None:
                        return _stop(args, built, opt, status, start, feed, writer, console, signum)
            except Exception as exc:
                if args.save is not None and world == 1:  # several ranks: the others wait in collectives
                    where, msg = save_final(args.save, built, opt, status, start_step=start,
                                            extra=feed.state(status.get("completed", start)))
                    writer.write({"event": "failure", "step": status.get("completed"), "error": str(exc),
                                  "checkpoint": str(where) if where else None})
                    console.print(f"[red]step {status.get('completed', start) + 1} failed[/]: {msg}")
                raise
    finally:
        writer.close()
        if tb is not None:
            tb.close()
    if records:
        tps = statistics.median(r["tokens_per_s"] for r in records)
        console.print(f"[green]done[/]: loss {records[0]['loss']:.4f} → {records[-1]['loss']:.4f} over {len(records)} "
                      f"steps, median {tps:,.0f} tok/s; metrics in {metrics_path}")
    return 0


def _stop(args, built, opt, status, start, feed, writer, console, signum: int) -> int:
    """Stopped by a signal between steps: save the last whole step (with --save), say where, exit 128+signum."""
    import signal

    name = signal.Signals(signum).name
    done = status.get("completed", start)
    where, msg = None, "not saved (no --save)"
    if args.save is not None:
        from graphllm.resume import save_final

        where, msg = save_final(args.save, built, opt, status, start_step=start, extra=feed.state(done))
    writer.write({"event": "stopped", "signal": name, "step": done, "checkpoint": str(where) if where else None})
    console.print(f"[yellow]{name}[/] after step {done}: {msg}")
    return 128 + signum
