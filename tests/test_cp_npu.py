"""Context parallelism lowered for torchair, run on CPU: the npu-emulated backend against the eager one, on gloo ranks.

For the npu backends `lower_collectives` turns cp_ring_shift and cp_all_to_all into torchair's
`npu_define.all_to_all_single_npu` (element counts, the group's tag and global ranks); graphllm.preflight.emulation
defines that op on CPU with a kernel that runs the all-to-all over the gloo group torchair would find. Each rank
builds tiny-llama at cp 2 on both backends (the same seed) and compares the first step's loss and gradients; the
graphs must hold torchair's op and no `_c10d_functional.all_to_all_single`. The emulated kernel refuses a tag that
names no group (torchair would create one).

Reproduce: python -m pytest tests/test_cp_npu.py -q
"""

from __future__ import annotations

import pytest
import torch

from dist_util import run_ranks
from parallel_harness import batch_at, make_plan

LOSS_RTOL = 1e-5
"""fp32, relative. The npu lowering computes attention with the emulated npu_fusion_attention (softmax as exp/sum,
scores in fp32) and the ring merges its blocks' statistics in another order than the eager attention_block: ~1e-7
measured; the collectives themselves move bytes unchanged."""
GRAD_RTOL = 1e-4
"""Per tensor, max |difference| / max |gradient| (as tests/test_context_parallel.py): reduction order, ~1e-6."""
TORCHAIR_OP = "npu_define.all_to_all_single_npu.default"
C10D_OP = "_c10d_functional.all_to_all_single.default"


def _collectives(built) -> set[str]:
    ops = {str(n.target) for g in built.result.train_stage.graphs.values() for n in g.graph.nodes
           if n.op == "call_function"}
    return ops & {TORCHAIR_OP, C10D_OP}


def _wrong_tag_refused(built) -> bool:
    """The emulated kernel on a tag that names no group: torchair would create one, the emulation refuses."""
    x = torch.zeros(4)
    try:
        torch.ops.npu_define.all_to_all_single_npu(x, [2, 2], [0, 2], [2, 2], [0, 2], "ptd:no-such-group", [0, 1], 2)
    except ValueError as e:
        return "no process group" in str(e)
    return False


def first_step(layout: dict) -> dict:
    """Per backend: the first step's loss, this rank's gradients, and the all-to-all ops its graphs hold."""
    from graphllm.job import build

    out = {}
    for backend in ("eager", "npu-emulated"):
        built = build(make_plan(**layout, backend=backend), warm=False)  # the step below compiles the graphs
        loss = built.engine.forward_backward(*batch_at(0))
        grads = {n: p.grad.detach().clone() for n, p in built.engine.named_params.items()}
        out[backend] = {"loss": loss, "grads": grads, "collectives": _collectives(built)}
        if backend == "npu-emulated":
            out["wrong_tag_refused"] = _wrong_tag_refused(built)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("algo", ["ring", "ulysses"])
def test_cp2_npu_emulated_matches_eager(algo):
    reproduce = f"python -m pytest tests/test_cp_npu.py -q -k {algo}"
    for rank, r in enumerate(run_ranks(first_step, 2, {"cp": 2, "cp_algo": algo})):
        eager, npu = r["eager"], r["npu-emulated"]
        assert npu["collectives"] == {TORCHAIR_OP}, (rank, npu["collectives"], reproduce)
        assert eager["collectives"] == {C10D_OP}, (rank, eager["collectives"], reproduce)  # unchanged off the npu
        assert r["wrong_tag_refused"], reproduce
        err = abs(npu["loss"] - eager["loss"]) / abs(eager["loss"])
        assert err <= LOSS_RTOL, f"rank {rank}: loss {npu['loss']} vs eager {eager['loss']} ({err:.1e}); {reproduce}"
        worst = max((_rel(npu["grads"][n], g), n) for n, g in eager["grads"].items())
        assert worst[0] <= GRAD_RTOL, f"rank {rank}: gradient of {worst[1]} differs by {worst[0]:.1e}; {reproduce}"
