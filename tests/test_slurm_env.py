"""`srun graphllm run ...`: Slurm's task variables become torchrun's (graphllm/slurm_env.py)."""

from __future__ import annotations

import pytest

from graphllm.errors import GraphllmError
from graphllm.slurm_env import adopt_slurm_env, first_host

STEP = {"SLURM_PROCID": "9", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
        "SLURM_STEP_NODELIST": "gpu[007-008]"}


@pytest.mark.parametrize("nodelist, host", [
    ("gpu[007-008]", "gpu007"), ("gpu[3,5-9],cpu1", "gpu3"), ("a,b", "a"), ("node12", "node12"),
    ("rack1-[10-12]", "rack1-10"), ("n[1-2],m[3-4]", "n1"),
])
def test_first_host_of_a_node_list(nodelist: str, host: str) -> None:
    assert first_host(nodelist) == host


def test_a_multi_task_step_makes_each_task_a_rank() -> None:
    env = dict(STEP)
    assert adopt_slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("9", "16", "1")
    assert env["MASTER_ADDR"] == "gpu007" and env["MASTER_PORT"] == "29956"  # 29500 + job id mod 1000


@pytest.mark.parametrize("change", [
    {"RANK": "0"},  # torchrun started this process (one srun task per node running torchrun)
    {"SLURM_STEP_NUM_TASKS": "1"},  # one task: not a world of ranks
    {"SLURM_STEP_NUM_TASKS": None},  # a batch script's own shell (no step)
    {"SLURM_PROCID": None},
])
def test_left_alone(change: dict) -> None:
    env = {**STEP, **{k: v for k, v in change.items() if v is not None}}
    for k, v in change.items():
        if v is None:
            env.pop(k)
    before = dict(env)
    assert not adopt_slurm_env(env) and env == before


def test_given_master_address_is_kept_and_a_bad_node_list_is_one_line() -> None:
    env = {**STEP, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "6000"}
    assert adopt_slurm_env(env) and (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.1", "6000")
    with pytest.raises(GraphllmError, match="set MASTER_ADDR"):
        adopt_slurm_env({**STEP, "SLURM_STEP_NODELIST": "gpu["})
