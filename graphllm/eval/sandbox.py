"""The HumanEval sandbox's boundary: each untrusted program runs inside bubblewrap (`bwrap`).

`probe()` checks once per process that bwrap exists and can create the namespaces here (it starts the
interpreter inside the same sandbox a program gets); `require()` turns a failed probe into one line
saying how to install it, unless unsandboxed runs are explicitly allowed. `bwrap_argv()` builds the
command, `spawn()` starts it and `end()` kills everything it started.

What is isolated, and why that is a boundary: the kernel enforces it on every system call, so nothing
the program does inside its interpreter (rewriting the audit hook of sandbox_guard.py, ctypes, native
code) gets around it.
- **User namespace, no privileges.** The program is uid/gid 65534 in its own user namespace, with every
  capability dropped (bounding set included, no_new_privs set) and (bwrap ≥ 0.8) no further user
  namespace allowed, so it cannot mount, remount, raise its rlimits, or trace or signal what it does
  not own. The namespace maps it to the invoking user (host root, when graphllm runs as root): hence
  every host path it sees is a read-only mount and /proc is read-only too (see below).
- **PID namespace.** The program sees only its own processes: `kill`, `pidfd_open`, `ptrace` and
  `/proc/<pid>` cannot name a process outside. When the namespace's init dies the kernel kills every
  process in it; `end()` kills it and waits until it has exited, so forked, setsid'd and exec'd
  children do not outlive the program.
- **Network namespace** with only a loopback device: no network. New IPC and UTS namespaces too.
- **Mount namespace.** The root is an empty read-only tmpfs holding read-only binds of /usr, /lib*
  (symlinks into /usr on merged-/usr systems), /etc/ld.so.cache, the interpreter's prefixes and the
  guard script; a minimal read-only /dev (null, zero, full, random, urandom, tty, pts); a fresh procfs
  of the PID namespace, mounted read-only (graphllm may run as root, and a root-owned process may write
  /proc/sys, e.g. kernel.core_pattern, through a writable /proc even without capabilities); and one
  writable directory, the program's working directory, a fresh tmpfs of `workdir_bytes` at its temp
  directory's path. /root, /home, /work, the rest of /etc (passwd included), /sys and /var are absent;
  /tmp holds only the working directory.
- `--new-session` (no controlling terminal to inject input into) and `--die-with-parent` (the sandbox
  dies with graphllm).

Not covered: the kernel's own attack surface (there is no seccomp filter), and CPU and memory beyond the
guard's rlimits and the wall-clock timeout (no cgroup: a fork bomb runs until the timeout kills it).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Sequence

from graphllm.errors import GraphllmError

logger = logging.getLogger(__name__)

GUARD_PATH = "/run/graphllm/sandbox_guard.py"
"""Where sandbox_guard.py is mounted (read-only) inside the sandbox."""
SYSTEM_PATHS = ("/usr", "/lib", "/lib32", "/lib64", "/libx32")
"""The C library and shared libraries the interpreter links against (symlinks into /usr on merged-/usr systems)."""
LD_CACHE = "/etc/ld.so.cache"
"""The dynamic linker's cache: an interpreter whose libpython lies outside the default library dirs needs it."""
SANDBOX_ID = 65534
"""The program's uid and gid inside its user namespace ("nobody"): not root there either, so an exec can
never hand it capabilities."""
OPTIONAL_FLAGS = ("--disable-userns", "--size")
"""bubblewrap 0.8.0 flags, used where the installed bwrap has them (without --size, see bwrap_argv)."""
PROBE_TIMEOUT_S = 60.0  # bwrap + interpreter start take ~50 ms; a bound for a cold start on a loaded machine
KILL_WAIT_S = 10.0  # a SIGKILLed PID namespace is gone within milliseconds; this only bounds a kernel hang
INSTALL_HINT = ("install it (apt-get install bubblewrap, or your distribution's bubblewrap package; it needs a "
                "kernel that allows user namespaces) or pass --allow-unsandboxed-exec to run the programs without it")


@dataclass(frozen=True, slots=True)
class Probe:
    bwrap: str | None
    """The bwrap executable; None when the sandbox cannot be used on this machine."""
    problem: str = ""
    """Why not, in one line."""
    flags: frozenset[str] = frozenset()
    """The OPTIONAL_FLAGS this bwrap supports."""


@dataclass(slots=True)
class Child:
    proc: subprocess.Popen
    """bwrap (or, unsandboxed, the interpreter), leader of its own process group."""
    init_pidfd: int | None
    """A pidfd of the sandbox's PID-namespace init; None unsandboxed or when bwrap failed before starting it."""


