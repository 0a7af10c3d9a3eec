"""CPU emulation of the torch_npu kernels graphllm lowers to, registered as `torch.ops.npu.*` so graphllm's
graphs compile on any machine with the npu lowering and look as they would with the real torch_npu.

Each kernel is defined in a `npu` torch.library namespace with the exact schema of the torch_npu 2.13.0
wheel (the caller passes them: graphllm.preflight.wheel reads the wheel's schema file) and implemented in
plain torch ops following the kernel's documented semantics (torch_npu/_op_plugin_docs.py): argument names,
output order, layouts and mask conventions are what the real kernels take, output shapes and dtypes are
those of torch_npu's own meta registrations (op_plugin/meta/_meta_registrations.py). Checks raise on inputs
the real kernel documents as unsupported (that is how a wrong lowering shows up here).

Dispatch: each kernel's emulation is its CompositeExplicitAutograd kernel (CPU, CUDA, meta) and its fake
kernel, so under Dynamo / aot_autograd a kernel stays one `npu.*` node instead of decomposing. Autograd is
what torch_npu registers: npu_rms_norm, npu_swiglu, npu_rotary_mul and npu_fusion_attention are
differentiated by their backward kernels (NPU_AUTOGRAD), which then appear in the backward graph; the
other kernels have none (graphllm's lowering wraps them in its own autograd.Function; the MoE token permutation
kernels: graphllm.preflight.npu_kernels_moe).
Never register these where torch_npu is loaded: its real kernels own the namespace.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from graphllm.errors import GraphllmError
from graphllm.preflight.npu_kernels_mc2 import MC2_DTYPES, MC2_K, MC2_WORLD_SIZES, NO_AUTOGRAD_KERNELS, traced
from graphllm.preflight.npu_kernels_moe import MOE_KERNELS

__all__ = ["CAUSAL_MASK_SIZE", "EMULATED", "FLOAT_DTYPES", "KERNELS", "MC2_DTYPES", "MC2_K", "MC2_WORLD_SIZES",
           "NPU_AUTOGRAD", "SOFTMAX_STAT_WIDTH", "register_npu_kernels"]

CAUSAL_MASK_SIZE = 2048  # sparse_mode 2/3 take the compressed 2048×2048 lower-triangular-kept mask
SOFTMAX_STAT_WIDTH = 8
"""npu_fusion_attention's softmax_max / softmax_sum are fp32 [B, N, Sq, 8]: each row's value repeated 8 times
(one 32-byte block), as torch_npu's meta registration shapes them; the grad kernel reads them back."""
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""The dtypes torch_npu documents for npu_rms_norm, npu_swiglu, npu_rotary_mul and npu_fusion_attention."""
NPU_AUTOGRAD: dict[str, str] = {
    "npu_rms_norm": "npu_rms_norm_backward",
    "npu_swiglu": "npu_swiglu_backward",
    "npu_rotary_mul": "npu_rotary_mul_backward",
    "npu_fusion_attention": "npu_fusion_attention_grad",
}
"""Forward kernel -> the backward kernel torch_npu's autograd calls for it."""


def _check_dtype(name: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} is not supported (float16, bfloat16, float32)")


# -- rms norm -------------------------------------------------------------------------------------------


def _norm_dims(self, gamma) -> tuple[int, ...]:
    """rstd reduces over gamma's dims (the trailing ones of self): shape self.shape[:-g] + (1,) * g."""
    return tuple(range(self.dim() - gamma.dim(), self.dim()))


def npu_rms_norm(self, gamma, epsilon=1e-06):
    _check_dtype("npu_rms_norm", self)
    if gamma.dtype != self.dtype:
        raise TypeError(f"npu_rms_norm: gamma dtype {gamma.dtype} must equal self dtype {self.dtype}")
    x32 = self.to(torch.float32)
    rstd = torch.rsqrt(x32.pow(2).mean(_norm_dims(self, gamma), keepdim=True) + epsilon)
    return (x32 * rstd * gamma.to(torch.float32)).to(self.dtype), rstd


def npu_rms_norm_backward(dy, self, gamma, rstd):
    """-> (dx in self's dtype, dgamma in fp32: torch_npu's meta registration types it so)."""
    dims = _norm_dims(self, gamma)
    if tuple(rstd.shape) != tuple(self.shape[:self.dim() - gamma.dim()]) + (1,) * gamma.dim():
        raise ValueError(f"npu_rms_norm_backward: rstd {tuple(rstd.shape)} is not npu_rms_norm's for "
                         f"{tuple(self.shape)}")
    x32, g32, dy32 = self.to(torch.float32), gamma.to(torch.float32), dy.to(torch.float32)
    xhat = x32 * rstd
    g = dy32 * g32
    dx = rstd * (g - xhat * (g * xhat).mean(dims, keepdim=True))
    return dx.to(self.dtype), (dy32 * xhat).sum_to_size(gamma.shape)


