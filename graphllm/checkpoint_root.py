"""A run's checkpoint roots (`--save`, `--load`), settled before any compute is spent on the run.

- **One writer per root.** A run holds `ROOT/.graphllm-run.lock` (pid, host, start time, command) for
  its whole life; a second run on the root is refused at start with one line. A lock whose process is
  gone (same host, pid not alive) is stale: it is taken over and reported. A multi-rank run's launcher
  holds the lock for its ranks (they find its path in $GRAPHLLM_ROOT_LOCK).
- **Left-overs.** `.step_<N>.tmp-*` directories of saves that were killed are removed when the next
  run takes the root, with a line saying how much space came back.
- **Usable before compiling.** `--save` that is a file, not writable, or holding another model's
  checkpoints, and a `--load` that does not exist or holds another model's, are refused at once.
- **Auto-resume.** `--save R` on a root that already holds this model's checkpoints resumes from the
  newest intact one (what a requeued cluster job needs); `--load R --save R` on an empty or missing
  root starts fresh.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from graphllm.errors import GraphllmError
from graphllm.launch import pid_alive
from graphllm.parallel.checkpoint import MARKER, TMP_DIR, complete_checkpoints

LOCK_NAME = ".graphllm-run.lock"
LOCK_ENV = "GRAPHLLM_ROOT_LOCK"
"""Set by a launcher that holds the root's lock for the ranks it starts: the lock file's path."""


class RootLock:
    """The exclusive lock of a checkpoint root (see the module docstring); a context manager."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self.held = False

    def acquire(self) -> list[str]:
        """Take the lock or refuse with one line; returns notes (a stale lock taken over)."""
        self.root.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                           "command": " ".join(sys.argv)})
        notes: list[str] = []
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                notes.append(self._take_over_or_refuse())
                continue
            with os.fdopen(fd, "w") as f:
                f.write(body + "\n")
            self.held = True
            return notes
        raise GraphllmError(f"--save {self.root}: could not take {self.path} (another run raced for it); retry")

    def _take_over_or_refuse(self) -> str:
        try:
            info = json.loads(self.path.read_text())
            pid, host = int(info["pid"]), str(info["host"])
        except (OSError, ValueError, KeyError, TypeError):
            info, pid, host = {}, -1, "?"
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0))) if info else "?"
        if host == socket.gethostname() and pid > 0 and pid_alive(pid):
            raise GraphllmError(f"--save {self.root} is in use by another graphllm run (pid {pid}, started {started}: "
                                f"{info.get('command', '?')}); wait for it, stop it, or save to another root")
        if host != socket.gethostname() and info:
            raise GraphllmError(f"--save {self.root} is locked by a run on host {host} (pid {pid}, started {started}); "
                                f"if that run is dead, delete {self.path} and start again")
        self.path.unlink(missing_ok=True)
        return f"removed a stale lock of {self.root} (pid {pid} on {host}, started {started}, no longer running)"

    def release(self) -> None:
        if self.held:
            self.held = False
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RootLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def remove_leftovers(root: Path) -> tuple[int, int]:
    """Delete the temp directories of killed saves under `root`; returns (how many, bytes freed)."""
    count = freed = 0
    for d in Path(root).iterdir() if Path(root).is_dir() else []:
        if d.is_dir() and TMP_DIR.fullmatch(d.name):
            freed += sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            shutil.rmtree(d, ignore_errors=True)
            count += 1
    return count, freed


def _newest_marker(root: Path) -> tuple[Path, dict] | None:
    for ckpt in complete_checkpoints(root):
        try:
            return ckpt, json.loads((ckpt / MARKER).read_text())
        except (OSError, ValueError):
            continue  # a damaged marker: resume's checksum pass reports it
    return None


def _check_model(flag: str, root: Path, model: dict) -> bool:
    """Whether `root` holds checkpoints; refuse them when they are another model's."""
    found = _newest_marker(root)
    if found is None:
        return False
    ckpt, marker = found
    expected = model["weights_fingerprint"] if marker.get("kind") == "weights" else model["fingerprint"]
    if marker.get("fingerprint") != expected:
        raise GraphllmError(f"{flag} {root} holds checkpoints of another model ({ckpt.name}: {marker.get('model', '?')}, "
                            f"fingerprint {marker.get('fingerprint')}; this artifact's model has {expected}); "
                            f"use another root for this model")
    return True


