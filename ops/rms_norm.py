"""graphllm::rms_norm — y = weight * (x * rsqrt(mean(x², -1) + eps)), computed in fp32.

Raised by `fuse_rms_norm`; lowered to its decomposition for inductor and to `npu_rms_norm` (output 0)
for torchair. The backward rule is written out so backends without autograd for the fused kernel
(and the eager backend) differentiate it without tracing through the decomposition.
"""

import torch
from torch import Tensor

from graphllm.ops.autocast import register_autocast_policy


def rms_norm_decomposed(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The reference math in plain torch ops (the inductor lowering and the reference kernel)."""
    x32 = x.to(torch.float32)
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


@torch.library.custom_op("graphllm::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # contiguous: the fake function promises a contiguous result, and traced graphs rely on it
    return rms_norm_decomposed(x, weight, eps).contiguous()


@rms_norm.register_fake
def _(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


def _setup(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def rms_norm_grads(x: Tensor, weight: Tensor, eps: float, grad_y: Tensor, need_x: bool = True,
                   need_w: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of weight * rms_norm(x) w.r.t. x and weight (shared with graphllm::add_rms_norm)."""
    x32 = x.to(torch.float32)
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
    xhat32 = x32 * rstd
    grad_x = grad_w = None
    if need_w:
        grad_w = (grad_y * xhat32.to(x.dtype)).sum_to_size(weight.shape).to(weight.dtype)
    if need_x:
        g = (grad_y * weight).to(torch.float32)  # gradient w.r.t. xhat
        # d/dx [x * rstd] = rstd * (g - xhat * mean(g * xhat))
        grad_x = (rstd * (g - xhat32 * (g * xhat32).mean(-1, keepdim=True))).to(x.dtype)
    return grad_x, grad_w


def _backward(ctx, grad_y):
    x, weight = ctx.saved_tensors
    grad_x, grad_w = rms_norm_grads(x, weight, ctx.eps, grad_y, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
    return grad_x, grad_w, None


rms_norm.register_autograd(_backward, setup_context=_setup)
register_autocast_policy("graphllm::rms_norm", torch.float32)
