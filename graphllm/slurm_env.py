"""Slurm's task environment read as torchrun's, so `srun graphllm run ...` needs no torchrun.

Under `srun` with several tasks in the step (one per device: `--ntasks-per-node=8`), each task is one rank:
`adopt_slurm_env` sets RANK from SLURM_PROCID, WORLD_SIZE from SLURM_STEP_NUM_TASKS and LOCAL_RANK from
SLURM_LOCALID, and, unless given, MASTER_ADDR (the step's first node, from SLURM_STEP_NODELIST's compressed form)
and MASTER_PORT (29500 + the job id mod 1000, so two jobs on one node do not collide). graphllm then runs as a
rank of that world, as under torchrun.

Nothing is read when RANK is already set (torchrun started this process, e.g. `srun` with one task per node
running torchrun), or when the step has one task: a batch script's own shell is not a rank, and a single
`graphllm run` there starts its local ranks itself.
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping

from graphllm.errors import GraphllmError

BASE_PORT = 29500
_RANGE = re.compile(r"^(?P<prefix>[^\[]*)\[(?P<first>[^,\]-]+)")


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: `gpu[003-010,12],cpu1` -> `gpu003`; `a,b` -> `a`."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end].strip()
    m = _RANGE.match(first)
    host = f"{m.group('prefix')}{m.group('first')}" if m else first
    if not host or "[" in host or "]" in host:
        raise GraphllmError(f"cannot read the first node of SLURM_STEP_NODELIST={nodelist!r}; set MASTER_ADDR "
                            "to it (e.g. $(scontrol show hostnames | head -n1))")
    return host


def adopt_slurm_env(environ: MutableMapping[str, str] | None = None) -> bool:
    """Set torchrun's variables from Slurm's (see the module docstring); returns whether it did."""
    env = os.environ if environ is None else environ
    tasks = env.get("SLURM_STEP_NUM_TASKS", "")
    if "RANK" in env or "SLURM_PROCID" not in env or not tasks.isdigit() or int(tasks) <= 1:
        return False
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], tasks
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
    job = env.get("SLURM_JOB_ID", "0")
    env.setdefault("MASTER_PORT", str(BASE_PORT + (int(job) % 1000 if job.isdigit() else 0)))
    return True