def _check_writable(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise GraphllmError(f"--save {root} is a file, not a directory; choose a directory for checkpoints")
    probe = root if root.exists() else next((p for p in root.parents if p.exists()), Path("/"))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise GraphllmError(f"--save {root}: {probe} is not writable by this user; choose a writable directory")


@dataclass(kw_only=True)
class RootPlan:
    """What a run does with its roots, decided before compiling."""

    resume: Path | None = None
    """A checkpoint or root to resume from (None: start at step 0)."""
    notes: list[str] = field(default_factory=list)
    """Lines for the console: auto-resume, a fresh start, a stale lock, left-overs removed."""


def plan_roots(save: str | None, load: str | None, model: dict) -> RootPlan:
    """Check `--save`/`--load` against the artifact's model (plan.json's "model": fingerprints) and
    decide where the run resumes from; touches nothing."""
    plan = RootPlan()
    save_root = Path(save) if save is not None else None
    holds = False
    if save_root is not None:
        _check_writable(save_root)
        holds = save_root.is_dir() and _check_model("--save", save_root, model)  # another model's: refused
    if load is not None:
        lp = Path(load)
        if (lp / MARKER).is_file():  # one checkpoint
            _check_marker(lp, model)
            plan.resume = lp
        elif lp.is_dir() and _check_model("--load", lp, model):
            plan.resume = lp
        elif save_root is not None and lp.resolve() == save_root.resolve():
            plan.notes.append(f"--load {lp} holds no checkpoint yet: starting at step 0 (saves go there)")
        elif not lp.exists():
            raise GraphllmError(f"--load {lp}: no such checkpoint or root; check the path")
        else:
            raise GraphllmError(f"--load {lp}: no complete graphllm checkpoint there (expected {MARKER} or step_<N>/ "
                                "directories); point it at a checkpoint written by `graphllm run --save`")
    elif holds:
        plan.resume = save_root
        plan.notes.append(f"--save {save_root} already holds this model's checkpoints: resuming from the newest intact "
                          "one (give --load to choose another)")
    if holds and plan.resume is not None and plan.resume.resolve() != save_root.resolve():
        _check_one_history(save_root, plan.resume)
    return plan


def _check_one_history(save_root: Path, resume: Path) -> None:
    """A run resuming from elsewhere must not write into a root holding a later part of some history."""
    newest = complete_checkpoints(save_root)[0]
    inside = resume.resolve().parent == save_root.resolve()
    if not inside:
        raise GraphllmError(f"--save {save_root} already holds checkpoints (newest {newest.name}) and --load {resume} is "
                            "elsewhere: the two runs' steps would mix in one root; continue with --load "
                            f"{save_root}, or save to an empty root")
    if newest.resolve() != resume.resolve():
        raise GraphllmError(f"--load {resume} is older than {newest.name} in the same --save root: saving would collide "
                            f"with the newer checkpoints; move those out of {save_root} to go back to {resume.name}, or "
                            "save to another root")


def _check_marker(ckpt: Path, model: dict) -> None:
    try:
        marker = json.loads((ckpt / MARKER).read_text())
    except (OSError, ValueError) as exc:
        raise GraphllmError(f"--load {ckpt}: its {MARKER} is unreadable ({exc}); load another checkpoint") from exc
    expected = model["weights_fingerprint"] if marker.get("kind") == "weights" else model["fingerprint"]
    if marker.get("fingerprint") != expected:
        raise GraphllmError(f"--load {ckpt} is a checkpoint of another model ({marker.get('model', '?')}, fingerprint "
                            f"{marker.get('fingerprint')}; this artifact's model has {expected}); load one of this model")


def set_aside(ckpt: Path, save_root: Path) -> str:
    """Rename a damaged checkpoint of the --save root to `step_<N>.damaged-<time>` (kept, never deleted),
    so the run can save step N again; returns the note's tail ("" when it is not in the root)."""
    if ckpt.parent.resolve() != save_root.resolve():
        return ""
    aside = ckpt.with_name(f"{ckpt.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    ckpt.rename(aside)
    return f"; kept as {aside.name}"


def take_root(save: str | None) -> tuple[RootLock | None, list[str]]:
    """Lock `--save` for this run and clean its left-overs (unless a launcher holds it for this rank, or
    this is not rank 0 of a run someone else started). Returns (the lock to release, notes)."""
    if save is None:
        return None, []
    root = Path(save)
    held = os.environ.get(LOCK_ENV)
    if held and Path(held).resolve() == (root / LOCK_NAME).resolve():
        return None, []
    if int(os.environ.get("RANK", 0)) != 0:
        return None, []
    lock = RootLock(root)
    notes = lock.acquire()
    count, freed = remove_leftovers(root)
    if count:
        notes.append(f"removed {count} unfinished save(s) of killed runs under {root}, {freed / 2**20:,.1f} MiB freed")
    return lock, notes
