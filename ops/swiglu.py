"""graphllm::swiglu — silu(gate) * up, the gated MLP activation of the Llama family.

Raised by `fuse_swiglu`; lowered to its decomposition for inductor and to `npu_swiglu` (which takes
the concatenation [gate, up] on the last dimension) for torchair.
"""

import torch
from torch import Tensor

from graphllm.ops.autocast import register_autocast_policy
import torch.nn.functional as F


def swiglu_decomposed(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


@torch.library.custom_op("graphllm::swiglu", mutates_args=())
def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    # contiguous: the fake function promises a contiguous result, and traced graphs rely on it
    return swiglu_decomposed(gate, up).contiguous()


@swiglu.register_fake
def _(gate: Tensor, up: Tensor) -> Tensor:
    shape = torch.broadcast_shapes(gate.shape, up.shape)
    return gate.new_empty(shape, dtype=torch.promote_types(gate.dtype, up.dtype))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    gate, up = ctx.saved_tensors
    sig = torch.sigmoid(gate)
    silu = gate * sig
    grad_gate = grad_up = None
    if ctx.needs_input_grad[0]:
        # d silu(g)/dg = sig * (1 + g * (1 - sig))
        grad_gate = (grad * up * sig * (1 + gate * (1 - sig))).to(gate.dtype)
    if ctx.needs_input_grad[1]:
        grad_up = (grad * silu).to(up.dtype)
    return grad_gate, grad_up


swiglu.register_autograd(_backward, setup_context=_setup)
register_autocast_policy("graphllm::swiglu", torch.bfloat16)
