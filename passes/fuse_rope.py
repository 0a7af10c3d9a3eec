"""fuse_rope: raise `x * cos + rotate_half(x) * sin` to graphllm::rope.

rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2]) on the last dimension, as in the Llama family.
Legal because the op computes that expression; it fires only when both halves are exactly D/2, the
concatenation is on the last dimension, cos and sin broadcast to x, and no intermediate has another user.
"""

import torch
import torch.fx as fx

from graphllm.ops import rope
from graphllm.passes.manager import PassContext, graph_pass
from graphllm.passes.matching import aten, calls_to, commuted, finish, is_call, norm_dim, replace_with_call, val

_END = 2**62  # slicing "to the end" is captured as a huge end index


def _rotate_half_source(cat: fx.Node) -> fx.Node | None:
    """If `cat` is rotate_half(x) return x."""
    if not is_call(cat, aten.cat.default):
        return None
    parts, dim = cat.args[0], (cat.args[1] if len(cat.args) > 1 else 0)
    if len(parts) != 2:
        return None
    neg, low = parts
    if not is_call(neg, aten.neg.default) or not is_call(low, aten.slice.Tensor):
        return None
    high = neg.args[0]
    if not is_call(high, aten.slice.Tensor) or high.args[0] is not low.args[0]:
        return None
    x = low.args[0]
    xv = val(x)
    if xv is None:
        return None
    rank, d = xv.dim(), xv.shape[-1]
    half = d // 2
    if d % 2 or norm_dim(dim, rank) != rank - 1:
        return None

    def bounds(s: fx.Node):
        args = list(s.args) + [None] * (4 - len(s.args))
        return norm_dim(args[1] if args[1] is not None else 0, rank), args[2] or 0, args[3]

    hd, hs, he = bounds(high)
    ld, ls, le = bounds(low)
    if (hd, ld) != (rank - 1, rank - 1) or (hs, ls) != (half, 0) or le != half:
        return None
    if he is not None and not (he == d or he >= _END):
        return None
    if len(neg.users) != 1 or len(high.users) != 1 or len(low.users) != 1:
        return None
    return x


@graph_pass("fuse_rope", stage="model")
def fuse_rope(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    replaced = 0
    for node in calls_to(gm, aten.add.Tensor):
        for m_cos, m_sin in commuted(node):
            if not (is_call(m_cos, aten.mul.Tensor) and is_call(m_sin, aten.mul.Tensor)):
                continue
            found = None
            for rot, sin in commuted(m_sin):
                x = _rotate_half_source(rot)
                if x is None or x not in m_cos.args:
                    continue
                cos = m_cos.args[1] if m_cos.args[0] is x else m_cos.args[0]
                found = (x, cos, sin, rot)
                break
            if found is None:
                continue
            x, cos, sin, rot = found
            xv, cv, sv = val(x), val(cos), val(sin)
            if not all(isinstance(t, torch.Tensor) for t in (xv, cv, sv)):
                continue  # cos/sin must be tensors; scalars are a different rotation
            try:
                if torch.broadcast_shapes(xv.shape, cv.shape, sv.shape) != xv.shape:
                    continue  # cos/sin would enlarge x: not a rotation of x
            except RuntimeError:
                continue
            if len(m_cos.users) != 1 or len(m_sin.users) != 1 or len(rot.users) != 1:
                continue
            replace_with_call(gm, node, rope._opoverload, (x, cos, sin))
            replaced += 1
            break
    return finish(gm, ctx, replaced)
