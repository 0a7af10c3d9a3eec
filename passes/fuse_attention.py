"""fuse_attention: raise scaled-dot-product attention to graphllm::attention (causal, GQA).

Two captured forms are recognised:
- SDPA: `scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0, is_causal, scale, enable_gqa)`;
- eager: `matmul(softmax(matmul(q, kᵀ) * scale + mask, -1), v)` where `mask` is a compile-time
  constant equal to the causal mask (0 on and below the diagonal, a value that underflows softmax to
  exactly 0 above it), and k, v may come from HF's repeat_kv (expand + reshape), which is folded back
  into grouped-query form.
Legal because the op computes softmax(q kᵀ · scale + causal) v with each kv head serving H/Hkv
consecutive query heads, which is what both forms compute.
- packed rows: SDPA whose boolean mask is `(seg[:, None, :, None] == seg[:, None, None, :]) & tril(ones)`
  (models/llama.py packed_causal_mask; seg [B, S] = which sample each token is in) →
  graphllm.varlen_attention(q, k, v, seg, scale), the same block-diagonal causal attention.
- sliding window: SDPA with a compile-time constant boolean mask (True = visible), or the eager form with a
  constant additive mask or `masked_fill(~mask, very negative)`, whose visible keys are exactly
  i - W < j <= i for one W (models/masks.py builds it for Mistral's and Gemma's local layers) →
  graphllm.window_attention(q, k, v, scale, W); a band that covers the whole sequence is plain causal
  attention. Refused: dropout (changes RNG use), masks that are inputs or of any other pattern (the ops have
no arbitrary mask; packed rows with a window stay SDPA), soft-capped scores, and inputs that are not 4-D BNSD.
"""

import torch
import torch.fx as fx

from graphllm.ops import attention, varlen_attention, window_attention
from graphllm.passes.manager import PassContext, graph_pass
from graphllm.passes.matching import aten, arg, constant_value, finish, is_call, norm_dim, replace_with_call, val

MASKED_MAX = -1e30  # a mask entry ≤ this added to any finite fp32/bf16 score makes exp() exactly 0


def _bnsd(q, k, v) -> bool:
    qv, kv, vv = val(q), val(k), val(v)
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (qv, kv, vv)):
        return False
    return qv.shape[1] % kv.shape[1] == 0 and kv.shape == vv.shape[:3] + kv.shape[3:] and qv.shape[-1] == kv.shape[-1]


def _sdpa(node: fx.Node):
    q, k, v = node.args[:3]
    mask = arg(node, 3, "attn_mask")
    dropout = arg(node, 4, "dropout_p", 0.0)
    causal = arg(node, 5, "is_causal", False)
    scale = node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)
    scale = float(scale if scale is not None else val(q).shape[-1] ** -0.5) if _bnsd(q, k, v) else None
    if mask is not None and not causal and dropout == 0.0 and scale is not None:
        if val(q).shape[2] != val(k).shape[2]:
            return None  # the ops are defined for square attention
        keep = constant_value(node.graph.owning_module, mask) if isinstance(mask, fx.Node) else None
        if keep is not None and keep.dtype == torch.bool:
            return _causal_or_window(q, k, v, scale, window_of(keep, val(q).shape[2]))
        seg = _segment_ids(mask)
        if seg is None or val(seg).shape != (val(q).shape[0], val(q).shape[2]):
            return None  # another mask
        return varlen_attention, (q, k, v, seg, scale)
    if mask is not None or dropout != 0.0 or scale is None:
        return None
    if causal and val(q).shape[2] != val(k).shape[2]:
        return None  # SDPA's causal mask is top-left aligned; the op is defined for square attention
    return attention, (q, k, v, scale, bool(causal))


def _causal_or_window(q, k, v, scale: float, window: int | None):
    if window is None:
        return None
    if window >= val(q).shape[2]:
        return attention, (q, k, v, scale, True)  # the band holds every earlier key: plain causal attention
    return window_attention, (q, k, v, scale, window)


def window_of(keep: torch.Tensor, s: int) -> int | None:
    """W when the boolean mask `keep` (True = visible, any leading dims of size 1) is exactly the causal band
    i - W < j <= i over [s, s], else None."""
    if keep.numel() != s * s or tuple(keep.shape[-2:]) != (s, s):
        return None
    keep = keep.reshape(s, s)
    first = keep.to(torch.int64).argmax(-1)  # each query's first visible key
    window = int(s - first[-1].item())
    i = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]
    want = (j <= i) & (i - j < window)
    return window if window > 0 and bool(torch.equal(keep, want)) else None


def _unsqueezed(x: fx.Node) -> fx.Node:
    while is_call(x, aten.unsqueeze.default) or (is_call(x, aten.slice.Tensor) and val(x).shape == val(x.args[0]).shape):
        x = x.args[0]
    return x


