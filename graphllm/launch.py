"""Starting the ranks of a multi-process plan on this machine (torchrun), and knowing when we are one.

`graphllm compile` / `run` / `profile` / `generate` of a plan with several ranks re-run themselves
through torchrun (`torchrun --standalone --nproc-per-node N -m -- graphllm ...`, see `torchrun_main`);
each rank then finds RANK/WORLD_SIZE in its environment and joins the process group. On several nodes,
start torchrun yourself with the same `-m graphllm ...` command on each node (docs/parallelism.md).

Stopping. The launching process (the launcher) passes SIGTERM/SIGINT on to torchrun, which sends them
to every rank (each rank runs in a session of its own, so only torchrun reaches them). The ranks save
the last whole step and exit 128 + the signal; torchrun gives them TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds
(SHUTDOWN_TIMEOUT_S unless set; torch's own default is 30) before SIGKILL; the launcher returns
128 + the signal. A second signal is passed on too: torchrun stops waiting and exits, and the ranks,
told by the parent-death signal below, stop at once. torchrun runs in a session of its own as well, so
Ctrl-C in a terminal reaches it once, through the launcher, not twice.

Dying with the parent (Linux only: prctl(PR_SET_PDEATHSIG), `stop_when_parent_exits`). torchrun asks
for it first thing (`torchrun_main`; then it checks that its parent is still the launcher, which closes
the race with a launcher that died first: this replaces a `preexec_fn`, which Python documents as
unsafe in a process with threads, as a launcher that imported torch is), and so does each rank at
start-up (`die_with_agent`, from the CLI). The parent's death arrives as one SIGTERM: so `kill -9` of
the launcher stops torchrun as a SIGTERM would (the ranks save and exit), and `kill -9` of torchrun
stops the ranks the same way. Elsewhere (macOS, Windows) there is no parent-death signal: SIGTERM and
SIGINT to the launcher are still passed on, but a launcher or torchrun killed by SIGKILL leaves the
processes under it running until their run ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from graphllm.errors import GraphllmError

LAUNCHED_ENV = "GRAPHLLM_LAUNCHED"
ERROR_FILE_ENV = "GRAPHLLM_ERROR_FILE"
STARTED_FILE_ENV = "GRAPHLLM_STARTED_FILE"
LAUNCHER_PID_ENV = "GRAPHLLM_LAUNCHER_PID"
SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
SHUTDOWN_TIMEOUT_S = 300
"""Seconds torchrun waits for stopped ranks (their final save) before SIGKILL, unless the environment
sets TORCH_ELASTIC_SHUTDOWN_TIMEOUT; torch's own default (30) is short for a large model's checkpoint."""
EXIT_USER_ERROR = 2
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def in_launched_world() -> bool:
    """True inside a rank started by torchrun (ours or the user's)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


TORCHRUN = ("import signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
            "from graphllm.launch import torchrun_main; sys.exit(torchrun_main(sys.argv[1:]))")
"""torchrun's main through `torchrun_main`; until torchrun handles SIGINT itself (once it starts the
ranks), SIGINT ends it quietly, like SIGTERM, instead of a KeyboardInterrupt traceback from its imports."""


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The command that starts `python -m graphllm *argv` as `nproc` local ranks. The `--` ends
    torchrun's options: without it torchrun's parser reads graphllm's flags too (`--nproc` is an
    ambiguous abbreviation of its `--nproc-per-node`)."""
    return [sys.executable, "-c", TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", "-m", "--", "graphllm",
            *argv]


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run `python -m graphllm *argv` as `nproc` local ranks; returns torchrun's exit code (2 when a
    rank refused its input; 128 + the signal when SIGTERM/SIGINT stopped the run: see the module
    docstring)."""
    if nproc < 2:
        raise GraphllmError(f"--nproc must be ≥ 2 to launch ranks, got {nproc}")
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = {**os.environ, LAUNCHED_ENV: "1", LAUNCHER_PID_ENV: str(os.getpid()),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    env.setdefault(SHUTDOWN_TIMEOUT_ENV, str(SHUTDOWN_TIMEOUT_S))
    with tempfile.TemporaryDirectory(prefix="graphllm-launch-") as tmp:
        errors, started = Path(tmp) / "errors.txt", Path(tmp) / "rank0-started"
        env.update({ERROR_FILE_ENV: str(errors), STARTED_FILE_ENV: str(started)})
        rc, stopped_by = _run_forwarding_signals(torchrun_command(nproc, argv), env)
        if stopped_by is not None and not started.exists():  # no rank got far enough to say anything:
            signal.raise_signal(stopped_by)  # the signal is this process's to handle (the CLI: one line)
        if stopped_by is not None and rc != 0:
            return 128 + stopped_by  # rank 0 said what it saved; torchrun's code says nothing more
        if rc != 0 and errors.is_file() and errors.read_text().strip():
            return EXIT_USER_ERROR  # a rank refused its input (it printed why): the launch's answer too
    return 128 - rc if rc < 0 else rc  # torchrun killed by signal N: the shell's 128 + N


def _run_forwarding_signals(cmd: list[str], env: dict[str, str]) -> tuple[int, int | None]:
    """Run `cmd` (torchrun) to its end, passing on every SIGTERM/SIGINT this process gets; returns
    (exit code, the first signal passed on or None)."""
    received: list[int] = []
    procs: list[subprocess.Popen] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        for proc in procs:
            proc.send_signal(signum)  # a no-op once the process has been reaped

    old = {}
    if threading.current_thread() is threading.main_thread():
        old = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        proc = subprocess.Popen(cmd, env=env, start_new_session=os.name == "posix")
        procs.append(proc)
        for signum in received:  # arrived while torchrun was being started
            proc.send_signal(signum)
        try:
            rc = proc.wait()
        finally:
            if proc.poll() is None:  # not a signal (those are forwarded): an error in this process
                proc.kill()
                proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return rc, (received[0] if received else None)


def _prctl():
    """libc's prctl (Linux), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def set_parent_death_signal(sig: int) -> bool:
    """Linux: ask the kernel to send `sig` to this process when its parent exits, however it exits.
    False where that does not exist (not Linux): nothing is set."""
    prctl = _prctl()
    return prctl is not None and prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def _parent_death_signal() -> int | None:
    """The signal the kernel sends on a parent's death: a real-time one nothing else here uses (Linux)."""
    return int(signal.SIGRTMIN) + 6 if sys.platform.startswith("linux") and hasattr(signal, "SIGRTMIN") else None


def stop_when_parent_exits(parent: int) -> bool:
    """Linux: SIGTERM to this process, once, when `parent` (its parent now) exits, however it exits (at
    once if it already has). The kernel sends its parent-death signal once per exiting thread that was
    this process's parent (a multi-threaded parent killed by SIGKILL can send two, and torchrun treats a
    second SIGTERM as "stop waiting for the ranks"), so that signal is one of its own, turned into one
    SIGTERM here once the parent has really changed. False where there is no such signal (not Linux)."""
    sig = _parent_death_signal()
    if sig is None or threading.current_thread() is not threading.main_thread():
        return False
    fired: list[bool] = []

    def on_parent_death(signum, frame) -> None:
        if not fired and os.getppid() != parent:
            fired.append(True)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(sig, on_parent_death)
    if not set_parent_death_signal(sig):
        signal.signal(sig, signal.SIG_DFL)
        return False
    on_parent_death(sig, None)  # the parent may have exited before the kernel was asked
    return True


def _parent_of(pid: int) -> int | None:
    """The parent pid of `pid` from /proc (Linux), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the fields after "(comm)": state, ppid, ...


def _launcher_pid() -> int | None:
    pid = os.environ.get(LAUNCHER_PID_ENV, "")
    return int(pid) if pid.isdigit() else None


def rank_started() -> None:
    """A rank's start-up hook (the CLI calls it once its own signal handlers are in place): stop when
    torchrun's agent is gone (`die_with_agent`), and from rank 0 tell `relaunch` that from now on a stop
    signal gets its line from this rank."""
    die_with_agent()
    path = os.environ.get(STARTED_FILE_ENV)
    if path and is_rank_zero():
        Path(path).touch()


def die_with_agent() -> None:
    """In a rank started by torchrun (whose agent is the rank's parent): SIGTERM when the agent exits
    (Linux; elsewhere nothing). A rank of `relaunch` whose agent is already gone (its parent is not the
    launcher's child) gets it at once; under your own torchrun, an agent that dies before this call
    (the first second of the rank's start-up) is not noticed."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    agent, launcher = os.getppid(), _launcher_pid()
    if launcher is not None and sys.platform.startswith("linux") and _parent_of(agent) != launcher:
        os.kill(os.getpid(), signal.SIGTERM)
        return
    stop_when_parent_exits(agent)


def record_user_error(message: str) -> None:
    """In a launched rank, leave the one-line error for the launching process (see relaunch) and for
    rank 0 (`another_ranks_error`): a line `RANK<tab>message`."""
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        with open(path, "a") as f:
            f.write(f"{os.environ.get('RANK', 0)}\t{' '.join(message.splitlines())}\n")


def another_ranks_error() -> str | None:
    """The first one-line error another rank of this launch recorded, as `message (rank N)`, or None.
    Rank 0 asks when torchrun's SIGTERM stopped it: a rank that refused its input exits first, torchrun
    then stops the others, and rank 0, the one that speaks, must say why rather than "stopped by
    SIGTERM". The rank records before it exits, so its line is there before torchrun's signal."""
    path = os.environ.get(ERROR_FILE_ENV)
    try:
        lines = Path(path).read_text().splitlines() if path else []
    except OSError:
        return None
    me = os.environ.get("RANK", "0")
    for line in lines:
        rank, _, message = line.partition("\t")
        if rank != me and message:
            return f"{message} (rank {rank})"
    return None


def torchrun_main(argv: list[str]) -> int:
    """torchrun (`torch.distributed.run`), exiting 128 + the signal that stopped it instead of printing
    a traceback (the ranks say what they saved), and quietly 2 when a rank refused its input (it printed
    the one-line error)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    launcher = _launcher_pid()
    if launcher is not None:
        stop_when_parent_exits(launcher)  # a SIGTERM, which torchrun passes on to the ranks
    try:
        main(argv)
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError:
        errors = os.environ.get(ERROR_FILE_ENV)
        if errors and os.path.isfile(errors) and Path(errors).read_text().strip():
            return EXIT_USER_ERROR
        raise
    return 0


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (someone else's counts: kill(pid, 0) is refused, not missing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
