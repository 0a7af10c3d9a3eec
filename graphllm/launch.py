"""Starting the ranks of a multi-process plan on this machine (torchrun), and knowing when we are one.

`graphllm compile` / `graphllm run` of a plan with several ranks re-run themselves through
`torchrun --standalone --nproc-per-node N -m graphllm ...`; each rank then finds RANK/WORLD_SIZE in
its environment and joins the process group. On several nodes, start torchrun yourself with the same
`-m graphllm ...` command on each node (docs/parallelism.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from graphllm.errors import GraphllmError

LAUNCHED_ENV = "GRAPHLLM_LAUNCHED"
ERROR_FILE_ENV = "GRAPHLLM_ERROR_FILE"
EXIT_USER_ERROR = 2


def in_launched_world() -> bool:
    """True inside a rank started by torchrun (ours or the user's)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run `python -m graphllm *argv` as `nproc` local ranks; returns torchrun's exit code."""
    if nproc < 2:
        raise GraphllmError(f"--nproc must be ≥ 2 to launch ranks, got {nproc}")
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = {**os.environ, LAUNCHED_ENV: "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "graphllm", *argv]
    with tempfile.TemporaryDirectory(prefix="graphllm-launch-") as tmp:
        errors = Path(tmp) / "errors.txt"
        env[ERROR_FILE_ENV] = str(errors)
        rc = subprocess.call(cmd, env=env)
        if rc != 0 and errors.is_file() and errors.read_text().strip():
            return EXIT_USER_ERROR  # a rank refused its input (it printed why): the launch's answer too
    return rc


def record_user_error(message: str) -> None:
    """In a launched rank, leave the one-line error for the launching process (see relaunch)."""
    path = os.environ.get(ERROR_FILE_ENV)
    if path:
        with open(path, "a") as f:
            f.write(message + "\n")
