"""fuse_rms_norm: raise `weight * (x * rsqrt(mean(x², -1, keepdim) + eps))` to graphllm::rms_norm.

Matches the RMSNorm of the Llama family as captured (pow → mean → add eps → rsqrt → mul → [cast] →
mul weight), with an optional fp32 upcast of x in front. Legal because graphllm::rms_norm computes the
same expression in fp32 and casts back to x's dtype before the weight multiply, exactly as the pattern.
"""

import torch
import torch.fx as fx

from graphllm.ops import rms_norm
from graphllm.passes.manager import PassContext, graph_pass
from graphllm.passes.matching import aten, calls_to, commuted, finish, is_call, ndim, norm_dim, replace_with_call, users_within, val


def _match(rsqrt: fx.Node):
    """Return (x_input, weight, eps, anchor) for the norm around `rsqrt`, or None."""
    add = rsqrt.args[0]
    if not is_call(add, aten.add.Tensor, aten.add.Scalar) or len(add.users) != 1:
        return None
    mean, eps = next(((a, b) for a, b in commuted(add) if is_call(a, aten.mean.dim)), (None, None))
    if mean is None or not isinstance(eps, (int, float)):
        return None  # eps must be a compile-time constant to become the op's attribute
    pw = mean.args[0]
    if not is_call(pw, aten.pow.Tensor_Scalar) or pw.args[1] != 2:
        return None
    x = pw.args[0]
    rank = ndim(x)
    dims, keepdim = mean.args[1], (mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False))
    if rank is None or not keepdim or [norm_dim(d, rank) for d in dims] != [rank - 1]:
        return None  # RMSNorm normalises the last dimension only
    # x * rsqrt(...)
    norm = next((u for u in rsqrt.users if is_call(u, aten.mul.Tensor) and x in u.args), None)
    if norm is None or len(rsqrt.users) != 1 or len(norm.users) != 1:
        return None
    tail = next(iter(norm.users))
    cast = None
    if is_call(tail, aten.to.dtype, aten._to_copy.default):
        cast, tail = tail, (next(iter(tail.users)) if len(tail.users) == 1 else None)
    if tail is None or not is_call(tail, aten.mul.Tensor):
        return None
    src = cast or norm
    weight = next((w for s, w in commuted(tail) if s is src), None)
    wv, xv = val(weight), val(x)
    if wv is None or xv is None or wv.dim() != 1 or wv.shape[0] != xv.shape[-1]:
        return None  # only a per-channel weight over the normalised dimension
    if xv.dtype != torch.float32:
        return None  # the op computes in fp32; a lower-precision norm would change numerics
    pattern = [pw, mean, add, rsqrt, norm] + ([cast] if cast else [])
    for n in (pw, mean, add, rsqrt):
        if len(n.users) != 1:
            return None  # an intermediate is used elsewhere: fusing would have to recompute it
    x_in = x
    # an fp32 upcast feeding only this norm is folded in: the op upcasts internally
    if is_call(x, aten.to.dtype, aten._to_copy.default) and users_within(x, pattern):
        x_in = x.args[0]
    out_dtype = val(cast).dtype if cast is not None else xv.dtype
    if val(x_in) is None or val(x_in).dtype != out_dtype:
        return None  # the op casts back to its input's dtype; anything else is another computation
    return x_in, weight, float(eps), tail


@graph_pass("fuse_rms_norm", stage="model")
def fuse_rms_norm(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    replaced = 0
    for node in calls_to(gm, aten.rsqrt.default):
        m = _match(node)
        if m is None:
            continue
        x, weight, eps, anchor = m
        replace_with_call(gm, anchor, rms_norm._opoverload, (x, weight, eps))
        replaced += 1
    return finish(gm, ctx, replaced)
