"""Checkpoint roots keep work safe: one writer, checks before compiling, resume, integrity, disk full.

Each case reproduces what lost or corrupted work before (see graphllm/checkpoint_root.py):
- a second run on a root in use is refused at start (they used to interleave step_N and prune each
  other's checkpoints); a stale lock of a dead process is taken over and reported;
- `--save` that is a file or another model's root, and a bad `--load`, are refused before compiling;
- `--save R` on a root with this model's checkpoints resumes from the newest; `--load R --save R` on an
  empty root starts fresh; resuming from an older checkpoint into a root with newer ones is refused;
- each checkpoint records its files' checksums: a damaged newest one (flipped bytes, truncated shard,
  missing .metadata) is skipped for the newest intact one and kept aside, a damaged one named
  directly is one line (never torch's `weights_only` advice);
- killed saves' temp directories are removed at the next start, saying how much was freed;
- out of disk space at an interval save: said once, training goes on; at the last step: exit non-zero;
  no temp directory is left;
- checkpoint directories follow the umask (not mkdtemp's 0700).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from graphllm.checkpoint_root import LOCK_NAME, RootLock
from graphllm.cli.main import EXIT_USER_ERROR, main
from graphllm.job import compile_artifact
from graphllm.plan import CompilePlan


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("root") / "tiny"
    compile_artifact(CompilePlan(model="tiny-llama", backend="eager", batch_size=2, seq_len=32), out)
    return out


@pytest.fixture(scope="module")
def other_art(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("root") / "small"
    compile_artifact(CompilePlan(model="tiny-llama", seed=0, backend="eager", batch_size=2, seq_len=32,
                                 attn_implementation="eager"), out)
    return out


def _run(art: Path, *args: str) -> int:
    return main(["run", str(art), "--no-progress", *args])


def _err(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if "error:" in line]


def _fail_if_compiled(monkeypatch):
    import graphllm.job

    def boom(*a, **k):
        raise AssertionError("the artifact was compiled before the roots were checked")
    monkeypatch.setattr(graphllm.job, "load_artifact", boom)


def test_second_run_on_a_root_in_use_is_refused(art: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    root = tmp_path / "ckpt"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        root.mkdir()
        (root / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename, "started": 0,
                                                  "command": "graphllm run other"}))
        _fail_if_compiled(monkeypatch)
        assert _run(art, "--steps", "1", "--save", str(root)) == EXIT_USER_ERROR
        (line,) = _err(capsys)
        assert f"in use by another graphllm run (pid {holder.pid}" in line
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_and_leftovers_are_cleaned(art: Path, tmp_path: Path, capsys) -> None:
    root = tmp_path / "ckpt"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root.mkdir()
    (root / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "started": 0}))
    (root / ".step_7.tmp-abc123").mkdir()
    (root / ".step_7.tmp-abc123" / "__0_0.distcp").write_bytes(b"x" * 3 * 2**20)
    assert _run(art, "--steps", "1", "--save", str(root)) == 0
    err = capsys.readouterr().err
    assert f"removed a stale lock of {root} (pid {dead.pid}" in err
    assert "removed 1 unfinished save(s)" in err and "3.0 MiB freed" in err
    assert not (root / ".step_7.tmp-abc123").exists() and not (root / LOCK_NAME).exists()
    with RootLock(root):  # released when the run ended: a new run can take it
        assert (root / LOCK_NAME).is_file()


def test_bad_roots_are_refused_before_compiling(art: Path, other_art: Path, tmp_path: Path, capsys,
                                                monkeypatch) -> None:
    afile = tmp_path / "afile"
    afile.write_text("data")
    theirs = tmp_path / "theirs"
    assert _run(other_art, "--steps", "1", "--save", str(theirs)) == 0
    capsys.readouterr()
    _fail_if_compiled(monkeypatch)
    for args, needle in [(["--save", str(afile)], "is a file"),
                         (["--save", str(theirs)], "holds checkpoints of another model"),
                         (["--load", str(theirs)], "holds checkpoints of another model"),
                         (["--load", str(tmp_path / "missing")], "no such checkpoint or root")]:
        assert _run(art, "--steps", "1", *args) == EXIT_USER_ERROR
        (line,) = _err(capsys)
        assert needle in line, (args, line)
    assert afile.read_text() == "data"


def test_requeued_job_resumes_and_empty_load_starts_fresh(art: Path, tmp_path: Path, capsys) -> None:
    root = tmp_path / "ckpt"
    assert _run(art, "--steps", "2", "--load", str(root), "--save", str(root)) == 0  # empty root: fresh
    assert "holds no checkpoint yet: starting at step 0" in capsys.readouterr().err
    assert _run(art, "--steps", "4", "--save", str(root), "--metrics", str(tmp_path / "m.jsonl")) == 0
    err = capsys.readouterr().err
    assert "already holds this model's checkpoints" in err and f"resumed from {root / 'step_2'} at step 2" in err
    steps = [json.loads(r)["step"] for r in (tmp_path / "m.jsonl").read_text().splitlines() if '"loss"' in r]
    assert steps == [3, 4]
    assert _run(art, "--steps", "6", "--load", str(root / "step_2"), "--save", str(root)) == EXIT_USER_ERROR
    assert "older than step_4 in the same --save root" in _err(capsys)[0]


def _damage(ckpt: Path, how: str) -> None:
    shard = next(ckpt.glob("*.distcp"))
    if how == "flip":
        with open(shard, "r+b") as f:
            f.seek(4096)
            byte = f.read(1)
            f.seek(4096)
            f.write(bytes([byte[0] ^ 0x40]))
    elif how == "truncate":
        os.truncate(shard, shard.stat().st_size // 2)
    else:
        (ckpt / ".metadata").unlink()


@pytest.mark.parametrize("how", ["flip", "truncate", "metadata"])
def test_damaged_newest_checkpoint_is_skipped(art: Path, tmp_path: Path, capsys, how: str) -> None:
    root = tmp_path / "ckpt"
    assert _run(art, "--steps", "4", "--save", str(root), "--save-interval", "2") == 0
    _damage(root / "step_4", how)
    capsys.readouterr()
    assert _run(art, "--steps", "1", "--load", str(root / "step_4")) == EXIT_USER_ERROR
    (line,) = _err(capsys)
    assert "the checkpoint is damaged" in line and "weights_only" not in line
    assert _run(art, "--steps", "4", "--save", str(root)) == 0  # resumes from step_2, saves step_4 again
    err = capsys.readouterr().err
    assert f"skipped {root / 'step_4'}: damaged" in err and f"resumed from {root / 'step_2'} at step 2" in err
    kept = [p.name for p in root.iterdir() if p.name.startswith("step_4.damaged-")]
    assert len(kept) == 1 and (root / "step_4" / "graphllm_checkpoint.json").is_file()


def test_disk_full_at_an_interval_goes_on_and_at_the_end_fails(art: Path, tmp_path: Path, capsys,
                                                              monkeypatch) -> None:
    import graphllm.parallel.checkpoint as ckpt

    real = ckpt._dcp

    def full_disk(fn, state, **kw):
        writer = kw.get("storage_writer")
        if writer is not None:
            (Path(writer.path) / "__0_0.distcp").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fn, state, **kw)

    monkeypatch.setattr(ckpt, "_dcp", full_disk)
    root, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    code = _run(art, "--steps", "3", "--save", str(root), "--save-interval", "1", "--metrics", str(metrics))
    assert code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count(f"no space left on device at {root}") >= 3 and "training goes on" in err
    assert "step 3 was not saved" in err
    rows = [json.loads(r) for r in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # the full disk did not stop training
    assert [r["step"] for r in rows if r.get("event") == "failure"] == [1, 2, 3]
    assert [p.name for p in root.iterdir()] == []  # no temp directory, no lock left behind


def test_a_dcp_failure_is_an_ordinary_error_that_says_disk_full() -> None:
    """torch.distributed.checkpoint raises CheckpointException, a BaseException carrying each rank's error pickled
    (so without the ENOSPC under a zip writer's RuntimeError): graphllm re-raises it as an Exception whose chain
    still shows the full disk, so a multi-rank save on a full disk is reported, not a traceback."""
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    import graphllm.parallel.checkpoint as ckpt
    from graphllm.trainer import disk_full

    def failing(state, **kw):
        failures = {0: (RuntimeError("unexpected pos 704 vs 598"), traceback.StackSummary()),
                    1: (OSError(errno.ENOSPC, "No space left on device"), traceback.StackSummary())}
        raise CheckpointException("write", failures)

    with pytest.raises(ckpt.CheckpointFailed, match="rank") as info:
        ckpt._dcp(failing, {})
    assert isinstance(info.value, Exception) and disk_full(info.value)


def test_checkpoints_follow_the_umask(art: Path, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        import importlib

        import graphllm.parallel.checkpoint as ckpt
        importlib.reload(ckpt)  # DIR_MODE is read at import
        assert _run(art, "--steps", "1", "--save", str(tmp_path / "ckpt")) == 0
    finally:
        os.umask(old)
    step = tmp_path / "ckpt" / "step_1"
    assert oct(step.stat().st_mode & 0o777) == oct(0o755)
    assert all(f.stat().st_mode & 0o044 == 0o044 for f in step.iterdir())
