"""graphllm::add_rms_norm — the residual add fused into the following RMSNorm: returns
(weight * rms_norm(x + residual), x + residual).

Raised by `fuse_add_rms_norm` from `rms_norm(a + b)`; the sum is an output because the residual stream
continues past the norm. Lowered to its decomposition for inductor and to `npu_add_rms_norm` for
torchair. torch_npu registers no autograd for that kernel, so graphllm supplies the backward: the norm's
gradient (npu_rms_norm_backward on the NPU) plus the gradient arriving at the sum, to both addends.
"""

import torch
from torch import Tensor

from graphllm.ops.autocast import register_autocast_policy
from graphllm.ops.rms_norm import rms_norm_decomposed, rms_norm_grads


def add_rms_norm_decomposed(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    s = x + residual
    return rms_norm_decomposed(s, weight, eps), s


@torch.library.custom_op("graphllm::add_rms_norm", mutates_args=())
def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    # contiguous: the fake function promises contiguous results, and traced graphs rely on it
    y, s = add_rms_norm_decomposed(x, residual, weight, eps)
    return y.contiguous(), s.contiguous()


@add_rms_norm.register_fake
def _(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    shape = torch.broadcast_shapes(x.shape, residual.shape)
    s_dtype = torch.promote_types(x.dtype, residual.dtype)
    return (x.new_empty(shape, dtype=torch.promote_types(s_dtype, weight.dtype)), x.new_empty(shape, dtype=s_dtype))


def _setup(ctx, inputs, output):
    x, residual, weight, eps = inputs
    ctx.save_for_backward(output[1], weight)
    ctx.eps = eps
    ctx.shapes = (x.shape, x.dtype, residual.shape, residual.dtype)


def _backward(ctx, grad_y, grad_s):
    s, weight = ctx.saved_tensors
    grad_norm, grad_w = rms_norm_grads(s, weight, ctx.eps, grad_y, True, ctx.needs_input_grad[2])
    grad_sum = grad_norm if grad_s is None else grad_norm + grad_s
    x_shape, x_dtype, r_shape, r_dtype = ctx.shapes
    grad_x = grad_sum.sum_to_size(x_shape).to(x_dtype) if ctx.needs_input_grad[0] else None
    grad_r = grad_sum.sum_to_size(r_shape).to(r_dtype) if ctx.needs_input_grad[1] else None
    return grad_x, grad_r, grad_w, None


add_rms_norm.register_autograd(_backward, setup_context=_setup)
register_autocast_policy("graphllm::add_rms_norm", torch.float32)
