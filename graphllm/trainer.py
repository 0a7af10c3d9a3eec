"""graphllm.Trainer: the training loop of a compiled artifact, the same from Python and from `graphllm run`.

    trainer = Trainer.from_artifact("build/tiny", RunConfig(train=TrainConfig(steps=50), save="ckpt/"))
    result = trainer.fit()

`fit` draws the data feed's batches, runs the steps, validates every `eval_interval` steps, checkpoints
every `save_interval` steps and after the last, resumes from `load`, and writes the metrics stream (JSON
lines; TensorBoard scalars with `tensorboard`). SIGTERM/SIGINT between steps stop the run after saving
the last whole step (`result.stopped_by`, exit code 143/130); a step that raises is saved the same way
on a single-rank run, then re-raised. `on_event` sees every event as it happens (the CLI draws its
progress from it): the persisted ones ("start", step records, "eval", "checkpoint", "stopped",
"failure") and "resumed".
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from graphllm.disk_space import DiskFull, checkpoint_bytes, disk_full, free_bytes
from graphllm.errors import GraphllmError
from graphllm.data.feed import to_device
from graphllm.run_config import RunConfig, open_feed, with_model_defaults

EventFn = Callable[[dict[str, Any]], None]


@dataclass(kw_only=True)
class TrainResult:
    """What `Trainer.fit` did."""

    records: list[dict[str, Any]] = field(default_factory=list)
    """One metrics dict per step run (step, loss, lr, grad_norm, step_time_s, tokens_per_s, ...)."""
    start_step: int = 0
    stopped_by: int | None = None
    """The signal number that stopped the run between steps (SIGTERM 15, SIGINT 2), else None."""
    checkpoint: Path | None = None
    """The newest checkpoint this run wrote (None: no --save, or nothing new to save)."""
    metrics_path: Path | None = None

    @property
    def exit_code(self) -> int:
        """0 when all steps ran; 128 + signal number when a signal stopped the run."""
        return 0 if self.stopped_by is None else 128 + self.stopped_by

    @property
    def losses(self) -> list[float]:
        return [r["loss"] for r in self.records]


def make_deterministic(threads: int | None) -> int:
    """Deterministic kernels and a fixed intra-op thread count (reduction order depends on it)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for determinism
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads or torch.get_num_threads())
    return torch.get_num_threads()


def check_tensorboard(path: str | None) -> None:
    import importlib.util

    if path is not None and importlib.util.find_spec("tensorboard") is None:
        raise GraphllmError("--tensorboard needs the tensorboard package: pip install tensorboard "
                            "(or leave the flag out; metrics still go to the JSON-lines file)")


class TensorBoardSink:
    """Scalars of the step and eval events in a TensorBoard log directory."""

    SCALARS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
               "tokens_per_s": "train/tokens_per_s"}

    def __init__(self, path: str, metric_names: tuple[str, ...] = ()) -> None:
        """`metric_names`: the task's metrics (train/rewards/accuracies, valid/rewards/accuracies, ...)."""
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(log_dir=str(path))
        self.metric_names = metric_names

    def write(self, record: dict[str, Any]) -> None:
        if record.get("event") == "eval":
            self._w.add_scalar("valid/loss", record["valid_loss"], record["step"])
            for key in self.metric_names:
                if f"valid_{key}" in record:
                    self._w.add_scalar(f"valid/{key}", record[f"valid_{key}"], record["step"])
        elif "event" not in record:
            for key, tag in self.SCALARS.items():
                self._w.add_scalar(tag, record[key], record["step"])
            for key in self.metric_names:
                if key in record:
                    self._w.add_scalar(f"train/{key}", record[key], record["step"])

    def close(self) -> None:
        self._w.close()


