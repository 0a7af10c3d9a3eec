"""graphllm.Trainer: training from Python behaves as `graphllm run` does (the CLI is a thin layer over it).

- the same run from Python and from the CLI gives the same losses and the same metrics stream;
- checkpoints at the interval, resume from them in Python continues the run exactly;
- SIGTERM during `fit` stops after the whole step, saves it, and reports the signal (exit code 143).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from graphllm.cli.main import main
from graphllm.run_config import RunConfig
from graphllm.train import TrainConfig
from graphllm.trainer import Trainer


@pytest.fixture()
def artifact(tiny_artifact) -> Path:
    return tiny_artifact  # tests/conftest.py: compiled once for the session


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_python_run_equals_cli_run(artifact: Path, tmp_path: Path) -> None:
    cli_metrics, py_metrics = tmp_path / "cli.jsonl", tmp_path / "py.jsonl"
    assert main(["run", str(artifact), "--steps", "4", "--no-progress", "--metrics", str(cli_metrics),
                 "--eval-interval", "0"]) == 0
    result = Trainer.from_artifact(artifact, RunConfig(train=TrainConfig(steps=4), metrics=str(py_metrics))).fit()
    assert result.exit_code == 0 and result.stopped_by is None
    cli_steps = [r for r in _rows(cli_metrics) if "event" not in r]
    py_steps = [r for r in _rows(py_metrics) if "event" not in r]
    assert [r["loss"] for r in py_steps] == [r["loss"] for r in cli_steps] == result.losses
    assert _rows(py_metrics)[0]["event"] == "start" and _rows(py_metrics)[0]["train"]["steps"] == 4


def test_checkpoints_and_resume_continue_the_run(artifact: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    whole = Trainer.from_artifact(artifact, RunConfig(train=TrainConfig(steps=4), metrics=str(tmp_path / "a"))).fit()
    first = Trainer.from_artifact(artifact, RunConfig(train=TrainConfig(steps=4), save=str(ckpt), save_interval=2,
                                                      metrics=str(tmp_path / "b")))
    seen: list[int] = []

    def stop_after_two(event: dict) -> None:  # interrupt like a killed job: the step-2 checkpoint stays
        if event.get("event") == "checkpoint":
            seen.append(event["step"])
            if event["step"] == 2:
                raise KeyboardInterrupt

    first.on_event = stop_after_two
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    assert seen == [2] and (ckpt / "step_2").is_dir()
    resumed = Trainer.from_artifact(artifact, RunConfig(train=TrainConfig(steps=4), load=str(ckpt),
                                                        metrics=str(tmp_path / "c"))).fit()
    assert resumed.start_step == 2 and resumed.losses == whole.losses[2:]


def test_sigterm_during_fit_saves_the_last_step(artifact: Path, tmp_path: Path) -> None:
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    trainer = Trainer.from_artifact(artifact, RunConfig(train=TrainConfig(steps=10), save=str(ckpt),
                                                        metrics=str(metrics)))

    def term_at_three(event: dict) -> None:
        if event.get("event") == "progress" and event["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer.on_event = term_at_three
    result = trainer.fit()
    assert result.stopped_by == signal.SIGTERM and result.exit_code == 143
    assert len(result.records) == 3 and result.checkpoint == ckpt / "step_3" and (ckpt / "step_3").is_dir()
    stopped = [r for r in _rows(metrics) if r.get("event") == "stopped"]
    assert stopped == [{"event": "stopped", "signal": "SIGTERM", "step": 3, "checkpoint": str(ckpt / "step_3"),
                        "message": f"saved step 3 at {ckpt / 'step_3'}"}]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
