"""Run a function on N real processes (gloo, CPU) and collect each rank's return value.

`run_ranks(fn, world_size, *args, **kwargs)` starts `world_size` processes with torchrun's environment
variables set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), calls `fn(*args, **kwargs)` in each,
and returns the list of results ordered by rank. `fn` must be importable (module level in a test
module or a helper module); it is responsible for init_process_group (graphllm's init_parallel does it).
A failing rank fails the call with that rank's traceback.
"""

from __future__ import annotations

import io
import os
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PRELOAD = ["torch", "torch.distributed", "graphllm.job", "graphllm.train", "graphllm.resume", "hf_parity"]
"""What the fork server imports once (torch, graphllm, transformers through hf_parity): each rank is forked from
it instead of starting a fresh interpreter that imports them again (seconds per rank on a 2-core machine)."""


def _context():
    """The fork server, preloaded; `spawn` where GRAPHLLM_TEST_SPAWN is set (a fresh interpreter per rank)."""
    if os.environ.get("GRAPHLLM_TEST_SPAWN"):
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _worker(rank: int, world_size: int, port: int, env: dict, cwd: str, fn, args, kwargs, queue) -> None:
    # a forked rank has the fork server's environment and directory: give it the caller's, as spawn would
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    try:
        result = fn(*args, **kwargs)
        buf = io.BytesIO()
        torch.save(result, buf)  # tensors travel as bytes: no shared-memory handles, no autograd state
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:  # report, then let the process die
        queue.put((rank, "error", traceback.format_exc()))
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _next_result(queue, procs, timeout: float):
    """The next rank's report; a rank that died without one (killed, crashed in C, failed to start)
    fails the call instead of leaving it waiting forever."""
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return queue.get(timeout=1.0)
        except queue_mod.Empty:
            dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:
                return dead[0][0], "error", f"process exited with code {dead[0][1]} without reporting"
    return -1, "error", f"no rank reported within {timeout:.0f} s"


def run_ranks(fn, world_size: int, *args, timeout: float = 600.0, **kwargs) -> list:
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    env, cwd = dict(os.environ), os.getcwd()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, env, cwd, fn, args, kwargs, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors: list[str] = []
    for _ in range(world_size):
        rank, status, value = _next_result(queue, procs, timeout)
        if status == "ok":
            import torch

            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
        else:
            errors.append(f"rank {rank} failed:\n{value}")
            break
    for p in procs:
        p.join(timeout=5 if errors else timeout)
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