def _segment_ids(mask: fx.Node) -> fx.Node | None:
    """`(seg[:, None, :, None] == seg[:, None, None, :]) & tril(ones(S, S))` → seg, else None."""
    if not is_call(mask, aten.__and__.Tensor, aten.bitwise_and.Tensor, aten.logical_and.default):
        return None
    same, tri = mask.args[:2]
    if not is_call(same, aten.eq.Tensor):
        same, tri = tri, same
    if not is_call(same, aten.eq.Tensor):
        return None
    rows, cols = same.args[:2]
    seg = _unsqueezed(rows)
    sv, rv, cv = val(seg), val(rows), val(cols)
    if seg is not _unsqueezed(cols) or sv is None or sv.dim() != 2 or sv.dtype.is_floating_point:
        return None
    B, S = sv.shape
    if tuple(rv.shape) != (B, 1, S, 1) or tuple(cv.shape) != (B, 1, 1, S):
        return None  # the transposed comparison would be the same mask, but only this form is produced
    # tril(ones) is folded only later (fold_constants), so evaluate it here
    tv = constant_value(tri.graph.owning_module, tri) if isinstance(tri, fx.Node) else None
    if tv is None or tv.dtype != torch.bool or tuple(tv.shape) != (S, S):
        return None
    if not bool((tv == torch.ones(S, S, dtype=torch.bool).tril()).all()):
        return None
    return seg


def _unrepeat_kv(x: fx.Node) -> fx.Node:
    """HF repeat_kv: x[:, :, None].expand(B, Hkv, n, S, D).reshape(B, Hkv*n, S, D) → x."""
    if not is_call(x, aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        return x
    exp = x.args[0]
    if not is_call(exp, aten.expand.default) or len(exp.users) != 1:
        return x
    src = exp.args[0]
    while is_call(src, aten.slice.Tensor) and val(src).shape == val(src.args[0]).shape:
        src = src.args[0]  # x[:, :] no-op slices around the new axis
    if not is_call(src, aten.unsqueeze.default) or norm_dim(src.args[1], 5) != 2:
        return x
    base = src.args[0]
    while is_call(base, aten.slice.Tensor) and val(base).shape == val(base.args[0]).shape:
        base = base.args[0]
    bv, ev = val(base), val(exp)
    if bv is None or bv.dim() != 4 or ev.dim() != 5 or tuple(ev.shape[:2]) != tuple(bv.shape[:2]):
        return x
    return base


def _additive_keep(mask: torch.Tensor) -> torch.Tensor | None:
    """An additive mask (0 = visible, ≤ MASKED_MAX = masked) as a boolean keep-mask; None for other values."""
    m = mask.to(torch.float32)
    keep = m == 0
    return keep if bool((keep | (m <= MASKED_MAX)).all()) else None


def _eager(gm: fx.GraphModule, out: fx.Node):
    """out = matmul(probs, v); return the op arguments and the pattern's interior, or None."""
    probs, v = out.args[:2]
    if is_call(probs, aten.to.dtype, aten._to_copy.default):
        probs = probs.args[0]
    if not is_call(probs, aten.softmax.int, aten._softmax.default) or len(probs.users) != 1:
        return None
    if norm_dim(probs.args[1], 4) != 3:
        return None
    scores = probs.args[0]
    mask_node, filled = None, False
    if is_call(scores, aten.add.Tensor):
        a, b = scores.args[:2]
        scores, mask_node = (a, b) if is_call(a, aten.mul.Tensor, aten.div.Tensor, aten.matmul.default) else (b, a)
    elif is_call(scores, aten.masked_fill.Scalar) and isinstance(scores.args[2], (int, float)) \
            and scores.args[2] <= MASKED_MAX:
        scores, mask_node, filled = scores.args[0], scores.args[1], True
    scale = 1.0
    if is_call(scores, aten.mul.Tensor) and isinstance(scores.args[1], (int, float)):
        scores, scale = scores.args[0], float(scores.args[1])
    elif is_call(scores, aten.div.Tensor) and isinstance(scores.args[1], (int, float)):
        scores, scale = scores.args[0], 1.0 / float(scores.args[1])
    if not is_call(scores, aten.matmul.default):
        return None
    q, kt = scores.args[:2]
    if not is_call(kt, aten.transpose.int) or {norm_dim(d, 4) for d in kt.args[1:3]} != {2, 3}:
        return None
    k = kt.args[0]
    if not _bnsd(q, k, v):
        return None
    k, v = _unrepeat_kv(k), _unrepeat_kv(v)
    if not _bnsd(q, k, v):
        return None
    if mask_node is None:
        return attention, (q, k, v, scale, False)
    mask = constant_value(gm, mask_node)
    if mask is None or val(k).shape[2] != val(q).shape[2]:
        return None  # only a constant mask over square scores (Sq=1 < Sk: [[0]] masks nothing)
    keep = ~mask.to(torch.bool) if filled else _additive_keep(mask)
    return _causal_or_window(q, k, v, scale, None if keep is None else window_of(keep, val(q).shape[2]))


@graph_pass("fuse_attention", stage="model")
def fuse_attention(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    replaced = 0
    for node in list(gm.graph.nodes):
        if is_call(node, aten.scaled_dot_product_attention.default):
            m = _sdpa(node)
        elif is_call(node, aten.matmul.default):
            m = _eager(gm, node)
        else:
            continue
        if m is None:
            continue
        op, args = m
        replace_with_call(gm, node, op._opoverload, args)
        replaced += 1
    return finish(gm, ctx, replaced)
