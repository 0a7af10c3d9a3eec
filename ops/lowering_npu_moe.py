"""The npu lowering of graphllm's MoE token permutation (ops/moe_dispatch.py) to torch_npu's fused kernels.

    moe_permute(x, ids, first_expert, E)   npu_moe_token_permute(x, key)            key [T, k]: local expert id, E for
                                                                                    the tail (ids outside the range)
    moe_unpermute(y, order, weights)       npu_moe_token_unpermute(y, inverse(order), probs=weights)

torch_npu 2.13's npu_moe_token_permute (torch_npu/_op_plugin_docs.py) sorts the T·k pairs by index value and
returns `sorted_indices[pair] = its row` (int32): the inverse of graphllm's `order[row] = its pair`, turned back
with one scatter. Pairs of experts outside [first_expert, first_expert + E) get the sentinel E, which sorts after
every local expert: the tail, as graphllm's op (the kernel takes values in [0, 16777215)). group_sizes counts the
keys with a scatter_add, dropping the sentinel's count. The kernels are documented as deterministic; that their sort
keeps token order inside an expert is what the docs' example shows, not a stated rule. If it did not, `order` would
still describe the rows the kernel produced, so the MoE block's result would not change.

npu_moe_token_unpermute computes out[t] = Σ_j probs[t, j] · y[sorted_indices[t·k + j]]; the tail rows of y are zero
(graphllm::grouped_matmul), so dropped pairs add nothing. Whether the kernel accumulates in float32 and accepts
float32 probs with bf16 tokens (Mixtral's routing weights) is not documented per pair of dtypes: [unverified].

Backward: torch_npu has no autograd for npu_moe_token_permute and its unpermute backward kernel has no GE converter,
so both lowerings are autograd.Functions whose backward is index_select / multiply / sum (ATen ops GE converts):
dx[t] = Σ_j dx_sorted[sorted_indices[t·k + j]]; dy[row] = grad[token of row] · weight of row; dweights[t, j] =
⟨grad[t], y[sorted_indices[t·k + j]]⟩.

Not wired into the npu table (ops/lowering_npu.py npu_lowerings): torchair 2.13 registers no GE converter for
either kernel (only for npu_moe_init_routing_v2 / npu_moe_finalize_routing), so graphllm's pre-flight would refuse
every MoE graph that called them ("no converter"), and torchair would fall back to compiling an eager callback for
them at graph build. The npu table keeps the ATen decompositions, which convert; tests/test_npu_moe.py checks both
facts, and fails when a torch_npu release adds the converters.
"""

from __future__ import annotations

import torch
from torch import Tensor

NPU_MOE_CONTRACT: dict[str, tuple[str, ...]] = {
    "npu_moe_token_permute": ("tokens", "indices", "num_out_tokens", "padded_mode"),
    "npu_moe_token_unpermute": ("permuted_tokens", "sorted_indices", "probs", "padded_mode"),
}
MOE_MAX_TOPK = 512  # both kernels: topK <= 512 on A2/A3
MOE_MAX_PAIRS = 16777215  # npu_moe_token_permute: fewer index elements than this


def _inverse(perm: Tensor) -> Tensor:
    """inv[perm[i]] = i for a permutation of 0..n−1, as int64 (a scatter; index_copy's GE converter is a stub)."""
    positions = torch.arange(perm.shape[0], device=perm.device)
    return positions.scatter(0, perm.long(), positions)


def _local_key(ids: Tensor, first_expert: int, num_experts: int) -> Tensor:
    """[T, k]: each pair's local expert id, `num_experts` (the sentinel that sorts last) outside the range."""
    local = ids - first_expert
    return torch.where((local >= 0) & (local < num_experts), local, num_experts)


class _MoePermuteNpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, ids: Tensor, first_expert: int, num_experts: int):
        key = _local_key(ids, first_expert, num_experts)
        # num_out_tokens None: keep all T·k rows (the tail included); padded_mode False: the kernel sorts
        x_sorted, sorted_indices = torch.ops.npu.npu_moe_token_permute(x, key, num_out_tokens=None, padded_mode=False)
        flat = key.reshape(-1)
        counts = torch.zeros(num_experts + 1, dtype=torch.long, device=x.device).scatter_add(
            0, flat, torch.ones(flat.shape, dtype=torch.long, device=x.device))
        ctx.save_for_backward(sorted_indices)
        ctx.tokens, ctx.k = ids.shape
        order, group_sizes = _inverse(sorted_indices), counts[:num_experts]
        ctx.mark_non_differentiable(order, group_sizes)
        return x_sorted, order, group_sizes

    @staticmethod
    def backward(ctx, grad_sorted: Tensor, _grad_order, _grad_sizes):
        (sorted_indices,) = ctx.saved_tensors
        rows = grad_sorted.index_select(0, sorted_indices.long())  # [T·k, H]: each pair's row, pairs in token order
        return rows.reshape(ctx.tokens, ctx.k, -1).sum(1), None, None, None


class _MoeUnpermuteNpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, order: Tensor, weights: Tensor):
        sorted_indices = _inverse(order)
        out = torch.ops.npu.npu_moe_token_unpermute(y, sorted_indices.to(torch.int32), probs=weights,
                                                    padded_mode=False)
        ctx.save_for_backward(y, order, sorted_indices, weights)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        y, order, sorted_indices, weights = ctx.saved_tensors
        tokens, k = weights.shape
        dy = dweights = None
        if ctx.needs_input_grad[0]:
            per_pair = (grad.unsqueeze(1) * weights.unsqueeze(-1)).to(y.dtype)  # [T, k, H]
            dy = per_pair.reshape(tokens * k, -1).index_select(0, order)  # row r: its pair's
        if ctx.needs_input_grad[2]:
            dtype = torch.promote_types(y.dtype, weights.dtype)
            y_pairs = y.index_select(0, sorted_indices).reshape(tokens, k, -1)  # [T, k, H]: each pair's row
            dweights = (y_pairs.to(dtype) * grad.to(dtype).unsqueeze(1)).sum(-1).to(weights.dtype)
        return dy, None, dweights


def _kernel_limits_hold(ids: Tensor) -> bool:
    return ids.shape[1] <= MOE_MAX_TOPK and ids.numel() < MOE_MAX_PAIRS


def moe_permute_npu(x: Tensor, ids: Tensor, first_expert: int, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    if not _kernel_limits_hold(ids):  # outside the documented limits: the ATen decomposition
        from graphllm.ops.moe_dispatch import moe_permute_decomposed
        return moe_permute_decomposed(x, ids, first_expert, num_experts)
    return _MoePermuteNpu.apply(x, ids, first_expert, num_experts)


def moe_unpermute_npu(y: Tensor, order: Tensor, weights: Tensor) -> Tensor:
    if not _kernel_limits_hold(weights):
        from graphllm.ops.moe_dispatch import moe_unpermute_decomposed
        return moe_unpermute_decomposed(y, order, weights)
    return _MoeUnpermuteNpu.apply(y, order, weights)


def npu_moe_lowerings() -> dict:
    """The MoE lowerings by op, for the npu table once torchair converts the kernels (see the module docstring)."""
    ops = torch.ops.graphllm
    return {ops.moe_permute.default: moe_permute_npu, ops.moe_unpermute.default: moe_unpermute_npu}
