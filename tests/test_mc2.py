"""mc2: matmul+collective pairs raised to MC2 ops give the plain tensor-parallel results, on the eager
backend (the ops' reference kernels and graphllm's backward rules) and lowered to CoC chunks."""

from __future__ import annotations

import functools
import re

import pytest

from dist_util import run_ranks
from hf_parity import rel_err
from parallel_harness import batch_at, make_plan

MC2_RTOL = 2e-6
"""The same dot products per output element as the unfused graph. Measured: the eager backend (reference
kernels, graphllm's backward rules) bitwise equal; the chunked lowering up to 9.1e-7 on gradients (the
smaller chunk matmuls block their sums differently), 0 on the loss."""
LAYERS = 4


def loss_and_grads(layout: dict, dump: str | None):
    import os

    from graphllm.backends import Backend, eager_graph_compiler, register_backend
    from graphllm.job import build

    # inductor's lowering table on eager aot graphs: the chunked collectives without inductor's compile time
    register_backend(Backend(name="decompose-eager", lowering="decompose", graph_compiler=eager_graph_compiler,
                             description="test only: the decompose lowering table on eager aot graphs"))
    built = build(make_plan(**dict(layout)), dump_dir=f"{dump}/rank{os.environ['RANK']}" if dump else None)
    ids, labels = batch_at(0)
    from graphllm.planning.flops import forward_flops

    loss = built.engine.forward_backward(ids, labels)
    grads = {n: p.grad.clone() for n, p in built.engine.named_params.items()}
    return loss, grads, forward_flops(built.result.model_graph)


CASES = {
    "sp-eager": {"tp": 2, "sequence_parallel": True, "mc2": True},
    "sp-chunks2-lowered": {"tp": 2, "sequence_parallel": True, "mc2": True, "coc_parallel_num": 2,
                           "backend": "decompose-eager"},
    "tp-eager": {"tp": 2, "mc2": True},
    "tp-chunks4-lowered": {"tp": 2, "mc2": True, "coc_parallel_num": 4, "backend": "decompose-eager"},
}


@functools.cache
def unfused(sequence_parallel: bool):
    return run_ranks(loss_and_grads, 2, {"tp": 2, "sequence_parallel": sequence_parallel}, None)


@pytest.mark.parametrize("name", list(CASES))
def test_mc2_equals_unfused(name, tmp_path):
    layout = CASES[name]
    ref = unfused(layout.get("sequence_parallel", False))
    got = run_ranks(loss_and_grads, 2, layout, str(tmp_path / "graphs"))
    for (l0, g0, f0), (l1, g1, f1) in zip(ref, got):
        assert abs(l1 - l0) / abs(l0) <= MC2_RTOL
        assert max(rel_err(g1[n], g0[n]) for n in g0) <= MC2_RTOL
        assert f1 == f0  # the MC2 ops' matmuls count as the linears they replaced (MFU)
    model = next((tmp_path / "graphs" / "rank0" / "model").glob("*_mc2.py")).read_text()
    if layout.get("sequence_parallel"):
        # per layer: q (gathering for k, v too) and gate (for up); o and down
        assert len(re.findall(r"graphllm\.all_gather_matmul\.default\(", model)) == 2 * LAYERS
        assert len(re.findall(r"graphllm\.matmul_reduce_scatter\.default\(", model)) == 2 * LAYERS
    else:
        assert len(re.findall(r"graphllm\.matmul_all_reduce\.default\(", model)) == 2 * LAYERS
    backward = (tmp_path / "graphs" / "rank0" / "train" / "backward.py").read_text()
    if layout.get("backend") is None and layout.get("sequence_parallel"):
        # graphllm's backward rules: the row op's input gradient is the conjugate MC2 op
        assert "graphllm.all_gather_matmul.default(" in backward
    if layout.get("backend") == "decompose-eager" and layout.get("sequence_parallel"):
        n = layout["coc_parallel_num"]
        forward = (tmp_path / "graphs" / "rank0" / "train" / "forward.py").read_text()
        # lowered to n asynchronous chunks per site (+ the LM head's and embedding's own collectives)
        assert len(re.findall(r"_c10d_functional\.all_gather_into_tensor\.default\(", forward)) == 2 * LAYERS * n + 1
        assert len(re.findall(r"_c10d_functional\.reduce_scatter_tensor\.default\(", forward)) == 2 * LAYERS * n + 1


def test_mc2_needs_tensor_parallelism():
    from graphllm.errors import GraphllmError
    from graphllm.planning.layout import Layout

    with pytest.raises(GraphllmError, match="--mc2 needs --tp > 1"):
        Layout(dp=2, mc2=True)
