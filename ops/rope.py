"""graphllm::rope — rotary position embedding, rotate-half form: x * cos + rotate_half(x) * sin.

x is [..., D] (graphllm's models use [B, H, S, D]); cos and sin broadcast against x and are
constants of the step (functions of positions only), so they get no gradient unless asked.
Raised by `fuse_rope`; lowered to its decomposition for inductor and to `npu_rotary_mul(x, cos, sin,
rotary_mode='half')` for torchair.
"""

import torch
from torch import Tensor

from graphllm.ops.autocast import register_autocast_policy


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_half_transposed(g: Tensor) -> Tensor:
    """The adjoint of rotate_half: <rotate_half(x), g> == <x, rotate_half_transposed(g)>."""
    half = g.shape[-1] // 2
    return torch.cat((g[..., half:], -g[..., :half]), dim=-1)


def rope_decomposed(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + rotate_half(x) * sin


@torch.library.custom_op("graphllm::rope", mutates_args=())
def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # contiguous: the fake function promises a contiguous result, and traced graphs rely on it
    return rope_decomposed(x, cos, sin).contiguous()


@rope.register_fake
def _(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    shape = torch.broadcast_shapes(x.shape, cos.shape, sin.shape)
    dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
    return x.new_empty(shape, dtype=dtype)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _reduce_to(grad: Tensor, like: Tensor) -> Tensor:
    """Sum a broadcast gradient back to the shape of the input it came from."""
    return grad.sum_to_size(like.shape).to(like.dtype)


def _backward(ctx, grad):
    x, cos, sin = ctx.saved_tensors
    grad_x = grad_cos = grad_sin = None
    if ctx.needs_input_grad[0]:
        grad_x = _reduce_to(grad * cos + rotate_half_transposed(grad * sin), x)
    if ctx.needs_input_grad[1]:
        grad_cos = _reduce_to(grad * x, cos)
    if ctx.needs_input_grad[2]:
        grad_sin = _reduce_to(grad * rotate_half(x), sin)
    return grad_x, grad_cos, grad_sin


rope.register_autograd(_backward, setup_context=_setup)
register_autocast_policy("graphllm::rope", torch.bfloat16)


# -- rope_qk: one op for a layer's q and k rotations (torch_npu's inference kernel rotates both at once) --
def rope_qk_decomposed(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return rope_decomposed(q, cos, sin), rope_decomposed(k, cos, sin)


@torch.library.custom_op("graphllm::rope_qk", mutates_args=())
def rope_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return rope(q, cos, sin), rope(k, cos, sin)


@rope_qk.register_fake
def _(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return torch.ops.graphllm.rope(q, cos, sin), torch.ops.graphllm.rope(k, cos, sin)


def _setup_qk(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_qk(ctx, grad_q, grad_k):
    q, k, cos, sin = ctx.saved_tensors

    def back(g: Tensor | None, x: Tensor) -> Tensor | None:
        return None if g is None else _reduce_to(g * cos + rotate_half_transposed(g * sin), x)
    return back(grad_q, q), back(grad_k, k), None, None  # cos/sin: position constants, no gradient


rope_qk.register_autograd(_backward_qk, setup_context=_setup_qk)
register_autocast_policy("graphllm::rope_qk", torch.bfloat16)