def npu_add_rms_norm(x1, x2, gamma, epsilon=1e-06):
    if not (x1.shape == x2.shape and x1.dtype == x2.dtype == gamma.dtype):
        raise ValueError("npu_add_rms_norm: x1, x2 must have one shape, and x1, x2, gamma one dtype")
    x = x1 + x2
    y, rstd = npu_rms_norm(x, gamma, epsilon)
    return y, rstd, x


# -- swiglu ---------------------------------------------------------------------------------------------


def npu_swiglu(self, dim=-1):
    _check_dtype("npu_swiglu", self)
    a, b = self.chunk(2, dim=dim)
    return F.silu(a) * b


def npu_swiglu_backward(grad_output, self, dim=-1):
    """d/dA silu(A)·B = g·B·σ(A)(1 + A(1 − σ(A))), d/dB = g·silu(A); concatenated along dim like self."""
    _check_dtype("npu_swiglu_backward", self, grad_output)
    a, b = self.to(torch.float32).chunk(2, dim=dim)
    g, s = grad_output.to(torch.float32), torch.sigmoid(a)
    return torch.cat((g * b * s * (1 + a * (1 - s)), g * a * s), dim=dim).to(self.dtype)


# -- rotary mul -----------------------------------------------------------------------------------------


def _rotary_check(name, self, r1, r2, rotary_mode, rotate=None):
    _check_dtype(name, self)
    if self.dim() != 4:
        raise ValueError(f"{name}: input must be 4-D (BNSD, BSND or SBND), got {tuple(self.shape)}")
    if rotary_mode != "half" or rotate is not None:
        raise NotImplementedError("emulated: rotary_mode='half' without rotate")
    for r in (r1, r2):
        if r.dim() != 4 or r.dtype != self.dtype or torch.broadcast_shapes(r.shape, self.shape) != self.shape:
            raise ValueError(f"{name}: r1/r2 must be 4-D, of the input's dtype, broadcasting to it; "
                             f"got {tuple(r.shape)} {r.dtype} for {tuple(self.shape)} {self.dtype}")


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def npu_rotary_mul(self, r1, r2, rotary_mode="half", rotate=None):
    _rotary_check("npu_rotary_mul", self, r1, r2, rotary_mode, rotate)
    return r1 * self + r2 * _rotate_half(self)


def npu_rotary_mul_backward(grad, self, r1, r2, rotary_mode="half"):
    """-> (dx, dr1, dr2), each of self's dtype and its input's shape. rotate_half's transpose maps
    [h1 | h2] to [h2 | −h1]; dr1, dr2 sum over the axes r1, r2 broadcast along."""
    _rotary_check("npu_rotary_mul_backward", self, r1, r2, rotary_mode)
    if grad.shape != self.shape:
        raise ValueError(f"npu_rotary_mul_backward: grad {tuple(grad.shape)} must have self's shape "
                         f"{tuple(self.shape)}")
    g, x = grad.to(torch.float32), self.to(torch.float32)
    h1, h2 = (r2.to(torch.float32) * g).chunk(2, dim=-1)
    dx = r1.to(torch.float32) * g + torch.cat((h2, -h1), dim=-1)
    dr1, dr2 = (g * x).sum_to_size(r1.shape), (g * _rotate_half(x)).sum_to_size(r2.shape)
    return dx.to(self.dtype), dr1.to(self.dtype), dr2.to(self.dtype)


# -- fusion attention -----------------------------------------------------------------------------------


def _to_bnsd(input_layout, *tensors):
    if input_layout == "BNSD":
        return tensors
    if input_layout == "BSND":
        return tuple(t.transpose(1, 2) for t in tensors)
    raise NotImplementedError(f"emulated layouts: BNSD, BSND; got {input_layout}")


def _attention_inputs(name, query, key, value, head_num, input_layout, pse, keep_prob, actual_seq_qlen, sink):
    """BNSD q, k, v after the documented checks (the kernel's own layout; GQA: kv heads divide q heads)."""
    _check_dtype(name, query, key, value)
    q, k, v = _to_bnsd(input_layout, query, key, value)
    if q.shape[1] != head_num:
        raise ValueError(f"{name}: head_num {head_num} != query heads {q.shape[1]} ({input_layout})")
    n1, n2 = q.shape[1], k.shape[1]
    if n1 % n2 or k.shape != v.shape:
        raise ValueError(f"{name}: key/value heads {n2} must divide query heads {n1}")
    if keep_prob != 1.0 or pse is not None or actual_seq_qlen is not None or sink is not None:
        raise NotImplementedError("emulated: no dropout, pse, sink or varlen")
    return q, k, v


