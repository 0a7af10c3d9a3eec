"""The process entry (`graphllm` and `python -m graphllm`, what torchrun starts as each rank) destroys the
process group after a command that ran to its end, and leaves it after a failure.

A gloo group left to the interpreter's exit aborted a rank once its run was done and saved (SIGABRT,
"terminate called without an active exception"; CI, 2026-12-06): a race, so the test checks the contract
(is the group gone when the interpreter starts to exit) instead of waiting for the abort."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import atexit, sys
    import torch.distributed as dist
    import graphllm.cli.main as cli

    dist.init_process_group("gloo")
    cli.main = lambda: int(sys.argv[1])  # the command's exit code
    atexit.register(lambda: print("initialized at exit:", dist.is_initialized(), flush=True))
    cli.entry()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("code, initialized", [(0, False), (2, True)])
def test_entry_destroys_the_process_group_only_after_success(code, initialized):
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    proc = subprocess.run([sys.executable, "-c", PROBE, str(code)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == code, proc.stderr
    assert f"initialized at exit: {initialized}" in proc.stdout, proc.stdout + proc.stderr
