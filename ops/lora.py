"""graphllm::lora_linear — a linear layer and its low-rank adapter as one op (MindSpeed's CCLoRA idea).

    y = x Wᵀ (+ bias) + scale · ((drop(x) Aᵀ) Bᵀ)        W [out, in] frozen, A [r, in], B [out, r]

Raised by the `lora` pass (passes/lora.py) in place of each target `aten.linear`; one op per adapted layer, so
tensor_parallel shards base and adapter together and each backend lowers the whole (ops/lowering.py: the
plain-PyTorch decomposition for inductor, which fuses the scale and the add into the GEMM epilogues).

The base weight and bias are frozen: the autograd rule computes no gradient for them, whatever they are (a
Parameter the pass froze, or a weight dequantised from NF4 storage by the QLoRA pass), so the backward is
dx = g W + s·(g B) A and the two rank-r products dA, dB — never the [out, in] base gradient.

Dropout (PEFT's `lora_dropout`, on the adapter's input only) is not drawn here: the pass emits an ordinary
ATen random op (`rand_like(x) >= p`, a bool keep-mask) and passes it as `dropout_mask`, so the draw follows
torch's RNG like any random op in a graph (seeded by the run, saved in checkpoints, replayed under
recomputation by aot_autograd's RNG functionalisation), and the op keeps no hidden state. Kept elements are
scaled by 1/(1-p) as `nn.Dropout` does. dropout_p 0 passes no mask: the op then computes exactly the
dropout-free expression. The adapter is applied as PEFT does (`lora_B(lora_A(x)) * scaling`), so an adapter
moved between the two gives the same numbers up to reduction order.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from graphllm.ops.autocast import register_autocast_policy


def _dropped(x: Tensor, dropout_p: float, dropout_mask: Optional[Tensor]) -> Tensor:
    """The adapter's input: x, or x with the dropped elements zeroed and the kept ones scaled by 1/(1-p)."""
    if dropout_mask is None:
        return x
    keep_scale = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)  # p = 1 drops everything (as F.dropout)
    return x * dropout_mask * keep_scale


def lora_linear_decomposed(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                           scale: float, dropout_p: float = 0.0, dropout_mask: Optional[Tensor] = None) -> Tensor:
    """The op's math in plain PyTorch (the reference kernel and the inductor/npu lowering)."""
    base = F.linear(x, weight, bias)
    return base + F.linear(F.linear(_dropped(x, dropout_p, dropout_mask), lora_a), lora_b) * scale


@torch.library.custom_op("graphllm::lora_linear", mutates_args=())
def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, scale: float,
                dropout_p: float = 0.0, dropout_mask: Optional[Tensor] = None) -> Tensor:
    # contiguous: the fake function promises a contiguous result, and traced graphs rely on it
    return lora_linear_decomposed(x, weight, bias, lora_a, lora_b, scale, dropout_p, dropout_mask).contiguous()


@lora_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, scale: float,
      dropout_p: float = 0.0, dropout_mask: Optional[Tensor] = None) -> Tensor:
    torch._check(weight.dim() == 2 and lora_a.dim() == 2 and lora_b.dim() == 2, lambda: "lora_linear: 2-D W, A, B")
    torch._check(lora_a.shape[1] == x.shape[-1] == weight.shape[1], lambda: "lora_linear: A, W and x disagree on in")
    torch._check(lora_b.shape[0] == weight.shape[0] and lora_b.shape[1] == lora_a.shape[0],
                 lambda: "lora_linear: B must be [out, r] for W [out, in] and A [r, in]")
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.promote_types(x.dtype, weight.dtype))


def _setup(ctx, inputs, output):
    x, weight, _bias, lora_a, lora_b, scale, dropout_p, dropout_mask = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, dropout_mask)
    ctx.scale, ctx.dropout_p = scale, dropout_p


def _backward(ctx, grad: Tensor):
    x, weight, lora_a, lora_b, dropout_mask = ctx.saved_tensors
    s = ctx.scale
    xa = _dropped(x, ctx.dropout_p, dropout_mask)
    g_n_out = grad.reshape(-1, grad.shape[-1])  # [N, out]
    gh_n_r = (g_n_out @ lora_b.to(grad.dtype)) * s  # [N, r]: d loss / d (drop(x) Aᵀ)
    grad_x = grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        adapter_in = (gh_n_r @ lora_a.to(grad.dtype)).reshape(x.shape)  # [.., in]
        grad_x = (grad @ weight.to(grad.dtype) + _dropped(adapter_in, ctx.dropout_p, dropout_mask)).to(x.dtype)
    if ctx.needs_input_grad[3]:
        grad_a = (gh_n_r.t() @ xa.reshape(-1, xa.shape[-1]).to(grad.dtype)).to(lora_a.dtype)  # [r, in]
    if ctx.needs_input_grad[4]:
        h_n_r = F.linear(xa, lora_a).reshape(-1, lora_a.shape[0])  # [N, r], recomputed: cheaper than saving it
        grad_b = ((g_n_out.t() @ h_n_r.to(grad.dtype)) * s).to(lora_b.dtype)  # [out, r]
    # the frozen base (weight, bias) gets no gradient: that is the point of the op
    return grad_x, None, None, grad_a, grad_b, None, None, None


lora_linear.register_autograd(_backward, setup_context=_setup)
register_autocast_policy("graphllm::lora_linear", torch.bfloat16)