def _compressed_causal(name, atten_mask, device, modes: str) -> None:
    want = torch.ones(CAUSAL_MASK_SIZE, CAUSAL_MASK_SIZE, dtype=torch.bool, device=device).triu(1)
    if atten_mask is None or atten_mask.dtype != torch.bool or atten_mask.shape != want.shape or \
            (not traced(atten_mask) and not torch.equal(atten_mask, want)):
        raise ValueError(f"{name}: sparse_mode {modes} take the compressed 2048×2048 bool mask "
                         "with True above the diagonal")


def _attention_masked(name, atten_mask, sparse_mode, q, k, pre_tockens=2147483647, next_tockens=2147483647):
    """The positions the kernel masks (True = masked), or None. q, k are BNSD."""
    (b, n, sq), sk, device = q.shape[:3], k.shape[2], q.device
    if sparse_mode == 0:
        if atten_mask is None:
            return None
        # the documented mask formats; a 3-D [B, Sq, Sk] mask would broadcast over the wrong axis
        if tuple(atten_mask.shape) not in ((b, n, sq, sk), (b, 1, sq, sk), (1, 1, sq, sk), (sq, sk)):
            raise ValueError(f"{name}: atten_mask must be BNSS, B1SS, 11SS or SS for B={b}, N={n}, Sq={sq}, "
                             f"Skv={sk}; got {tuple(atten_mask.shape)}")
        return atten_mask.to(torch.bool)
    if sparse_mode in (2, 3):
        _compressed_causal(name, atten_mask, device, "2/3")
        shift = 1 if sparse_mode == 2 else sk - sq + 1  # left-up vs right-down aligned causal
        return torch.ones(sq, sk, dtype=torch.bool, device=device).triu(shift)
    if sparse_mode == 4:  # band: key j masked for query i unless i - pre_tockens <= j <= i + next_tockens
        _compressed_causal(name, atten_mask, device, "4")
        ones = torch.ones(sq, sk, dtype=torch.bool, device=device)
        return ones.triu(next_tockens + 1) | ones.tril(-pre_tockens - 1)
    raise NotImplementedError(f"emulated sparse_mode 0, 2, 3, 4; got {sparse_mode}")


