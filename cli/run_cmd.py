"""`graphllm run ARTIFACT`: train the compiled graph — a thin CLI over graphllm.Trainer.

Exit codes: 0 done; 2 a user error (bad flag or data); 143 / 130 stopped by SIGTERM / SIGINT (after
saving the last whole step when `--save` is given); 1 any other failure (after the same save on a
single-rank run).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def add_parser(sub) -> None:
    from graphllm.job_config import add_config_flag
    from graphllm.options import add_flags
    from graphllm.run_config import RunConfig

    p = sub.add_parser("run", help="train an artifact's compiled graph (on --data, or the built-in corpus)",
                       description="Flags are the fields of graphllm.RunConfig and its TrainConfig (docs/options.md); "
                                   "--config job.toml sets them from a file's [run] section (docs/config_files.md).")
    p.add_argument("artifact", type=Path, help="the directory `graphllm compile --out` wrote")
    p.add_argument("--nproc", type=int, default=None,
                   help="local ranks to start (default: the plan's tp × pp × dp); under torchrun, leave it out")
    p.add_argument("--no-progress", action="store_true",
                   help="plain log lines instead of a progress bar (automatic when stderr is not a terminal)")
    add_flags(p, RunConfig)
    add_config_flag(p, "run")
    p.set_defaults(func=run)


SHOWN_METRICS = {"rewards/accuracies": "acc", "rewards/margins": "margin", "accuracy": "acc", "margin": "margin",
                 "moe/max_load": "max-load", "moe/dropped": "dropped", "mtp/loss": "mtp"}
"""A task's step metrics shown on the console (short name): DPO/SimPO's TRL names, rm's and prm's own, an MoE
model's load balance (passes/moe_stats.py), the multi-token prediction loss (--mtp-layers)."""


def metric_text(e: dict, prefix: str = "") -> str:
    """`acc 0.750 margin 0.123` from a step record's task metrics (`prefix` "valid_": an eval's)."""
    return " ".join(f"{prefix.replace('_', ' ')}{short} {e[prefix + key]:.3f}" for key, short in SHOWN_METRICS.items()
                    if prefix + key in e)


class ConsoleEvents:
    """Draws the Trainer's events: a progress bar (or, with `plain`, a line per logged step: see
    graphllm.step_log), evaluations, checkpoints, stops."""

    def __init__(self, console: Console, *, plain: bool, total: int) -> None:
        self.console, self.plain, self.total = console, plain, total
        self.progress = Progress(TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(),
                                 TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[metrics]}"),
                                 TextColumn("{task.fields[val]}"),
                                 TextColumn("{task.fields[tps]:,.0f} tok/s"), TimeElapsedColumn(), TextColumn("eta"),
                                 TimeRemainingColumn(), console=console, disable=plain or console.quiet)
        self.task = self.progress.add_task("train", total=total, loss=float("nan"), metrics="", val="", tps=0.0)

    def __call__(self, e: dict) -> None:
        kind = e.get("event")
        if kind == "note":
            self.console.print(e["text"])
        elif kind == "resumed":
            self.console.print(f"resumed from {e['path']} at step {e['step']}")
            self.progress.update(self.task, completed=e["step"])
        elif kind == "progress":
            val = " ".join(filter(None, (f"val {e['valid_loss']:.4f}", metric_text(e, "valid_")))) \
                if "valid_loss" in e else ""
            metrics = metric_text(e)
            self.progress.update(self.task, completed=e["step"], loss=e["loss"], tps=e["tokens_per_s"], metrics=metrics,
                                 **({"val": val} if val else {}))
            if self.plain and e.get("logged", True):
                from graphllm.step_log import step_line

                self.console.print(step_line(e, self.total, " ".join(filter(None, (metrics, val)))), highlight=False)
        elif kind == "checkpoint":
            size = f", {e['bytes'] / 1e6:,.1f} MB" if e.get("bytes") is not None else ""
            self.console.print(f"saved step {e['step']} at {e['path']}{size}, {e['seconds']:.1f} s", highlight=False)
        elif kind == "stopped":
            self.console.print(f"[yellow]{e['signal']}[/] after step {e['step']}: {e['message']}")
        elif kind == "failure":
            what = f"saving step {e['step']}" if e.get("saving") else f"step {(e['step'] or 0) + 1}"  # else: the next one
            self.console.print(f"[red]{what} failed[/]: {e['message']}")


