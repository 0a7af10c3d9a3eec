"""fuse_swiglu: raise `silu(gate) * up` to graphllm::swiglu.

Legal because the op computes exactly silu(gate) * up. Fires only when the silu result has no other
user (else the fused op would not remove it) and gate and up have the same shape (the NPU kernel
takes both halves of one tensor, so no broadcasting).
"""

import torch.fx as fx

from graphllm.ops import swiglu
from graphllm.passes.manager import PassContext, graph_pass
from graphllm.passes.matching import aten, calls_to, commuted, finish, is_call, replace_with_call, val


@graph_pass("fuse_swiglu", stage="model")
def fuse_swiglu(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    replaced = 0
    for node in calls_to(gm, aten.mul.Tensor):
        for silu, up in commuted(node):
            if not is_call(silu, aten.silu.default) or len(silu.users) != 1:
                continue
            gate = silu.args[0]
            gv, uv = val(gate), val(up)
            if gv is None or uv is None or gv.shape != uv.shape or gv.dtype != uv.dtype:
                continue  # broadcasting or mixed dtypes: not the gated-MLP form the kernel implements
            replace_with_call(gm, node, swiglu._opoverload, (gate, up))
            replaced += 1
            break
    return finish(gm, ctx, replaced)