class Trainer:
    """Trains one rank of a built artifact (graphllm.job.Built) under a RunConfig."""

    def __init__(self, built, config: RunConfig, *, feed, artifact: Path | None = None, run_info: dict | None = None,
                 on_event: EventFn | None = None, resume_from: Path | None | str = "config.load",
                 lock=None, invocation: dict | None = None) -> None:
        """`resume_from`: a checkpoint or root to resume from, None to start at step 0 (default: `config.load`,
        as given; `from_artifact` decides it from the roots); `lock`: the --save root's RootLock this trainer
        releases when `fit` ends; `invocation`: how the run was started, for the metrics header
        (graphllm.job_config.invocation; default: this process's command line and graphllm's commit)."""
        from graphllm.job_config import invocation as process_invocation

        self.built, self.config, self.feed = built, config, feed
        self.invocation = invocation if invocation is not None else process_invocation(None)
        self.artifact = artifact
        self.run_info = dict(run_info or {})
        self.on_event = on_event
        if resume_from == "config.load":
            resume_from = Path(config.load) if config.load else None
        self.resume_from = resume_from
        self._lock = lock
        self.valid = feed.valid_batches(config.eval_iters) if config.eval_interval > 0 else []
        self.optimizer = built.engine.make_optimizer(config.train)
        self._sinks: list[Any] = []

    @classmethod
    def from_artifact(cls, artifact: str | Path, config: RunConfig | None = None, *,
                      on_event: EventFn | None = None, invocation: dict | None = None) -> "Trainer":
        """Settle the checkpoint roots (checked, locked, left-overs removed, auto-resume decided) and open
        the data (checked against the artifact's plan), then load and compile the artifact: nothing is
        compiled for a run that cannot save or read its data. Under a plan of several ranks, call it on
        every rank (torchrun; `graphllm run` starts them)."""
        from graphllm.artifact import read_plan
        from graphllm.checkpoint_root import plan_roots, take_root
        from graphllm.job import load_artifact
        from graphllm.plan import CompilePlan

        artifact, config = Path(artifact), config or RunConfig()
        data = read_plan(artifact)
        config = with_model_defaults(config, data["model"])  # pretrained weights: the fine-tuning lr unless given
        plan = CompilePlan.from_json(data["plan"], str(artifact / "plan.json"))
        run_info: dict[str, Any] = {"deterministic": config.deterministic}
        if config.deterministic:
            run_info["threads"] = make_deterministic(config.threads)
        elif config.threads:
            torch.set_num_threads(config.threads)
        check_tensorboard(config.tensorboard)
        roots = plan_roots(config.save, config.load, data["model"])
        feed = open_feed(artifact, plan, int(data["model"]["config"]["vocab_size"]), config, model=data["model"])
        lock, notes = take_root(config.save)
        try:
            for note in roots.notes + notes:
                if on_event is not None:
                    on_event({"event": "note", "text": note})
            _, built = load_artifact(artifact, use_compile_cache=False if config.no_compile_cache else None)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return cls(built, config, feed=feed, artifact=artifact, run_info=run_info, on_event=on_event,
                   resume_from=roots.resume, lock=lock, invocation=invocation)

    # -- the loop --------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Run the configured steps (see the module docstring); returns what happened."""
        from graphllm.signals import StopSignals
        from graphllm.step_log import StepFigures
        from graphllm.train import train_steps

        cfg = self.config
        figures = StepFigures(self.built)  # tokens/s per rank, TFLOP/s, MFU, peak memory, time
        result = TrainResult(metrics_path=self._metrics_path())
        self._open_sinks(result.metrics_path)
        status: dict[str, Any] = {}
        try:
            result.start_step = self._resume()
            self._precompute_reference()
            with StopSignals() as signals:
                try:
                    for rec in train_steps(self.built.engine, self._batch_at, cfg.train, optimizer=self.optimizer,
                                           start_step=result.start_step, status=status):
                        rec = figures(rec)
                        result.records.append(rec)
                        self._after_step(rec, result)
                        if (signum := signals.requested()) is not None:
                            self._stop(result, status, signum)
                            break
                except Exception as exc:
                    self._fail(result, status, exc)
                    raise
        finally:
            for sink in self._sinks:
                sink.close()
            if self._lock is not None:
                self._lock.release()
        return result

    def _batch_at(self, step: int) -> tuple[torch.Tensor, ...]:
        return to_device(self.feed.train_batch(step), self.built.plan.device)

    def _metrics_path(self) -> Path | None:
        """--metrics, else ARTIFACT/runs/<--run-name or the start time>/metrics.jsonl (a new folder per run:
        a name that exists gets a -2, -3, … suffix; only rank 0 writes it)."""
        if self.config.metrics is not None:
            return Path(self.config.metrics)
        if self.artifact is None:
            return None
        runs = self.artifact / "runs"
        name = self.config.run_name or time.strftime("%Y%m%d-%H%M%S")
        folder, n = runs / name, 1
        while self.built.rank == 0 and folder.exists():
            n += 1
            folder = runs / f"{name}-{n}"
        return folder / "metrics.jsonl"

    def _open_sinks(self, metrics: Path | None) -> None:
        from graphllm.train import MetricsWriter, config_dict

        rank0 = self.built.rank == 0
        self._sinks = []
        if rank0 and self.config.tensorboard is not None:
            self._sinks.append(TensorBoardSink(self.config.tensorboard, self.built.engine.metric_names))
        self._sinks.insert(0, MetricsWriter(metrics if rank0 else None, {
            "plan": self.built.plan.to_json(), "train": config_dict(self.config.train), "data": self.config.data,
            "run": self.run_info, "invocation": self.invocation}))
        self._emit({"event": "start"}, persist=False)

    def _emit(self, record: dict[str, Any], *, persist: bool = True) -> None:
        if persist:
            for sink in self._sinks:
                sink.write(record)
        if self.on_event is not None:
            self.on_event(record)

    def _resume(self) -> int:
        if self.resume_from is None:
            return 0
        from graphllm.resume import load_step

        from graphllm.checkpoint_root import set_aside

        extra: dict = {}
        skipped: list[tuple[str, str]] = []
        start = load_step(self.resume_from, self.built, self.optimizer, extra_out=extra, skipped=skipped)
        self.feed.resume(extra, start, f"--load {self.resume_from}")
        for ckpt, damage in skipped:
            note = f"skipped {ckpt}: damaged ({damage})"
            if self.config.save is not None and self.built.rank == 0:
                note += set_aside(Path(ckpt), Path(self.config.save))
            self._emit({"event": "note", "text": note}, persist=False)
        self._emit({"event": "resumed", "step": start, "path": extra.get("checkpoint", str(self.resume_from))},
                   persist=False)
        return start

    def _after_step(self, rec: dict[str, Any], result: TrainResult) -> None:
        cfg, step = self.config, rec["step"]
        last = step == cfg.train.steps
        logged = step % cfg.train.log_interval == 0 or last
        shown = {**rec, "logged": logged}
        if logged:
            self._emit(rec)
        if self.valid and (step % cfg.eval_interval == 0 or last):
            vloss, vmetrics = self._validate()
            self._emit({"event": "eval", "step": step, "valid_loss": vloss, "valid_ppl": math.exp(min(vloss, 50.0)),
                        "batches": len(self.valid), **vmetrics})
            shown.update(valid_loss=vloss, **vmetrics)
        if self.on_event is not None:
            self.on_event({"event": "progress", **shown})
        if cfg.save is not None and (last or (cfg.save_interval > 0 and step % cfg.save_interval == 0)):
            self._save_interval(step, last, result)

    def _validate(self) -> tuple[float, dict[str, float]]:
        """Mean loss over the validation batches, and the task's metrics averaged the same way ("valid_<name>")."""
        engine, losses, metrics = self.built.engine, [], []
        for batch in self.valid:
            losses.append(engine.eval_loss(*to_device(batch, self.built.plan.device)))
            metrics.append(dict(engine.metrics))
        return statistics.fmean(losses), {f"valid_{k}": statistics.fmean(m[k] for m in metrics) for k in metrics[0]}

    def _precompute_reference(self) -> None:
        """DPO `--reference precompute`: the reference graph's log-probs of every train and valid pair, once,
        before the first step; the feed serves them with each batch, and the graph (with its frozen weights)
        is dropped. Every data-parallel rank computes its share of the micro-batches."""
        built = self.built
        if built.reference is None or built.engine.reference is not None:
            return
        from graphllm.tasks.reference import precompute_reference

        plan, st = built.plan, built.engine.st
        dp = plan.layout.dp
        share = {"dp_rank": st.coords.dp, "dp": dp, "group": st.group("dp")} if st is not None and dp > 1 else {}
        t0, pairs = time.perf_counter(), 0
        for split, ds in self.feed.datasets().items():
            self.feed.references[split] = precompute_reference(built.reference, ds, micro_batch=plan.batch_size,
                                                               device=plan.device, **share)
            pairs += len(ds)
        built.reference = None
        if self.config.eval_interval > 0:
            self.valid = self.feed.valid_batches(self.config.eval_iters)  # now with their reference column
        self._emit({"event": "note", "text": f"reference log-probs of {pairs} pairs precomputed in "
                                             f"{time.perf_counter() - t0:.1f} s"}, persist=False)

    def _save_interval(self, step: int, last: bool, result: TrainResult) -> None:
        """Save `step`. Out of disk space: say so and where; at an interval training goes on (the state is
        still in memory), after the last step the run fails."""
        from graphllm.resume import save_step
        from graphllm.step_log import dir_bytes

        t0 = time.perf_counter()
        try:
            result.checkpoint = save_step(Path(self.config.save), self.built, self.optimizer, step,
                                          keep_last=self.config.keep_last, extra=self.feed.state(step))
        except Exception as exc:
            if not self._out_of_space(exc):
                raise
            msg = self._disk_full_message()
            self._emit({"event": "failure", "step": step, "error": msg, "checkpoint": None, "saving": True,
                        "message": msg + ("" if last else "; training goes on")})
            if last:
                raise DiskFull(msg + f"; step {step} was not saved") from exc
            return
        seconds = time.perf_counter() - t0
        size = dir_bytes(result.checkpoint) if self.built.rank == 0 else None  # all ranks' files, once
        self._emit({"event": "checkpoint", "step": step, "path": str(result.checkpoint), "bytes": size,
                    "seconds": seconds})

    def _out_of_space(self, exc: BaseException) -> bool:
        """A failed save ran out of disk: its errors say so (see disk_full), or the root cannot hold a checkpoint."""
        return disk_full(exc) or free_bytes(Path(self.config.save)) < checkpoint_bytes(self.built)

    def _disk_full_message(self) -> str:
        needed = checkpoint_bytes(self.built)
        return f"no space left on device at {self.config.save} (a checkpoint needs about {needed / 2**30:,.2f} GB)"

    def _stop(self, result: TrainResult, status: dict, signum: int) -> None:
        """Stopped by a signal between steps: save the last whole step (with `save`), say where."""
        import signal

        done = status.get("completed", result.start_step)
        where, msg = None, "not saved (no --save)"
        if self.config.save is not None:
            where, msg = self._save_final(status, result.start_step, done)
        result.stopped_by, result.checkpoint = signum, where or result.checkpoint
        self._emit({"event": "stopped", "signal": signal.Signals(signum).name, "step": done,
                    "checkpoint": str(where) if where else None, "message": msg})

    def _fail(self, result: TrainResult, status: dict, exc: Exception) -> None:
        """A step raised: on a single rank, save the last whole step first (other ranks would wait in
        collectives), and record the failure."""
        if self.config.save is None or self.built.plan.layout.world_size > 1 or isinstance(exc, DiskFull):
            return
        done = status.get("completed", result.start_step)
        where, msg = self._save_final(status, result.start_step, done)
        self._emit({"event": "failure", "step": status.get("completed"), "error": str(exc),
                    "checkpoint": str(where) if where else None, "message": msg})

    def _save_final(self, status: dict, start: int, done: int) -> tuple[Path | None, str]:
        from graphllm.resume import save_final

        try:
            return save_final(Path(self.config.save), self.built, self.optimizer, status, start_step=start,
                              extra=self.feed.state(done))
        except Exception as exc:
            if not self._out_of_space(exc):
                raise
            msg = self._disk_full_message() + f"; step {done} was not saved"
            self._emit({"event": "failure", "step": done, "error": msg, "checkpoint": None, "saving": True,
                        "message": msg})
            raise DiskFull(msg) from exc


def run_summary(result: TrainResult, save: str | Path | None = None) -> str:
    """The final console line of a run: losses, median throughput, where the metrics and the weights are."""
    kept = (f"last checkpoint {result.checkpoint}" if result.checkpoint is not None
            else "no --save: weights not kept" if save is None else f"nothing new saved under {save}")
    if not result.records:
        return f"no step ran; {kept}"
    tps = statistics.median(r["tokens_per_s"] for r in result.records)
    return (f"loss {result.records[0]['loss']:.4f} → {result.records[-1]['loss']:.4f} over {len(result.records)} "
            f"steps, median {tps:,.0f} tok/s; metrics in {result.metrics_path}; {kept}")

