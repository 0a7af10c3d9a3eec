"""The npu lowering of graphllm's MC2 ops (ops/mc2.py) to torch_npu's fused matmul+collective kernels.

    matmul_all_reduce      npu_mm_all_reduce_base(x, wᵀ, hcom, reduce_op='sum')
    all_gather_matmul      npu_all_gather_base_mm(x, wᵀ, hcom, world_size, gather_index=0, gather_output=True)
    matmul_reduce_scatter  npu_mm_reduce_scatter_base(x, wᵀ, hcom, world_size, reduce_op='sum')

None of the three has autograd in torch_npu, so each lowering is an autograd.Function whose backward is
graphllm's (MindSpeed's MC2 backward): matmul_reduce_scatter's input gradient is npu_all_gather_base_mm
of the output gradient, whose gathered output also gives the weight gradient; all_gather_matmul's is
npu_mm_reduce_scatter_base of the output gradient (plus a plain reduce-scatter when other linears read
the gathered input); matmul_all_reduce's is a matmul. The kernels take 2-D inputs gathered/scattered
along dim 0, so [B, S, K] activations travel sequence-first ([S·B, K]): gathering those rows rank-major
is gathering the sequence. Bias is added outside the kernels (the gather/scatter kernels accept none).

The kernels' documented limits (world size 2/4/8, fp16/bf16, K in [256, 65535)) are checked at trace
time; a forward outside them runs the op's chunked decomposition instead, with a warning, and a backward
outside them (its K is the output width) the plain collective and matmul.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from graphllm.ops.collectives import all_gather_decomposed, group_name_of, reduce_scatter_decomposed
from graphllm.ops.mc2 import (add_bias, all_gather_matmul_decomposed, matmul_all_reduce_decomposed,
                              matmul_reduce_scatter_decomposed)

NPU_MC2_CONTRACT: dict[str, tuple[str, ...]] = {
    "npu_mm_all_reduce_base": ("x1", "x2", "hcom", "reduce_op"),
    "npu_all_gather_base_mm": ("self", "x2", "hcom", "world_size", "gather_index", "gather_output"),
    "npu_mm_reduce_scatter_base": ("self", "x2", "hcom", "world_size", "reduce_op"),
}
WORLD_SIZES = (2, 4, 8)
DTYPES = (torch.float16, torch.bfloat16)
K_RANGE = (256, 65535)  # the gather/scatter kernels' contraction size, half-open


_EMULATED_HCOM = False
"""Set by graphllm.preflight.emulation: the CPU-emulated kernels take the c10d group name instead."""


def emulate_hcom() -> None:
    """The MC2 kernels are CPU emulations (graphllm.preflight.emulation): pass them c10d group names."""
    global _EMULATED_HCOM
    _EMULATED_HCOM = True


def hcom_name(group: str) -> str:
    """The HCCL communicator name of a graphllm group kind, as the MC2 kernels take it."""
    import torch.distributed as dist

    if _EMULATED_HCOM:
        return group_name_of(group)

    from graphllm.ops.groups import resolver

    pg = resolver().process_group(group)
    # init_comm: create the communicator now, as torchair's own hcom lookup does in graph mode
    return pg._get_backend(torch.device("npu")).get_hccl_comm_name(dist.get_rank(), init_comm=True)


def _limits(x: Tensor, k: int, size: int | None) -> list[str]:
    """Why the kernels cannot take this call (empty: they can)."""
    reasons = []
    if size is not None and size not in WORLD_SIZES:
        reasons.append(f"group size {size} not in {WORLD_SIZES}")
    if x.dtype not in DTYPES:
        reasons.append(f"dtype {x.dtype} (fp16/bf16 only)")
    if size is not None and not K_RANGE[0] <= k < K_RANGE[1]:
        reasons.append(f"K={k} outside [{K_RANGE[0]}, {K_RANGE[1]})")
    return reasons


# The lowering runs while Dynamo traces the lowered graph: a warning there must be one Dynamo moves out of
# the graph (it replays it after the compiled call) rather than a graph break, which fullgraph refuses.
torch._dynamo.config.reorderable_logging_functions.add(warnings.warn)


def _supported(kind: str, x: Tensor, size: int | None) -> bool:
    reasons = _limits(x, x.shape[-1], size)
    if reasons:
        warnings.warn(f"{kind}: {'; '.join(reasons)}: runs as CoC chunks on the NPU, not the fused kernel",
                      stacklevel=3)
    return not reasons


def _autocast(x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Under autocast (`--amp bf16`) the weights (and some activations) are fp32 and autocast casts each
    matmul's inputs; the fused kernels are not on autocast's lists, so the lowering casts them as autocast
    would cast the matmul, and the kernels (fp16/bf16 only) run instead of the fp32 fallback."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device)
    return x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _rows(x: Tensor) -> Tensor:
    """[B, S, K] → [S·B, K], sequence-major."""
    return x.transpose(0, 1).reshape(-1, x.shape[-1])


def _unrows(y: Tensor, batch: int) -> Tensor:
    """[S·B, N] → [B, S, N]."""
    return y.view(-1, batch, y.shape[-1]).transpose(0, 1).contiguous()


def _weight_grad(g_rows: Tensor, x_rows: Tensor) -> Tensor:
    return g_rows.t().matmul(x_rows)


class _MatmulAllReduceNpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, group: str):
        ctx.save_for_backward(x, weight)
        return torch.ops.npu.npu_mm_all_reduce_base(x, weight.t(), hcom_name(group), reduce_op="sum")

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight = ctx.saved_tensors
        return g.matmul(weight), g.flatten(0, -2).t().matmul(x.flatten(0, -2)), None


def _all_gather_mm(x_rows: Tensor, weight: Tensor, size: int, group: str) -> tuple[Tensor, Tensor]:
    return torch.ops.npu.npu_all_gather_base_mm(x_rows, weight.t(), hcom_name(group), size, gather_index=0,
                                                gather_output=True)


def _mm_reduce_scatter(x_rows: Tensor, weight: Tensor, size: int, group: str) -> Tensor:
    return torch.ops.npu.npu_mm_reduce_scatter_base(x_rows, weight.t(), hcom_name(group), size, reduce_op="sum")


class _AllGatherMatmulNpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, size: int, group: str):
        y_rows, gathered_rows = _all_gather_mm(_rows(x), weight, size, group)
        ctx.save_for_backward(gathered_rows, weight)
        ctx.size, ctx.group, ctx.batch = size, group, x.shape[0]
        ctx.set_materialize_grads(False)
        return _unrows(y_rows, x.shape[0]), _unrows(gathered_rows, x.shape[0])

    @staticmethod
    def backward(ctx, g: Tensor | None, g_gathered: Tensor | None):
        gathered_rows, weight = ctx.saved_tensors
        if g is None:
            gx = reduce_scatter_decomposed(_rows(g_gathered), 0, ctx.size, group_name_of(ctx.group))
            return _unrows(gx, ctx.batch), None, None, None
        g_rows = _rows(g)
        if g_gathered is None and not _limits(g, g.shape[-1], ctx.size):
            gx = _mm_reduce_scatter(g_rows, weight.t(), ctx.size, ctx.group)  # (g @ w) reduce-scattered, fused
        else:
            full = g_rows.matmul(weight) + (0 if g_gathered is None else _rows(g_gathered))
            gx = reduce_scatter_decomposed(full, 0, ctx.size, group_name_of(ctx.group))
        return _unrows(gx, ctx.batch), _weight_grad(g_rows, gathered_rows), None, None


class _MatmulReduceScatterNpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, size: int, group: str):
        ctx.save_for_backward(x, weight)
        ctx.size, ctx.group = size, group
        return _unrows(_mm_reduce_scatter(_rows(x), weight, size, group), x.shape[0])

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight = ctx.saved_tensors
        if _limits(g, g.shape[-1], ctx.size):  # the output width is the backward kernel's K
            g_full_rows = all_gather_decomposed(_rows(g), 0, ctx.size, group_name_of(ctx.group))
            gx_rows = g_full_rows.matmul(weight)
        else:
            gx_rows, g_full_rows = _all_gather_mm(_rows(g), weight.t(), ctx.size, ctx.group)
        return _unrows(gx_rows, x.shape[0]), _weight_grad(g_full_rows, _rows(x)), None, None


def matmul_all_reduce_npu(x: Tensor, weight: Tensor, bias: Tensor | None, group: str, chunks: int) -> Tensor:
    x, weight, bias = _autocast(x, weight, bias)
    if not _supported("matmul_all_reduce", x, None):
        return matmul_all_reduce_decomposed(x, weight, bias, group, chunks)
    return add_bias(_MatmulAllReduceNpu.apply(x, weight, group), bias)


def all_gather_matmul_npu(x: Tensor, weight: Tensor, bias: Tensor | None, size: int, group: str,
                          chunks: int) -> tuple[Tensor, Tensor]:
    x, weight, bias = _autocast(x, weight, bias)
    if not _supported("all_gather_matmul", x, size):
        return all_gather_matmul_decomposed(x, weight, bias, size, group, chunks)
    y, gathered = _AllGatherMatmulNpu.apply(x, weight, size, group)
    return add_bias(y, bias), gathered


def matmul_reduce_scatter_npu(x: Tensor, weight: Tensor, bias: Tensor | None, size: int, group: str,
                              chunks: int) -> Tensor:
    x, weight, bias = _autocast(x, weight, bias)
    if not _supported("matmul_reduce_scatter", x, size):
        return matmul_reduce_scatter_decomposed(x, weight, bias, size, group, chunks)
    return add_bias(_MatmulReduceScatterNpu.apply(x, weight, size, group), bias)


def npu_mc2_lowerings() -> dict:
    ops = torch.ops.graphllm
    return {
        ops.matmul_all_reduce.default: matmul_all_reduce_npu,
        ops.all_gather_matmul.default: all_gather_matmul_npu,
        ops.matmul_reduce_scatter.default: matmul_reduce_scatter_npu,
    }