def _attention_scores(q, k, scale, masked):
    """fp32 [B, N, Sq, Sk] scores, kv heads repeated for GQA, masked positions -inf."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = torch.matmul(q.to(torch.float32), k.to(torch.float32).transpose(-2, -1)) * scale
    return scores if masked is None else scores.masked_fill(masked, float("-inf"))


def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                         scale=1.0, keep_prob=1.0, pre_tockens=2147483647, next_tockens=2147483647,
                         inner_precise=0, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                         gen_mask_parallel=True, sync=False, softmax_layout="", sink=None, dropout_mask=None, seed=0,
                         offset=0):
    """-> (attention_out, softmax_max, softmax_sum, softmax_out (reserved, empty), seed, offset, numels).

    softmax_max is each row's max of the scaled, masked scores and softmax_sum the sum of exp(score − max), so
    max + log(sum) is the row's log-sum-exp. A row whose keys are all masked gives softmax_max −inf and NaN
    softmax_sum and out here; the real kernel's values there are undocumented (torch_npu calls them invalid
    rows, computed with lost precision unless inner_precise=2), so a lowering must not read them."""
    name = "npu_fusion_attention"
    q, k, v = _attention_inputs(name, query, key, value, head_num, input_layout, pse, keep_prob, actual_seq_qlen, sink)
    scores = _attention_scores(q, k, scale, _attention_masked(name, atten_mask, sparse_mode, q, k,
                                                                pre_tockens, next_tockens))
    softmax_max = scores.amax(-1, keepdim=True)
    probs = torch.exp(scores - softmax_max)
    softmax_sum = probs.sum(-1, keepdim=True)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    out = torch.matmul(probs / softmax_sum, v.to(torch.float32)).to(query.dtype)
    stat = (*softmax_max.shape[:-1], SOFTMAX_STAT_WIDTH)
    return (_to_bnsd(input_layout, out)[0], softmax_max.expand(stat).contiguous(),
            softmax_sum.expand(stat).contiguous(), query.new_empty(0), seed, offset, 0)


def npu_fusion_attention_grad(query, key, value, dy, head_num, input_layout, *, pse=None, padding_mask=None,
                              atten_mask=None, softmax_max=None, softmax_sum=None, softmax_in=None, attention_in=None,
                              scale_value=1.0, keep_prob=1.0, pre_tockens=2147483647, next_tockens=2147483647,
                              inner_precise=0, seed=0, offset=0, numels=0, prefix=None, actual_seq_qlen=None,
                              actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False,
                              softmax_layout="", sink=None):
    """-> (dq, dk, dv, dpse, dsink). The probabilities are rebuilt from the forward's softmax_max/sum, the
    softmax gradient's row term from attention_in (the forward output): dS = P ∘ (dO·Vᵀ − rowsum(dO ∘ O)).
    dpse is empty (no pse), dsink an empty fp32 tensor (no sink), as torch_npu's fake registrations."""
    name = "npu_fusion_attention_grad"
    q, k, v = _attention_inputs(name, query, key, value, head_num, input_layout, pse, keep_prob, actual_seq_qlen, sink)
    if softmax_max is None or softmax_sum is None or attention_in is None:
        raise NotImplementedError(f"emulated {name}: needs the forward's softmax_max, softmax_sum and attention_in")
    b, n, sq = q.shape[:3]
    if softmax_max.shape != (b, n, sq, SOFTMAX_STAT_WIDTH) or softmax_sum.shape != softmax_max.shape:
        raise ValueError(f"{name}: softmax_max/softmax_sum must be npu_fusion_attention's [B, N, Sq, 8], got "
                         f"{tuple(softmax_max.shape)}, {tuple(softmax_sum.shape)}")
    if dy.shape != attention_in.shape or dy.shape != query.shape[:-1] + value.shape[-1:]:
        raise ValueError(f"{name}: dy and attention_in must have the output's shape, got {tuple(dy.shape)}, "
                         f"{tuple(attention_in.shape)}")
    masked = _attention_masked(name, atten_mask, sparse_mode, q, k, pre_tockens, next_tockens)
    probs = torch.exp(_attention_scores(q, k, scale_value, masked) - softmax_max[..., :1]) / softmax_sum[..., :1]
    group = n // k.shape[1]
    k32, v32 = (t.to(torch.float32).repeat_interleave(group, dim=1) for t in (k, v))
    do, o = (t.to(torch.float32) for t in _to_bnsd(input_layout, dy, attention_in))
    ds = probs * (torch.matmul(do, v32.transpose(-2, -1)) - (do * o).sum(-1, keepdim=True))
    dq = torch.matmul(ds, k32) * scale_value
    dk = torch.matmul(ds.transpose(-2, -1), q.to(torch.float32)) * scale_value
    dv = torch.matmul(probs.transpose(-2, -1), do)
    dk, dv = (t.unflatten(1, (k.shape[1], group)).sum(2) for t in (dk, dv))  # GQA: sum over each kv head's group
    dq, dk, dv = (t.to(query.dtype) for t in _to_bnsd(input_layout, dq, dk, dv))
    return dq, dk, dv, query.new_empty(0), torch.empty(0, dtype=torch.float32, device=query.device)


# -- autograd (torch_npu's: the forward kernel's saved outputs feed its backward kernel) -------------------


def _rms_norm_setup(ctx, inputs, output):
    self, gamma, _ = inputs
    ctx.save_for_backward(self, gamma, output[1])
    ctx.mark_non_differentiable(output[1])


def _rms_norm_backward(ctx, grad_y, _grad_rstd):
    self, gamma, rstd = ctx.saved_tensors
    dx, dgamma = torch.ops.npu.npu_rms_norm_backward(grad_y.contiguous(), self, gamma, rstd)
    return dx, dgamma, None


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.dim = inputs[1]


def _swiglu_backward(ctx, grad):
    return torch.ops.npu.npu_swiglu_backward(grad.contiguous(), ctx.saved_tensors[0], ctx.dim), None


def _rotary_mul_setup(ctx, inputs, output):
    self, r1, r2, ctx.rotary_mode, _ = inputs
    ctx.save_for_backward(self, r1, r2)


def _rotary_mul_backward(ctx, grad):
    self, r1, r2 = ctx.saved_tensors
    dx, dr1, dr2 = torch.ops.npu.npu_rotary_mul_backward(grad.contiguous(), self, r1, r2, ctx.rotary_mode)
    return dx, dr1, dr2, None, None


