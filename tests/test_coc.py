"""coc: chunked tensor-parallel collectives give the unchunked results, with N collectives per site."""

from __future__ import annotations

import re

import pytest

from dist_util import run_ranks
from hf_parity import rel_err
from parallel_harness import batch_at, make_plan

COC_RTOL = 1e-6
"""The same dot products per output row; only the matmul kernel's blocking of the smaller chunks can
change the rounding (measured 6.7e-7 on gradients, 0 on the loss)."""
LAYERS = 4


def loss_and_grads(layout: dict, dump: str | None):
    from graphllm.job import build

    import os

    built = build(make_plan(**dict(layout)), dump_dir=f"{dump}/rank{os.environ['RANK']}" if dump else None)
    ids, labels = batch_at(0)
    loss = built.engine.forward_backward(ids, labels)
    return loss, {n: p.grad.clone() for n, p in built.engine.named_params.items()}


@pytest.mark.parametrize("layout", [{"tp": 2, "sequence_parallel": True, "coc_parallel_num": 2},
                                    {"tp": 2, "coc_parallel_num": 4}], ids=["sp-chunks2", "tp-chunks4"])
def test_chunked_equals_unchunked(layout, tmp_path):
    whole = {k: v for k, v in layout.items() if k != "coc_parallel_num"}
    ref = run_ranks(loss_and_grads, 2, whole, None)
    got = run_ranks(loss_and_grads, 2, layout, str(tmp_path / "graphs"))
    for (l0, g0), (l1, g1) in zip(ref, got):
        assert abs(l1 - l0) / abs(l0) <= COC_RTOL
        assert max(rel_err(g1[n], g0[n]) for n in g0) <= COC_RTOL
    n = layout["coc_parallel_num"]
    dump = next((tmp_path / "graphs" / "rank0" / "model").glob("*_coc.py")).read_text()
    if layout.get("sequence_parallel"):
        # per layer: 2 gathers (qkv, gate/up) and 2 reduce-scatters (o, down), each in n chunks
        assert len(re.findall(r"graphllm\.sp_gather\.default\(", dump)) == 2 * LAYERS * n + 1  # + LM head
        assert len(re.findall(r"graphllm\.sp_reduce_scatter\.default\(", dump)) == 2 * LAYERS * n + 1  # + embedding
    else:
        assert len(re.findall(r"graphllm\.tp_reduce\.default\(", dump)) == 2 * LAYERS * n + 1 + 2  # + embedding, CE
    if not layout.get("sequence_parallel"):
        return  # the chunked all-reduces' backward is the identity: no chunked collectives there
    # waits sit at first use, not at issue: the backward graph issues a chunk's collective before the
    # previous chunk's wait
    backward = (tmp_path / "graphs" / "rank0" / "train" / "backward.py").read_text()
    calls = re.findall(r"_c10d_functional\.(\w+)\.default\(", backward)
    assert any(a != "wait_tensor" and b != "wait_tensor" for a, b in zip(calls, calls[1:]))


def test_bad_chunk_count_is_refused():
    from graphllm.errors import GraphllmError
    from graphllm.passes import PassContext
    from graphllm.passes.coc import coc
    from graphllm.planning import Layout

    with pytest.raises(GraphllmError, match="must be one of 1, 2, 4, 8"):
        coc.with_options(chunks=3)(None, PassContext(layout=Layout(tp=2)))
    with pytest.raises(GraphllmError, match="must be one of 1, 2, 4, 8"):  # the plan refuses it before any pass
        Layout(tp=2, coc_parallel_num=3)
