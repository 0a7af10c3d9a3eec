"""graphllm::moe_permute / graphllm::moe_unpermute — the token permutation around a mixture of experts.

    moe_permute(x [T, H], ids [T, k], first_expert, num_experts)
        -> x_sorted [T·k, H], order [T·k] int64, group_sizes [num_experts] int64
    moe_unpermute(y [T·k, H], order [T·k], weights [T, k]) -> out [T, H]

Pair p = t·k + j is token t's j-th choice. The permutation sorts the pairs by expert id (stable: tokens
keep their order inside an expert); `order[i]` is the pair at sorted row i and `x_sorted[i] = x[order[i] // k]`.
Only the experts first_expert .. first_expert+num_experts-1 are counted in `group_sizes`: the pairs of any
other expert (another expert-parallel rank's, or an id the router marked as dropped by capacity) sort after
them, into a tail that graphllm::grouped_matmul leaves zero. So one rank of an expert-parallel group, or a
capacity-limited router, is the same graph as the whole model with other arguments.

The combine: out[t] = Σ_j weights[t, j] · y[row of pair (t, j)], computed in the promoted dtype of y and
the weights (Mixtral keeps float32 routing weights, Qwen3-MoE rounds them to the compute dtype), cast
back to y's dtype. Tail rows are zero, so dropped pairs add nothing.

Reference kernels are plain ATen (argsort, index_select, index_add); the decompose table lowers to them
for inductor, and the NPU runs them too: torch_npu's npu_moe_token_permute / npu_moe_token_unpermute have
lowerings ready (ops/lowering_npu_moe.py) but no torchair GE converter yet, so they are not wired.
"""

from __future__ import annotations

import torch
from torch import Tensor

from graphllm.errors import GraphllmError


def _sort_key(ids: Tensor, first_expert: int, num_experts: int) -> Tensor:
    """[T·k]: the local expert index of each pair, `num_experts` for pairs outside the range (the tail)."""
    local = ids.reshape(-1) - first_expert
    return torch.where((local >= 0) & (local < num_experts), local, torch.full_like(local, num_experts))


def moe_permute_decomposed(x: Tensor, ids: Tensor, first_expert: int, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    k = ids.shape[1]
    key = _sort_key(ids, first_expert, num_experts)
    order = torch.argsort(key, stable=True)  # [T·k]: pairs grouped by expert, tokens in order, tail last
    token_of = torch.div(order, k, rounding_mode="floor")
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=x.device).scatter_add(0, key, torch.ones_like(key))
    return x.index_select(0, token_of), order, counts[:num_experts]


def moe_unpermute_decomposed(y: Tensor, order: Tensor, weights: Tensor) -> Tensor:
    k = weights.shape[1]
    token_of = torch.div(order, k, rounding_mode="floor")
    rows = (y * weights.reshape(-1).index_select(0, order)[:, None]).to(y.dtype)  # [T·k, H]
    return y.new_zeros((weights.shape[0], y.shape[1])).index_add(0, token_of, rows)


@torch.library.custom_op("graphllm::moe_permute", mutates_args=())
def moe_permute(x: Tensor, ids: Tensor, first_expert: int, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    x_sorted, order, counts = moe_permute_decomposed(x, ids, first_expert, num_experts)
    return x_sorted.contiguous(), order.contiguous(), counts.contiguous()


@moe_permute.register_fake
def _(x, ids, first_expert, num_experts):
    torch._check(ids.dim() == 2 and ids.shape[0] == x.shape[0],
                 lambda: f"moe_permute: ids must be [T={x.shape[0]}, k], got {tuple(ids.shape)}")
    n = ids.shape[0] * ids.shape[1]
    return (x.new_empty((n, x.shape[1])), ids.new_empty((n,), dtype=torch.long),
            ids.new_empty((num_experts,), dtype=torch.long))


def _permute_setup(ctx, inputs, output):
    x, ids, _, _ = inputs
    ctx.save_for_backward(output[1])
    ctx.k, ctx.tokens = ids.shape[1], x.shape[0]


def _permute_backward(ctx, grad_sorted, _grad_order, _grad_counts):
    (order,) = ctx.saved_tensors
    token_of = torch.div(order, ctx.k, rounding_mode="floor")
    dx = grad_sorted.new_zeros((ctx.tokens, grad_sorted.shape[1])).index_add(0, token_of, grad_sorted)
    return dx, None, None, None


moe_permute.register_autograd(_permute_backward, setup_context=_permute_setup)


@torch.library.custom_op("graphllm::moe_unpermute", mutates_args=())
def moe_unpermute(y: Tensor, order: Tensor, weights: Tensor) -> Tensor:
    return moe_unpermute_decomposed(y, order, weights).contiguous()


@moe_unpermute.register_fake
def _(y, order, weights):
    torch._check(order.shape[0] == y.shape[0] == weights.shape[0] * weights.shape[1],
                 lambda: f"moe_unpermute: y [T·k, H], order [T·k], weights [T, k], got {tuple(y.shape)}, "
                         f"{tuple(order.shape)}, {tuple(weights.shape)}")
    return y.new_empty((weights.shape[0], y.shape[1]))


def _unpermute_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _unpermute_backward(ctx, grad):
    y, order, weights = ctx.saved_tensors
    k = weights.shape[1]
    token_of = torch.div(order, k, rounding_mode="floor")
    g_rows = grad.index_select(0, token_of)  # [T·k, H]: each sorted row's token's gradient
    w_sorted = weights.reshape(-1).index_select(0, order)
    dy = (g_rows * w_sorted[:, None]).to(y.dtype) if ctx.needs_input_grad[0] else None
    dw = None
    if ctx.needs_input_grad[2]:
        per_row = (g_rows.to(torch.promote_types(y.dtype, weights.dtype)) * y).sum(dim=-1)  # [T·k]
        dw = per_row.new_zeros(order.shape).index_copy(0, order, per_row).reshape(weights.shape).to(weights.dtype)
    return dy, None, dw


moe_unpermute.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


@torch.library.custom_op("graphllm::router_stat", mutates_args=())
def router_stat(x: Tensor, rows: int, parts: int = 1) -> Tensor:
    """A router statistic the loss or the metrics read ([T, ...] of `rows` sequences' T tokens, row-major: expert
    ids, probabilities, logits), marked for the passes that split a micro-batch's sequences over ranks: each
    gathers the whole micro-batch's tokens back (passes/router_stats.py). `parts` > 1: this rank holds 1/parts of
    every sequence (context parallelism, captured for its own tokens) and the result is the gathered statistic,
    [parts·T, ...], so the losses are traced for the whole sequences; the context_parallel pass puts in the
    gather. Lowered to nothing once gathered; a copy here only because a custom op may not return its input."""
    _gathered_already(parts)
    return x.clone()


@router_stat.register_fake
def _(x, rows, parts=1):
    return x.new_empty([x.shape[0] * parts, *x.shape[1:]])


def _gathered_already(parts: int) -> None:
    if parts != 1:
        raise GraphllmError(f"graphllm::router_stat of 1/{parts} of each sequence ran without its gather: the "
                            "context_parallel pass puts it in (--cp); run the graph through graphllm's pipeline")


def router_stat_decomposed(x: Tensor, rows: int, parts: int = 1) -> Tensor:
    _gathered_already(parts)
    return x


def _stat_setup(ctx, inputs, output):
    pass


def _stat_backward(ctx, grad):
    return grad, None, None


router_stat.register_autograd(_stat_backward, setup_context=_stat_setup)
