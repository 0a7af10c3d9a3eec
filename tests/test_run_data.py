"""`graphllm run --data` end to end on a micro model: pretrain blends with EOD-reset and validation,
packed SFT, TensorBoard, save on failure (an exception in a step; SIGTERM to a real process), exact
resume and bitwise-deterministic runs, and bad data refused with one line before any compile."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dataset_fixtures import write_pretrain, write_sft
from graphllm.cli.main import EXIT_USER_ERROR, main

VOCAB, SEQ = 512, 16
KILL_STEPS = 40  # SIGTERM lands a few steps after KILL_AFTER_STEP (polled every 10 ms; a step takes ≥ 5 ms)
KILL_AFTER_STEP = 3  # send SIGTERM once the metrics file shows this step
# in-process runs take --threads 1; tests/conftest.py gives the next test torch's thread count back


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    from graphllm.models import build_model, save_hf
    from graphllm.models.presets import PRESETS

    root = tmp_path_factory.mktemp("rundata")
    cfg = dataclasses.replace(PRESETS["tiny-llama"](), vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    ckpt = save_hf(build_model(cfg), cfg, root / "micro")
    art = root / "art"
    assert main(["compile", "--model", str(ckpt), "--out", str(art), "--backend", "eager", "--batch-size", "2",
                 "--seq-len", str(SEQ), "--eod-reset"]) == 0
    write_pretrain(root / "a", docs=300, lo=3, hi=VOCAB // 2, seed=1)
    write_pretrain(root / "b", docs=100, lo=VOCAB // 2, hi=VOCAB, seed=2)
    write_sft(root / "sft", [3, 2, 1, 2] * 10, vocab=VOCAB, seq_len=SEQ, packed=True, max_len=8)
    return {"root": root, "art": art, "a": root / "a", "b": root / "b", "sft": root / "sft"}


def _records(path: Path, event: str | None = None) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("event") == event]


def test_pretrain_blend_with_reset_eval_and_tensorboard(setup, tmp_path) -> None:
    metrics, tb = tmp_path / "m.jsonl", tmp_path / "tb"
    argv = ["run", str(setup["art"]), "--data", "0.7", str(setup["a"]), "0.3", str(setup["b"]), "--split", "90,10,0",
            "--reset-position-ids", "--reset-attention-mask", "--steps", "6", "--warmup-steps", "2",
            "--lr-decay-style", "linear", "--eval-interval", "3", "--eval-iters", "2", "--no-progress",
            "--metrics", str(metrics), "--tensorboard", str(tb), "--threads", "1",
            "--lr", "3e-3"]  # the micro model is an HF directory: its default would be the fine-tuning lr
    have_tb = shutil.which("tensorboard") is not None or _has_module("tensorboard")
    if not have_tb:  # optional dependency: then the flag must be refused with the fix
        assert main(argv) == EXIT_USER_ERROR
        return
    assert main(argv) == 0
    steps = _records(metrics)
    lrs = [r["lr"] for r in steps]
    # linear decay after 2 warmup steps: lr - (lr - 0.1 lr) * (step - 2) / 4
    want = [3e-3 * 0.5, 3e-3] + [3e-3 - 0.9 * 3e-3 * k / 4 for k in range(4)]
    assert lrs == pytest.approx(want, rel=1e-12)
    evals = _records(metrics, "eval")
    assert [e["step"] for e in evals] == [3, 6] and all(e["batches"] == 2 for e in evals)
    assert list(tb.glob("events.out.tfevents.*"))


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_packed_sft_trains_and_an_exception_in_a_step_saves(setup, tmp_path, monkeypatch) -> None:
    from graphllm.data.feed import DatasetFeed

    real = DatasetFeed.train_batch

    def failing(self, step: int):
        if step == 3:
            raise RuntimeError("disk went away")
        return real(self, step)

    monkeypatch.setattr(DatasetFeed, "train_batch", failing)
    metrics, ck = tmp_path / "m.jsonl", tmp_path / "ck"
    with pytest.raises(RuntimeError, match="disk went away"):
        main(["run", str(setup["art"]), "--data", str(setup["sft"]), "--split", "1,0,0", "--steps", "6",
              "--no-progress", "--metrics", str(metrics), "--save", str(ck), "--threads", "1"])
    losses = [r["loss"] for r in _records(metrics)]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)
    assert (ck / "step_3" / "graphllm_checkpoint.json").is_file()
    assert _records(metrics, "failure")[0]["checkpoint"] == str(ck / "step_3")


def _tree_digest(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in d.rglob("*") if p.is_file()):
        h.update(f.relative_to(d).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def _run_args(setup, metrics: Path, *extra: str) -> list[str]:
    return ["run", str(setup["art"]), "--data", str(setup["a"]), "--steps", str(KILL_STEPS), "--deterministic",
            "--threads", "1", "--no-progress", "--metrics", str(metrics), *extra]


def _sigterm_after(victim: subprocess.Popen, metrics: Path, ck: Path, seen: dict) -> None:
    """Wait for the victim's metrics to show KILL_AFTER_STEP, note the checkpoints there, send SIGTERM."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and victim.poll() is None:
        if metrics.is_file() and any(r["step"] >= KILL_AFTER_STEP for r in _records(metrics)):
            break
        time.sleep(0.01)
    seen.update({d.name: _tree_digest(d) for d in ck.glob("step_*")})
    victim.send_signal(signal.SIGTERM)