@functools.cache
def probe() -> Probe:
    """Whether bwrap can run a program here, found once per process: `bwrap --help` for its flags, then
    `python -I -c pass` inside the sandbox every program gets."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return Probe(None, "bwrap is not on PATH")
    try:
        usage = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
        flags = frozenset(f for f in OPTIONAL_FLAGS if f in (usage.stdout + usage.stderr).split())
        with tempfile.TemporaryDirectory(prefix="graphllm-sandbox-probe-") as tmp:
            argv = bwrap_argv(bwrap, [sys.executable, "-I", "-c", "pass"], workdir=tmp, workdir_bytes=1 << 20,
                              flags=flags)
            done = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
                                  stdin=subprocess.DEVNULL, env={"PATH": os.defpath}, cwd=tmp)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Probe(None, one_line(f"{bwrap}: {e}"))
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return Probe(None, one_line(f"{bwrap} cannot start a sandbox here: {last}"))
    return Probe(bwrap, flags=flags)


def one_line(text: str) -> str:
    return " ".join(text.split())


def require(allow_unsandboxed: bool, *, warn: bool = True) -> Probe | None:
    """The probe when the sandbox works here. Otherwise a GraphllmError saying how to install bubblewrap,
    unless `allow_unsandboxed` (--allow-unsandboxed-exec): then None, and a warning when `warn`."""
    found = probe()
    if found.bwrap is not None:
        return found
    if not allow_unsandboxed:
        raise GraphllmError(f"HumanEval runs generated code inside bubblewrap, which is not usable here "
                            f"({found.problem}); {INSTALL_HINT}")
    if warn:
        logger.warning("HumanEval: running generated programs WITHOUT the bubblewrap sandbox (%s), as "
                       "--allow-unsandboxed-exec asks: they run as this user with only rlimits and an audit hook, "
                       "which a program can switch off", found.problem)
    return None


def interpreter_paths() -> list[str]:
    """Host directories the interpreter needs outside /usr: its prefixes (a venv's and its base's) and the
    real location of the executable, as named and resolved, parents only."""
    named = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, os.path.dirname(sys.executable)}
    named |= {os.path.realpath(p) for p in named} | {os.path.dirname(os.path.realpath(sys.executable))}
    keep: list[str] = []
    for path in sorted(named):  # a parent sorts before its children
        if os.path.isdir(path) and not any(_under(path, q) for q in ("/usr", *keep)):
            keep.append(path)
    return keep


def _under(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


def bwrap_argv(bwrap: str, command: Sequence[str], *, workdir: str, workdir_bytes: int, flags: frozenset[str],
               files: Sequence[tuple[str, str]] = (), info_fd: int | None = None) -> list[str]:
    """The bwrap command running `command` in `workdir` (the only writable path); `files` are (host path,
    sandbox path) pairs mounted read-only, after the working directory (so they may lie in it)."""
    argv = [bwrap, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--uid", str(SANDBOX_ID), "--gid", str(SANDBOX_ID), "--hostname", "sandbox"]
    if "--disable-userns" in flags:
        argv.append("--disable-userns")  # no nested user namespace, so no capabilities anywhere inside
    if info_fd is not None:
        argv += ["--info-fd", str(info_fd)]  # bwrap writes {"child-pid": host pid of the namespace's init}
    for path in SYSTEM_PATHS:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    argv += ["--ro-bind-try", LD_CACHE, LD_CACHE]
    for path in interpreter_paths():
        argv += ["--ro-bind", path, path]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    if "--size" in flags:  # a tmpfs: what the program writes stays in memory, at most workdir_bytes of it
        argv += ["--size", str(workdir_bytes), "--tmpfs", workdir]
    else:  # bwrap < 0.8: the host temp dir itself; files are still capped by RLIMIT_FSIZE, their total is not
        argv += ["--bind", workdir, workdir]
    for host, inside in files:
        argv += ["--ro-bind", host, inside]
    argv += ["--chdir", workdir, "--remount-ro", "/proc", "--remount-ro", "/dev", "--remount-ro", "/"]
    return [*argv, "--", *command]


def spawn(command: Sequence[str], found: Probe | None, *, workdir: str, workdir_bytes: int,
          files: Sequence[tuple[str, str]], env: dict[str, str], stderr: IO[bytes]) -> Child:
    """Start `command` in its own process group: inside bwrap when `found`, else directly (as before the
    sandbox existed). stdin is closed and stdout discarded."""
    io = {"cwd": workdir, "env": env, "stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": stderr,
          "start_new_session": True}
    if found is None:
        return Child(proc=subprocess.Popen(list(command), **io), init_pidfd=None)
    read_end, write_end = os.pipe()
    try:
        argv = bwrap_argv(found.bwrap, command, workdir=workdir, workdir_bytes=workdir_bytes, flags=found.flags,
                          files=files, info_fd=write_end)
        proc = subprocess.Popen(argv, pass_fds=(write_end,), **io)
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    try:
        init = _read_child_pid(read_end)
    finally:
        os.close(read_end)
    return Child(proc=proc, init_pidfd=_pidfd_of_child(init, proc.pid))


def _pidfd_of_child(pid: int | None, parent: int) -> int | None:
    """A pidfd of `pid` if it is still `parent`'s child (bwrap is unreaped, so its pid is not reused and
    its only child is the namespace's init); None if it is gone, or on a kernel without pidfds."""
    if pid is None:
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
    except (OSError, StopIteration, ValueError):
        ppid = None
    if ppid != parent:  # init already exited and was reaped: this pid may be someone else's now
        os.close(pidfd)
        return None
    return pidfd


def _read_child_pid(fd: int) -> int | None:
    """bwrap's --info-fd JSON → the host pid of the sandbox's init; None if bwrap exited before writing it."""
    data = b""
    while chunk := os.read(fd, 4096):
        data += chunk
        try:
            return int(json.loads(data)["child-pid"])
        except (ValueError, KeyError):
            continue
    return None


def end(child: Child, *, timed_out: bool) -> None:
    """Kill everything the program started and wait until it is gone: on a timeout the process group
    (bwrap and the namespace's init are in it), then always the PID namespace's init, whose death makes
    the kernel kill every process left in the namespace (setsid'd, forked and exec'd ones included)."""
    if timed_out:
        try:
            os.killpg(child.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    child.proc.wait()
    if child.init_pidfd is None:
        return
    try:
        signal.pidfd_send_signal(child.init_pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:  # readable once init has exited, which the kernel allows only after all the namespace's processes
        waiter = select.poll()
        waiter.register(child.init_pidfd, select.POLLIN)
        waiter.poll(KILL_WAIT_S * 1000)
    finally:
        os.close(child.init_pidfd)
        child.init_pidfd = None