def _launch(args: argparse.Namespace, config, data: dict, world: int, console: Console) -> int:
    """Start the ranks, holding the --save root for them: its checks, lock and clean-up happen once,
    here, before any rank compiles."""
    import os

    from graphllm.checkpoint_root import LOCK_ENV, plan_roots, take_root
    from graphllm.job_config import command_line_for_ranks
    from graphllm.launch import relaunch

    plan_roots(config.save, config.load, data["model"])
    lock, notes = take_root(config.save)
    for note in notes:
        console.print(note)
    try:
        if lock is not None:
            os.environ[LOCK_ENV] = str(lock.path)
        with command_line_for_ranks(args.command_line):
            return relaunch(world, args.argv)
    finally:
        if lock is not None:
            os.environ.pop(LOCK_ENV, None)
            lock.release()


def run(args: argparse.Namespace) -> int:
    from graphllm.artifact import read_plan
    from graphllm.errors import GraphllmError
    from graphllm.job_config import invocation
    from graphllm.launch import in_launched_world, is_rank_zero
    from graphllm.options import from_flags
    from graphllm.plan import CompilePlan
    from graphllm.run_config import RunConfig, fine_tuning_note, with_model_defaults
    from graphllm.trainer import Trainer, run_summary

    data = read_plan(args.artifact)
    plan = CompilePlan.from_json(data["plan"], str(args.artifact))
    world = plan.layout.world_size
    if args.nproc is not None and args.nproc != world:
        raise GraphllmError(f"--nproc {args.nproc} does not match the artifact's layout, which needs {world} ranks; "
                            f"use --nproc {world} or recompile with another layout")
    config = with_model_defaults(from_flags(RunConfig, args), data["model"])  # as the trainer will: the lr recorded
    if config.no_compile_cache:  # graphllm.job.load_artifact reads it (and so do the ranks this run starts)
        import os

        from graphllm.compile_cache import DISABLE_ENV

        os.environ[DISABLE_ENV] = "1"
    console = Console(stderr=True, quiet=not is_rank_zero(), soft_wrap=True)  # lines stay whole in log files
    if world > 1 and not in_launched_world():
        return _launch(args, config, data, world, console)
    events = ConsoleEvents(console, plain=args.no_progress or not console.is_terminal, total=config.train.steps)
    with console.status("opening the data, loading the artifact and compiling …"):
        trainer = Trainer.from_artifact(args.artifact, config, on_event=events, invocation=invocation(args, config))
    plan = trainer.built.plan
    source = "the built-in corpus" if config.data is None else " ".join(config.data)
    console.print(f"[green]ready[/] {plan.model} ({plan.backend}, {plan.amp}) compiled in "
                  f"{trainer.built.compile_seconds:.1f} s; training {config.train.steps} steps of "
                  f"{plan.global_batch_size}×{plan.seq_len} tokens on {plan.layout.describe()} from {source}"
                  + (f"; {note}" if (note := fine_tuning_note(config, data["model"])) else ""))
    with events.progress:
        result = trainer.fit()
    if result.stopped_by is None and result.records:
        console.print(f"[green]done[/]: {run_summary(result, config.save)}")
    elif result.stopped_by is None:
        console.print(f"nothing to run: resumed at step {result.start_step} and --steps {config.train.steps} is the "
                      "run's total; give a larger --steps to train further")
    return result.exit_code
