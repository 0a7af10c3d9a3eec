"""Stopping a run, on real process trees: `graphllm run` of a dp2 plan (launcher → torchrun → 2 ranks,
gloo on CPU) and of a single-rank plan, stopped by signals to the launcher only (what `kill PID`,
`docker stop`, Kubernetes and systemd do), by `kill -9`, during start-up, and twice.

After each run, no process of the tree may survive: their pids (with start times, so a reused pid is
not mistaken for a survivor) are collected from /proc while the run is alive. Linux only (/proc, and
the parent-death signal under test). Every wait is bounded; leftovers are killed in `finally`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process trees from /proc; Linux")]

FAST = ["--model", "tiny-llama", "--backend", "eager", "--batch-size", "1", "--seq-len", "32"]
ENDLESS = "100000"  # steps: a run that outlives every test, so a surviving rank is still there to be seen
TIMEOUT = 120  # seconds for any one wait (compile, first steps, shutdown); a regression fails, never hangs
STALL_ENV = "GRAPHLLM_TEST_STALL_FILE"
STALL_PASS = '''
import os, time
from graphllm.passes import graph_pass

@graph_pass("stall_if_asked", stage="model")
def stall_if_asked(gm, ctx):
    """Does nothing; with $GRAPHLLM_TEST_STALL_FILE set, marks that file and waits: a run stuck in
    its start-up compile (`graphllm run` rebuilds the plan's passes), at a moment the test knows."""
    marker = os.environ.get("GRAPHLLM_TEST_STALL_FILE")
    if marker:
        open(f"{marker}.{os.getpid()}", "w").close()
        time.sleep(300)
    return gm
'''


# ---------------------------------------------------------------- process trees from /proc

def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a process, or None if there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[19])


def _descendants(root: int) -> dict[int, int]:
    """pid → start time of every live descendant of `root`."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            children.setdefault(st[1], []).append(int(entry))
            starts[int(entry)] = st[2]
    out, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out[child] = starts[child]
            todo.append(child)
    return out


def _alive(procs: dict[int, int]) -> list[int]:
    """The pids of `procs` still running (not zombies, not a new process under a reused pid)."""
    return [pid for pid, start in procs.items() if (st := _stat(pid)) is not None and st[2] == start and st[0] != "Z"]


class Tree:
    """A `python -m graphllm ...` process and every process it starts, seen until it ends."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "graphllm", *argv], stdout=subprocess.DEVNULL,
                                     stderr=log.open("w"), env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.seen: dict[int, int] = {}

    def watch_until(self, done, what: str, timeout: float = TIMEOUT, *, every: float = 0.02, scan: bool = True) -> None:
        """Poll (collecting descendants, with `scan`) every `every` s until `done()`; fail, saying `what`,
        after `timeout` s."""
        deadline = time.monotonic() + timeout
        while not done():
            if scan:
                self.seen.update(_descendants(self.proc.pid))
            assert time.monotonic() < deadline, f"timed out waiting for {what}; log:\n{self.stderr()}"
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before {what}; log:\n{self.stderr()}"
            time.sleep(every)
        if scan:
            self.seen.update(_descendants(self.proc.pid))

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {timeout} s later; log:\n{self.stderr()}")

    def survivors(self, grace: float = 5.0) -> list[int]:
        """Processes of the tree still alive `grace` s after its root ended."""
        deadline = time.monotonic() + grace
        while (left := _alive(self.seen)) and time.monotonic() < deadline:
            time.sleep(0.05)
        return left

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        for pid in [self.proc.pid, *_alive(self.seen)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)


def _records(metrics: Path, event: str | None = None) -> list[dict]:
    if not metrics.is_file():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.endswith("}")]
    return [r for r in rows if r.get("event") == event]


def _trained(metrics: Path, steps: int):
    return lambda: any(r["step"] >= steps for r in _records(metrics))


def _saves(ckpt: Path) -> list[str]:
    """The checkpoints and unfinished saves (`.step_<N>.tmp-*`) in a --save root (not its run lock)."""
    return sorted(p.name for p in ckpt.iterdir() if p.name.lstrip(".").startswith("step_")) if ckpt.is_dir() else []


def _lines(text: str, prefix: str = "graphllm run:") -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


# ---------------------------------------------------------------- artifacts

@pytest.fixture(scope="module")
def arts(tmp_path_factory) -> dict[str, Path]:
    """A dp2 and a single-rank tiny-llama artifact, compiled side by side, both with the stall pass."""
    root = tmp_path_factory.mktemp("launch")
    (root / "stallpass.py").write_text(textwrap.dedent(STALL_PASS))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    procs = {name: subprocess.Popen([sys.executable, "-m", "graphllm", "compile", *FAST, *extra, "--out",
                                     str(root / name), "--pass", "stallpass:stall_if_asked"],
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name, extra in (("dp2", ["--dp", "2"]), ("one", []))}
    try:
        for name, proc in procs.items():
            err = proc.communicate(timeout=TIMEOUT * 2)[1]
            assert proc.returncode == 0, f"compile {name} failed:\n{err}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return {"root": root, "dp2": root / "dp2", "one": root / "one", "env": env}


def _run(arts, tmp_path: Path, art: str, *extra: str, stall: bool = False) -> tuple[Tree, Path]:
    metrics = tmp_path / "metrics.jsonl"
    env = {"PYTHONPATH": arts["env"]["PYTHONPATH"], **({STALL_ENV: str(tmp_path / "stalled")} if stall else {})}
    tree = Tree(["run", str(arts[art]), "--no-progress", "--metrics", str(metrics), *extra], tmp_path / "err.log", env)
    return tree, metrics


# ---------------------------------------------------------------- the tests

def test_torchrun_reads_none_of_graphllm_flags() -> None:
    """Every flag of every command reaches the ranks as given: torchrun's own parser stops at `--`
    (without it, `--nproc` is an ambiguous abbreviation of its `--nproc-per-node`)."""
    from torch.distributed.run import get_args_parser

    from graphllm.cli.main import build_parser
    from graphllm.launch import torchrun_command

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command, parser in sub.choices.items():
        for flag in parser._option_string_actions:
            argv = ["-v", command, "ART", flag, "1"]
            args = get_args_parser().parse_args(torchrun_command(2, argv)[3:])
            assert (args.module, args.training_script, args.training_script_args) == (True, "graphllm", argv), flag


def test_nproc_flag_runs_the_ranks(arts, tmp_path: Path) -> None:
    tree, metrics = _run(arts, tmp_path, "dp2", "--nproc", "2", "--steps", "2")
    try:
        assert tree.wait() == 0, tree.stderr()
        assert [r["step"] for r in _records(metrics)] == [1, 2]
    finally:
        tree.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_the_launcher_stops_every_rank_after_the_final_save(arts, tmp_path: Path, sig) -> None:
    """The signal goes to the launcher only; it reaches the ranks through torchrun, they save the last
    whole step, and the launcher waits for that and exits 128 + the signal. Before: the launcher died at
    once and the ranks trained on, orphaned."""
    ckpt = tmp_path / "ckpt"
    tree, metrics = _run(arts, tmp_path, "dp2", "--steps", ENDLESS, "--save", str(ckpt))
    try:
        tree.watch_until(_trained(metrics, 2), "two steps")
        assert len(tree.seen) >= 3, f"expected torchrun and 2 ranks under the launcher, saw {tree.seen}"
        os.kill(tree.proc.pid, sig)
        assert tree.wait() == 128 + sig, tree.stderr()
        assert tree.survivors() == [], f"processes outlived the launcher; log:\n{tree.stderr()}"
        stopped = _records(metrics, "stopped")
        assert len(stopped) == 1 and stopped[0]["signal"] == sig.name, tree.stderr()
        last = stopped[0]["step"]
        assert stopped[0]["checkpoint"] == str(ckpt / f"step_{last}")
        assert _saves(ckpt) == [f"step_{last}"]  # complete, and nothing written after it
        assert max(r["step"] for r in _records(metrics)) == last
        assert "Traceback" not in tree.stderr()
    finally:
        tree.kill()


def test_kill_9_of_the_launcher_takes_torchrun_and_the_ranks_down(arts, tmp_path: Path) -> None:
    """SIGKILL cannot be forwarded: torchrun and the ranks learn of it by the parent-death signal, as
    one SIGTERM (so the ranks still save the last whole step). Before: they trained on, orphaned."""
    ckpt = tmp_path / "ckpt"
    tree, metrics = _run(arts, tmp_path, "dp2", "--steps", ENDLESS, "--save", str(ckpt))
    try:
        tree.watch_until(_trained(metrics, 2), "two steps")
        os.kill(tree.proc.pid, signal.SIGKILL)
        assert tree.wait() == -signal.SIGKILL
        assert tree.survivors(grace=60) == [], f"processes outlived the launcher; log:\n{tree.stderr()}"
        stopped = _records(metrics, "stopped")
        assert len(stopped) == 1 and stopped[0]["signal"] == "SIGTERM", tree.stderr()
        assert _saves(ckpt) == [f"step_{stopped[0]['step']}"]
    finally:
        tree.kill()


@pytest.mark.parametrize("art", ["one", "dp2"])
def test_sigterm_during_start_up_is_one_line(arts, tmp_path: Path, art: str) -> None:
    """SIGTERM while `graphllm run` compiles (the stall pass holds every rank inside it): one line,
    exit 143, no traceback, no survivor. Before: a silent death (and, for dp2, orphaned ranks)."""
    tree, metrics = _run(arts, tmp_path, art, "--steps", ENDLESS, stall=True)
    ranks = 2 if art == "dp2" else 1
    try:
        tree.watch_until(lambda: len(list(tmp_path.glob("stalled.*"))) == ranks, "the ranks to compile")
        os.kill(tree.proc.pid, signal.SIGTERM)
        assert tree.wait() == 143, tree.stderr()
        assert tree.survivors() == [], f"processes outlived the launcher; log:\n{tree.stderr()}"
        assert _lines(tree.stderr()) == ["graphllm run: stopped by SIGTERM before training started; nothing was saved"]
        assert "Traceback" not in tree.stderr() and not _records(metrics)
    finally:
        tree.kill()


def test_second_sigterm_during_the_final_save_is_one_line(arts, tmp_path: Path) -> None:
    """The first SIGTERM starts the final save; once DCP writes its files, the process is frozen
    (SIGSTOP), sent the second SIGTERM and thawed: it stops at once with one line and 143, and the
    interrupted save leaves nothing behind. Before: DCP's tracebacks and exit 1."""
    ckpt = tmp_path / "ckpt"
    tree, metrics = _run(arts, tmp_path, "one", "--steps", ENDLESS, "--save", str(ckpt))

    def writing() -> bool:  # DCP has begun writing into the save's temp directory
        return any(any(True for _ in (ckpt / name).iterdir()) for name in _saves(ckpt) if name.startswith(".step_"))

    try:
        tree.watch_until(_trained(metrics, 2), "two steps")
        os.kill(tree.proc.pid, signal.SIGTERM)
        tree.watch_until(writing, "the final save to write", every=0.001, scan=False)  # ~0.3 s from start to end
        os.kill(tree.proc.pid, signal.SIGSTOP)
        tree.watch_until(lambda: _stat(tree.proc.pid)[0] == "T", "the process to stop", 30, every=0.001, scan=False)
        in_save = writing() and not any(name.startswith("step_") for name in _saves(ckpt))
        os.kill(tree.proc.pid, signal.SIGTERM)  # pending until SIGCONT
        os.kill(tree.proc.pid, signal.SIGCONT)
        assert in_save, "the save ended before the process was frozen; nothing tested"
        assert tree.wait() == 143, tree.stderr()
        assert _lines(tree.stderr()) == ["graphllm run: stopped at once by a second SIGTERM (the first was SIGTERM): "
                                         "the final checkpoint was not written"], tree.stderr()
        assert "Traceback" not in tree.stderr()
        assert _saves(ckpt) == [] and not _records(metrics, "stopped")
        assert tree.survivors() == []
    finally:
        tree.kill()


def _pending(pid: int, sig: int) -> bool:
    """Whether `sig` waits for delivery to process `pid` (a stopped process keeps it pending)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("ShdPnd:", "SigPnd:")) and int(line.split()[1], 16) & (1 << (sig - 1)):
            return True
    return False


def test_second_sigterm_to_the_launcher_during_the_final_save_stops_the_ranks_at_once(arts, tmp_path: Path) -> None:
    """dp2: SIGTERM to the launcher; once both ranks write the final save they are frozen, the launcher
    gets a second SIGTERM, and the ranks are thawed once torchrun has passed it on: one line, 143, no
    traceback, no temp directory, no survivor. Before: the launcher died at the first signal."""
    ckpt = tmp_path / "ckpt"
    tree, metrics = _run(arts, tmp_path, "dp2", "--steps", ENDLESS, "--save", str(ckpt))

    def writing() -> bool:  # both ranks' DCP files are in the save's temp directory
        return any(len(list((ckpt / name).iterdir())) >= 2 for name in _saves(ckpt) if name.startswith(".step_"))

    ranks: list[int] = []
    try:
        tree.watch_until(_trained(metrics, 2), "two steps")
        torchrun = [pid for pid in tree.seen if (st := _stat(pid)) and st[1] == tree.proc.pid]
        ranks = [pid for pid in tree.seen if (st := _stat(pid)) and st[1] in torchrun]
        assert len(torchrun) == 1 and len(ranks) == 2, tree.seen
        os.kill(tree.proc.pid, signal.SIGTERM)
        tree.watch_until(writing, "the final save to write", every=0.001, scan=False)
        for pid in ranks:
            os.kill(pid, signal.SIGSTOP)
        tree.watch_until(lambda: all(_stat(pid)[0] == "T" for pid in ranks), "the ranks to stop", 30, scan=False)
        in_save = writing() and not any(name.startswith("step_") for name in _saves(ckpt))
        os.kill(tree.proc.pid, signal.SIGTERM)  # stays pending in the frozen ranks once torchrun passes it on
        tree.watch_until(lambda: all(_pending(pid, signal.SIGTERM) for pid in ranks), "torchrun to pass it on",
                         timeout=30, scan=False)
        for pid in ranks:
            os.kill(pid, signal.SIGCONT)
        assert in_save, "the save ended before the ranks were frozen; nothing tested"
        assert tree.wait() == 143, tree.stderr()
        assert _lines(tree.stderr()) == ["graphllm run: stopped at once by a second SIGTERM (the first was SIGTERM): "
                                         "the final checkpoint was not written"], tree.stderr()
        assert "Traceback" not in tree.stderr()
        assert _saves(ckpt) == [] and not _records(metrics, "stopped")
        assert tree.survivors() == [], f"processes outlived the launcher; log:\n{tree.stderr()}"
    finally:
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        tree.kill()
