"""The MC2 npu lowerings (ops/lowering_npu_mc2.py) on 2 gloo ranks against emulated torch_npu kernels
with the wheel's exact schemas: forward and backward equal the MC2 ops' reference kernels."""

from __future__ import annotations

import pytest

from dist_util import run_ranks

BF16_RTOL = 2e-2
"""The fused kernels take fp16/bf16 only; both sides round each matmul to bf16 (8 bits of mantissa), in
a different order of rows (the kernels see [S·B, K] rows), so results agree to a few bf16 ulps."""
B, S, K = 2, 4, 256  # K: the gather/scatter kernels need k in [256, 65535)


def _rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def compare_on_rank(kind: str, dtype_name: str, N: int = 256):
    import warnings

    import torch

    import npu_emulation  # noqa: F401  (registers torch.ops.npu.*)
    from graphllm.ops import lowering_npu_mc2 as npu
    from graphllm.parallel.groups import group_name, init_parallel
    from graphllm.planning.layout import Layout

    init_parallel(Layout(tp=2), "cpu")
    npu.hcom_name = group_name  # emulated kernels take the c10d group name where HCCL takes its comm name
    dtype = getattr(torch, dtype_name)
    rank = torch.distributed.get_rank()
    gen = torch.Generator().manual_seed(rank)
    seq = S * 2 if kind == "matmul_reduce_scatter" else S  # the scatter's input holds the whole sequence
    x = torch.randn(B, seq, K, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(7)).div(16).to(dtype).requires_grad_()
    bias = torch.randn(N, generator=torch.Generator().manual_seed(8)).to(dtype).requires_grad_()
    ops = torch.ops.graphllm
    ref_op, low = {"matmul_all_reduce": (ops.matmul_all_reduce, npu.matmul_all_reduce_npu),
                   "all_gather_matmul": (ops.all_gather_matmul, npu.all_gather_matmul_npu),
                   "matmul_reduce_scatter": (ops.matmul_reduce_scatter, npu.matmul_reduce_scatter_npu)}[kind]
    args = (bias, "tp", 1) if kind == "matmul_all_reduce" else (bias, 2, "tp", 1)
    results = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for fn in (ref_op, low):
            out = fn(x, w, *args)
            y = out[0] + 0.5 * out[1].sum(-1, keepdim=True) if isinstance(out, tuple) else out  # both outputs
            g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9 + rank)).to(dtype)
            results.append([y.detach(), *torch.autograd.grad(y, (x, w, bias), g)])
    fell_back = any("not the fused kernel" in str(c.message) for c in caught)
    return [_rel(a, b) for a, b in zip(results[1], results[0])], fell_back


@pytest.mark.parametrize("n", [256, 64], ids=["fused-backward", "narrow-output"])  # 64: backward K below the limit
@pytest.mark.parametrize("kind", ["matmul_all_reduce", "all_gather_matmul", "matmul_reduce_scatter"])
def test_mc2_npu_lowering_matches_reference(kind, n):
    for errs, fell_back in run_ranks(compare_on_rank, 2, kind, "bfloat16", n):
        assert not fell_back
        assert max(errs) <= BF16_RTOL, errs


def test_mc2_npu_lowering_falls_back_outside_the_kernels_limits():
    """fp32 is outside the kernels' dtypes: the chunked decomposition runs instead, with a warning."""
    for errs, fell_back in run_ranks(compare_on_rank, 2, "all_gather_matmul", "float32"):
        assert fell_back
        assert max(errs) <= 1e-6, errs


MC2_AMP_LOSS_RTOL = 2e-2
"""bf16 autocast on both sides; the fused kernels (emulated) round each matmul's inputs to bf16 as autocast does,
but sum the [S·B, K] rows in another order than the CoC chunks, so losses agree to bf16's ~3 significant digits."""


def test_mc2_under_bf16_autocast_trains_like_the_coc_path():
    """`--mc2 --amp bf16` on the npu lowering: the kernels get bf16 inputs (the lowering casts as autocast would),
    and three training steps match the eager backend's CoC decomposition of the same MC2 ops."""
    from parallel_harness import train

    layout = {"tp": 2, "sequence_parallel": True, "mc2": True, "amp": "bf16"}
    eager = run_ranks(train, 2, {**layout, "backend": "eager"}, 3)
    npu = run_ranks(train, 2, {**layout, "backend": "npu-emulated"}, 3)
    for a, b in zip(npu[0]["losses"], eager[0]["losses"]):
        assert abs(a - b) <= MC2_AMP_LOSS_RTOL * abs(b), (npu[0]["losses"], eager[0]["losses"])
