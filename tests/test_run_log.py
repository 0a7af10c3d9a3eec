"""The training log a user runs jobs by (graphllm/step_log.py, cli/run_cmd.py, cli/console.py):

- redirected output (a file, a pipe: not a terminal) gets plain lines without `--no-progress`, one per
  `--log-interval` steps and the last, each with step/total, loss, lr, grad norm, step time, tokens/s of the
  global batch and per rank, TFLOP/s per rank, MFU, peak memory and the wall-clock time; the metrics file holds
  the same figures;
- a line per checkpoint saved (path, size, seconds) and a final line saying where the last checkpoint is, or
  that no --save kept the weights;
- runs are kept apart (ARTIFACT/runs/<name>/), and a recompile into the artifact keeps runs/ and profile/;
- the MFU denominator is measured once per machine and cached, not remeasured per run;
- tables are tab-separated when redirected, drawn at a terminal.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
from rich.console import Console
from rich.table import Table

from graphllm.cli.main import main

STEP_LINE = re.compile(
    r"^step +(\d+)/(\d+) loss [\d.]+ lr [\d.e+-]+ grad [\d.e+-]+ [\d,]+ ms [\d,]+ tok/s \([\d,]+/rank\) "
    r"[\d.e+-]+ TFLOP/s/rank MFU [\d.]+% mem [\d.]+ (KiB|MiB|GiB) \d\d:\d\d:\d\d$")


@pytest.fixture()
def artifact(tiny_artifact) -> Path:
    return tiny_artifact  # tests/conftest.py: compiled once for the session


def _steps_logged(err: str) -> list[int]:
    return [int(m.group(1)) for line in err.splitlines() if (m := STEP_LINE.match(line))]


def test_redirected_run_logs_plain_lines_every_interval_with_the_figures(artifact, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert main(["run", str(artifact), "--steps", "5", "--log-interval", "2", "--save", str(ckpt),
                 "--save-interval", "3", "--run-name", "interval"]) == 0
    err = capsys.readouterr().err
    assert _steps_logged(err) == [2, 4, 5], err  # no --no-progress: stderr is not a terminal here
    saved = [line for line in err.splitlines() if line.startswith("saved step")]
    assert [s.split()[2] for s in saved] == ["3", "5"], saved
    assert re.fullmatch(rf"saved step 3 at {re.escape(str(ckpt / 'step_3'))}, [\d.,]+ MB, [\d.]+ s", saved[0])
    assert err.rstrip().endswith(f"last checkpoint {ckpt / 'step_5'}"), err
    rows = [json.loads(line) for line in (artifact / "runs" / "interval" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "event" not in r]
    assert [r["step"] for r in steps] == [2, 4, 5]
    for r in steps:
        assert r["tokens_per_s_per_rank"] == r["tokens_per_s"]  # one rank
        assert 0 < r["mfu"] < 10 and r["tflops_per_rank"] > 0 and r["peak_memory_bytes"] > 2**20 and r["time"] > 0
    checkpoint = next(r for r in rows if r.get("event") == "checkpoint")
    assert checkpoint["bytes"] == sum(f.stat().st_size for f in (ckpt / "step_3").rglob("*") if f.is_file())


def test_without_save_the_final_line_says_the_weights_are_not_kept(artifact, capsys):
    assert main(["run", str(artifact), "--steps", "2", "--run-name", "nosave"]) == 0
    err = capsys.readouterr().err
    assert _steps_logged(err) == [1, 2]
    assert err.rstrip().endswith("no --save: weights not kept"), err


def test_resuming_at_the_total_says_there_is_nothing_to_run(artifact, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert main(["run", str(artifact), "--steps", "2", "--save", str(ckpt), "--run-name", "to2"]) == 0
    capsys.readouterr()
    assert main(["run", str(artifact), "--steps", "2", "--load", str(ckpt), "--run-name", "again"]) == 0
    assert capsys.readouterr().err.rstrip().endswith("nothing to run: resumed at step 2 and --steps 2 is the run's "
                                                     "total; give a larger --steps to train further")


def test_runs_are_kept_apart_and_survive_a_recompile(tmp_path, capsys):
    art = tmp_path / "art"
    args = ["compile", "--model", "tiny-llama", "--backend", "eager", "--batch-size", "2", "--seq-len", "32",
            "--out", str(art)]
    assert main(args) == 0
    for _ in range(2):
        assert main(["run", str(art), "--steps", "1", "--run-name", "same"]) == 0
    assert main(["run", str(art), "--steps", "1"]) == 0  # default name: the start time
    (art / "profile").mkdir()
    (art / "profile" / "summary_rank0.json").write_text("{}")
    runs = sorted(p.name for p in (art / "runs").iterdir())
    assert runs[-2:] == ["same", "same-2"] and re.fullmatch(r"\d{8}-\d{6}", runs[0]), runs
    assert main(args) == 0  # recompile into the same --out
    assert sorted(p.name for p in (art / "runs").iterdir()) == runs
    assert (art / "profile" / "summary_rank0.json").read_text() == "{}"
    assert all((art / "runs" / r / "metrics.jsonl").stat().st_size > 0 for r in runs)
    capsys.readouterr()
    assert main(["run", str(art), "--steps", "1", "--run-name", "../escape"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--run-name '../escape'" in err[0]


def test_device_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    from graphllm import step_log

    calls = []

    def measure(dtype, device):
        calls.append((dtype, device))
        return 1e11

    monkeypatch.setattr(step_log, "measured_matmul_peak", measure)
    assert step_log.device_peak("cpu", torch.float32, tmp_path) == 1e11
    assert step_log.device_peak("cpu", torch.float32, tmp_path) == 1e11
    assert len(calls) == 1  # the second run reads the cache
    assert step_log.device_peak("cpu", torch.bfloat16, tmp_path) == 1e11 and len(calls) == 2  # another dtype
    cached = json.loads((tmp_path / step_log.PEAK_FILE).read_text())
    assert set(cached) == {step_log.peak_key("cpu", torch.float32), step_log.peak_key("cpu", torch.bfloat16)}
    (tmp_path / step_log.PEAK_FILE).write_text("{not json")
    assert step_log.device_peak("cpu", torch.float32, tmp_path) == 1e11 and len(calls) == 3  # damaged: measured
    assert step_log.peak_key("cpu", torch.float32) in json.loads((tmp_path / step_log.PEAK_FILE).read_text())
    blocked = tmp_path / "not_a_dir"
    blocked.write_text("")  # an unwritable cache (here: a file where the folder should be): measured, not fatal
    assert step_log.device_peak("cpu", torch.float32, blocked) == 1e11 and len(calls) == 4


def test_tables_are_tab_separated_when_redirected_and_drawn_at_a_terminal(monkeypatch):
    from graphllm.cli.console import PIPED_WIDTH, make_console, print_table

    table = Table("op", "count", title="a title")
    table.add_row("graphllm.a_very_long_operator_name_" + "x" * 100, "[bold]3")
    piped = io.StringIO()
    console = Console(file=piped)
    print_table(console, table)
    assert piped.getvalue().splitlines() == ["# a title", "op\tcount", f"graphllm.a_very_long_operator_name_{'x' * 100}\t3"]
    drawn = io.StringIO()
    print_table(Console(file=drawn, force_terminal=True, width=60), table)
    assert "│" in drawn.getvalue() and "\t" not in drawn.getvalue()
    monkeypatch.delenv("COLUMNS", raising=False)
    assert make_console().width == PIPED_WIDTH  # pytest's stdout is not a terminal: no 80-column cut