def test_sigterm_saves_then_resume_equals_uninterrupted(setup, tmp_path) -> None:
    """The victim is a real process killed by SIGTERM; meanwhile this process runs the uninterrupted
    reference, and afterwards the resumed run (both in-process: one interpreter start instead of three)."""
    import threading

    import torch

    ref_m, kill_m, res_m, ck = (tmp_path / n for n in ("ref.jsonl", "kill.jsonl", "res.jsonl", "ck"))
    victim = subprocess.Popen([sys.executable, "-m", "graphllm", *_run_args(setup, kill_m, "--save", str(ck),
                                                                           "--save-interval", "2")],
                              env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    earlier: dict[str, str] = {}
    killer = threading.Thread(target=_sigterm_after, args=(victim, kill_m, ck, earlier))
    killer.start()
    try:
        assert main(_run_args(setup, ref_m)) == 0
        killer.join()
        err = victim.communicate(timeout=120)[1]
        assert victim.returncode == 128 + signal.SIGTERM, err
        stopped = _records(kill_m, "stopped")[0]
        last = stopped["step"]
        said = err.replace("\n", " ")  # rich wraps long lines
        assert KILL_AFTER_STEP <= last < KILL_STEPS
        assert f"saved step {last} at" in said or (last % 2 == 0 and f"step {last} is already saved" in said), said
        assert (ck / f"step_{last}" / "graphllm_checkpoint.json").is_file()
        assert "step_2" in earlier and {name: _tree_digest(ck / name) for name in earlier} == earlier
        assert main(_run_args(setup, res_m, "--load", str(ck))) == 0
    finally:
        torch.use_deterministic_algorithms(False)
        if victim.poll() is None:
            victim.kill()
    ref_losses = {r["step"]: r["loss"] for r in _records(ref_m)}
    killed = {r["step"]: r["loss"] for r in _records(kill_m)}
    rest = {r["step"]: r["loss"] for r in _records(res_m)}
    assert sorted(rest) == list(range(last + 1, KILL_STEPS + 1))
    assert all(rest[s] == ref_losses[s] for s in rest)  # exact on CPU
    assert all(killed[s] == ref_losses[s] for s in killed)  # two --deterministic runs: bitwise equal


@pytest.mark.parametrize("argv, needle", [
    (["--data", "{sft}", "--reset-position-ids"], "together"),
    (["--data", "{big}"], "vocabulary has 512"),
    (["--data", "{sft64}"], "packed for seq_len 64"),
    (["--data", "{a}", "--eval-interval", "2", "--split", "1,0,0"], "valid split"),
])
def test_bad_data_is_refused_before_compiling(setup, tmp_path, capsys, argv, needle) -> None:
    write_pretrain(tmp_path / "big", docs=5, lo=3, hi=VOCAB + 40)
    write_sft(tmp_path / "sft64", [2, 2], vocab=VOCAB, seq_len=64, packed=True)
    paths = {"sft": setup["sft"], "a": setup["a"], "big": tmp_path / "big", "sft64": tmp_path / "sft64"}
    argv = [a.format(**paths) for a in argv]
    assert main(["run", str(setup["art"]), "--steps", "1", "--no-progress", *argv]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_packed_data_needs_an_eod_reset_artifact(setup, tmp_path, capsys) -> None:
    art = tmp_path / "plain"
    shutil.copytree(setup["art"], art)
    plan = json.loads((art / "plan.json").read_text())
    plan["plan"]["eod_reset"] = False
    (art / "plan.json").write_text(json.dumps(plan))
    assert main(["run", str(art), "--data", str(setup["sft"]), "--steps", "1"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "is packed" in err and "recompile" in err and "--eod-reset" in err
