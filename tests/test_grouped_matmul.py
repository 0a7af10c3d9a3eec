"""graphllm::grouped_matmul: per-group matmuls over row-sorted groups, with its backward rule."""

from __future__ import annotations

import pytest
import torch

import graphllm  # noqa: F401 - registers the graphllm ops

from hf_parity import rel_err

FP32_RTOL = 1e-6  # the same dot products as per-group torch.matmul; only blocking of the batched weight grad


def _dense(x, w, sizes):
    return torch.cat([xg @ w[g] for g, xg in enumerate(x.split(sizes.tolist()))])


def test_forward_and_backward_match_per_group_matmuls():
    gen = torch.Generator().manual_seed(0)
    sizes = torch.tensor([4, 0, 7, 1])
    x = torch.randn(12, 8, generator=gen, requires_grad=True)
    w = torch.randn(4, 8, 6, generator=gen, requires_grad=True)
    y = torch.ops.graphllm.grouped_matmul(x, w, sizes)
    ref = _dense(x, w, sizes)
    assert rel_err(y, ref) <= FP32_RTOL
    g = torch.randn(y.shape, generator=gen)
    got = torch.autograd.grad(y, (x, w), g)
    want = torch.autograd.grad(ref, (x, w), g)
    assert all(rel_err(a, b) <= FP32_RTOL for a, b in zip(got, want))
    assert torch.count_nonzero(got[1][1]) == 0  # the empty group's weight gets no gradient


def test_opcheck_and_bad_sizes():
    gen = torch.Generator().manual_seed(1)
    x, w, sizes = torch.randn(6, 4, generator=gen), torch.randn(3, 4, 5, generator=gen), torch.tensor([2, 3, 1])
    torch.library.opcheck(torch.ops.graphllm.grouped_matmul.default, (x, w, sizes))
    with pytest.raises(ValueError, match="sum to 7, x has 6 rows"):
        torch.ops.graphllm.grouped_matmul(x, w, torch.tensor([2, 2, 3]))


def test_rows_past_the_groups_are_zero_and_get_no_gradient():
    """The tail (pairs of another expert-parallel rank, or dropped by capacity) is left out of every group."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 4, generator=gen, requires_grad=True)
    w = torch.randn(2, 4, 3, generator=gen, requires_grad=True)
    sizes = torch.tensor([3, 2])
    y = torch.ops.graphllm.grouped_matmul(x, w, sizes)
    assert torch.count_nonzero(y[5:]) == 0
    assert rel_err(y[:5], _dense(x[:5], w, sizes)) <= FP32_RTOL
    g = torch.randn(y.shape, generator=gen)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    assert torch.count_nonzero(dx[5:]) == 0
    assert rel_err(dw, torch.autograd.grad(_dense(x[:5], w, sizes), w, g[:5])[0]) <= FP32_RTOL


def test_a_weight_in_the_stored_layout_multiplies_by_its_transpose():
    """models/moe.py passes the [G, N, K] parameters with transpose_weight: the values and gradients of the
    transposed view, the weight gradient laid out like the parameter, and no transposed copy anywhere."""
    gen = torch.Generator().manual_seed(3)
    sizes = torch.tensor([3, 0, 4])
    x = torch.randn(8, 5, generator=gen, requires_grad=True)
    param = torch.randn(3, 6, 5, generator=gen, requires_grad=True)  # [G, N, K]
    y = torch.ops.graphllm.grouped_matmul(x, param, sizes, transpose_weight=True)
    ref = _dense(x[:7], param.transpose(1, 2), sizes)
    assert y.shape == (8, 6) and rel_err(y[:7], ref) <= FP32_RTOL and torch.count_nonzero(y[7:]) == 0
    g = torch.randn(y.shape, generator=gen)
    got = torch.autograd.grad(y, (x, param), g)
    want = torch.autograd.grad(ref, (x, param), g[:7])
    assert rel_err(got[0], want[0]) <= FP32_RTOL and torch.count_nonzero(got[0][7:]) == 0  # the tail: none
    assert got[1].shape == param.shape and got[1].is_contiguous() and rel_err(got[1], want[1]) <= FP32_RTOL
    torch.library.opcheck(torch.ops.graphllm.grouped_matmul.default, (x.detach(), param.detach(), sizes, True))
    with pytest.raises(RuntimeError, match=r"weight \[G, N, K\], got \(8, 5\), \(3, 5, 6\)"):
        torch.ops.graphllm.grouped_matmul(x, param.transpose(1, 2), sizes, transpose_weight=True)


BF16_RTOL = 1e-2  # bf16 inputs and outputs against the fp32 product: a few 2^-8 roundings


@pytest.mark.parametrize("tail", [0, 3])  # the last group rounded up past x's end, or into the tail
def test_bf16_groups_rounded_to_whole_buckets_match_per_group_matmuls(tail: int):
    """In bf16 on the CPU each group's matmul runs on a whole number of ROW_BUCKET rows (the rows past the group are
    the next group's, recomputed after) and the weight gradient sums whole buckets then the remainder: the
    same values as per-group matmuls, and the tail still zero."""
    from graphllm.ops.grouped_matmul import ROW_BUCKET

    gen = torch.Generator().manual_seed(4)
    sizes = torch.tensor([37, 0, 2 * ROW_BUCKET, 5, ROW_BUCKET - 2])
    rows = int(sizes.sum()) + tail
    x = torch.randn(rows, 48, generator=gen).bfloat16().requires_grad_()
    param = torch.randn(5, 40, 48, generator=gen).bfloat16().requires_grad_()  # [G, N, K]
    y = torch.ops.graphllm.grouped_matmul(x, param, sizes, transpose_weight=True)
    used = int(sizes.sum())
    ref = _dense(x[:used].float(), param.float().transpose(1, 2), sizes)
    assert rel_err(y[:used].float(), ref) <= BF16_RTOL and torch.count_nonzero(y[used:]) == 0
    g = torch.randn(y.shape, generator=gen).bfloat16()
    dx, dw = torch.autograd.grad(y, (x, param), g)
    want_dx, want_dw = torch.autograd.grad(ref, (x, param), g[:used].float())
    assert rel_err(dx.float(), want_dx) <= BF16_RTOL and torch.count_nonzero(dx[used:]) == 0
    assert rel_err(dw.float(), want_dw) <= BF16_RTOL and torch.count_nonzero(dw[1]) == 0
