"""What one planner measurement traces: the CompilePlan of a measurement key, and rank 0 of its layout's world on
torch's fake process-group backend (collectives do nothing), so tensor-, context- and expert-parallel graphs are
captured in one process."""

from __future__ import annotations

import contextlib


def measurement_plan(key):
    """The CompilePlan of one measurement: pp = 1, dp = ep and two micro-batches (so that no data-parallel gradient
    reduction enters the backward graph: the planner prices it itself)."""
    from graphllm.plan import CompilePlan
    from graphllm.planning.layout import Layout
    from graphllm.planning.moe_config import MoeConfig
    from graphllm.planning.recompute_config import RecomputeConfig

    layout = Layout(tp=key.tp, cp=key.cp, sequence_parallel=key.sp, cp_algo=key.cp_algo if key.cp > 1 else "ring",
                    micro_batches=2, dp=key.ep, ep=key.ep, etp=key.etp)  # rank 0 of one expert-parallel group
    plan = CompilePlan(model="tiny-llama", backend="eager", batch_size=key.mbs, seq_len=key.seq_len, layout=layout,
                       recompute=RecomputeConfig(policy=key.recompute), fused_loss=key.fused_loss,
                       attn_implementation=key.attn_implementation,
                       moe=MoeConfig(dispatcher=key.moe_dispatcher, capacity_factor=key.moe_capacity))
    return plan


@contextlib.contextmanager
def fake_world(layout):
    """Rank 0 of `layout`'s world on torch's fake process-group backend (collectives do nothing), then back."""
    import torch.distributed as dist

    from graphllm.errors import GraphllmError
    from graphllm.parallel import groups

    if layout.world_size == 1:
        yield None
        return
    if dist.is_initialized():
        raise GraphllmError("graphllm.planner: measuring a tensor/context-parallel plan needs a process without a "
                            "process group (it traces the ranks on a fake one); call predict() before "
                            "init_process_group or in another process")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    saved = groups.state()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=layout.world_size)
    try:
        mesh, flat = groups.build_mesh(layout, "cpu")
        st = groups.ParallelState(layout=layout, rank=0, coords=layout.coords(0), mesh=mesh, flat=flat)
        groups.set_state(st)
        yield st
    finally:
        groups.set_state(saved)
        dist.destroy_process_group()