def _arg_names(kernel: str) -> list[str]:
    return [a.name for a in getattr(torch.ops.npu, kernel).default._schema.arguments]


_FA_TENSORS = ("query", "key", "value", "pse", "padding_mask", "atten_mask")
_FA_KEPT = ("head_num", "input_layout", "keep_prob", "pre_tockens", "next_tockens", "inner_precise", "prefix",
            "actual_seq_qlen", "actual_seq_kvlen", "sparse_mode", "gen_mask_parallel", "sync", "softmax_layout")


def _fusion_attention_setup(ctx, inputs, output):
    args = dict(zip(_arg_names("npu_fusion_attention"), inputs))
    out, softmax_max, softmax_sum, softmax_out, seed, offset, numels = output
    ctx.save_for_backward(*(args[a] for a in _FA_TENSORS), softmax_max, softmax_sum, softmax_out, out, args["sink"])
    ctx.mark_non_differentiable(softmax_max, softmax_sum, softmax_out)
    ctx.kept = {a: args[a] for a in _FA_KEPT} | {"scale_value": args["scale"], "seed": seed, "offset": offset,
                                                 "numels": numels}
    ctx.n_inputs = len(inputs)


def _fusion_attention_backward(ctx, grad_out, *_):
    (query, key, value, pse, padding_mask, atten_mask,
     softmax_max, softmax_sum, softmax_in, out, sink) = ctx.saved_tensors
    kept = dict(ctx.kept)
    head_num, input_layout = kept.pop("head_num"), kept.pop("input_layout")
    dq, dk, dv, dpse, dsink = torch.ops.npu.npu_fusion_attention_grad(
        query, key, value, grad_out.contiguous(), head_num, input_layout, pse=pse, padding_mask=padding_mask,
        atten_mask=atten_mask, softmax_max=softmax_max, softmax_sum=softmax_sum, softmax_in=softmax_in,
        attention_in=out, sink=sink, **kept)
    grads = dict(zip(_arg_names("npu_fusion_attention"), [None] * ctx.n_inputs))
    grads.update(query=dq, key=dk, value=dv, pse=None if pse is None else dpse, sink=None if sink is None else dsink)
    return tuple(grads.values())


_AUTOGRAD = {
    "npu_rms_norm": (_rms_norm_setup, _rms_norm_backward),
    "npu_swiglu": (_swiglu_setup, _swiglu_backward),
    "npu_rotary_mul": (_rotary_mul_setup, _rotary_mul_backward),
    "npu_fusion_attention": (_fusion_attention_setup, _fusion_attention_backward),
}
KERNELS = {f.__name__: f for f in (npu_rms_norm, npu_rms_norm_backward, npu_add_rms_norm, npu_swiglu,
                                   npu_swiglu_backward, npu_rotary_mul, npu_rotary_mul_backward,
                                   npu_fusion_attention, npu_fusion_attention_grad)} | NO_AUTOGRAD_KERNELS | MOE_KERNELS
"""Kernel name -> its CPU emulation (also its fake kernel: the same ops on fake tensors give the shapes)."""
EMULATED = tuple(KERNELS)
"""Every kernel register_npu_kernels defines in torch.ops.npu."""

_lib: torch.library.Library | None = None  # the `npu` namespace's definitions, kept alive for the process


def register_npu_kernels(schemas: Mapping[str, str]) -> None:
    """Define every EMULATED kernel in torch.ops.npu with its wheel schema (`schemas`: kernel name -> schema,
    as graphllm.preflight.wheel.npu_schemas gives them): its emulation for every device but npu, its fake
    kernel, and torch_npu's autograd for the NPU_AUTOGRAD kernels. A second call is a no-op."""
    global _lib
    if "torch_npu" in sys.modules:
        raise GraphllmError("torch_npu is loaded, so torch.ops.npu holds its real kernels: the CPU emulation of "
                            "them is for processes without torch_npu (run the pre-flight in a fresh one)")
    if _lib is not None:
        return
    missing = [name for name in EMULATED if name not in schemas]
    if missing:
        raise GraphllmError(f"the torch_npu schemas given lack {', '.join(missing)}: pass the wheel's npu_schemas()")
    lib = torch.library.Library("npu", "DEF")
    for name in EMULATED:
        lib.define(schemas[name])
        lib.impl(name, KERNELS[name], "CompositeExplicitAutograd")
        torch.library.register_fake(f"npu::{name}", KERNELS[name], lib=lib)
    for name, (setup, backward) in _AUTOGRAD.items():
        torch.library.register_autograd(f"npu::{name}", backward, setup_context=setup, lib=lib)
    _lib = lib
