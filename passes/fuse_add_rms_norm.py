"""fuse_add_rms_norm: raise `rms_norm(a + b)` to graphllm::add_rms_norm(a, b) -> (normed, a + b).

In a pre-norm decoder every norm but the first reads a residual add whose sum also feeds the next
residual add; the fused op computes the sum once and returns it as its second output, which replaces
the add for its other users. Legal because the op returns exactly (rms_norm(a + b), a + b). Fires only
on a plain add of two same-shape, same-dtype tensors (no alpha, no broadcasting: the NPU kernel adds
elementwise), after fuse_rms_norm has raised the norm.
"""

import operator

import torch.fx as fx

from graphllm.ops import add_rms_norm, rms_norm
from graphllm.passes.manager import PassContext, graph_pass
from graphllm.passes.matching import aten, calls_to, finish, is_call, val


@graph_pass("fuse_add_rms_norm", stage="model")
def fuse_add_rms_norm(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    replaced = 0
    for norm in calls_to(gm, rms_norm._opoverload):
        add = norm.args[0]
        if not is_call(add, aten.add.Tensor) or len(add.args) != 2 or add.kwargs:
            continue  # alpha-scaled adds are another computation
        a, b = add.args
        av, bv = val(a), val(b)
        if av is None or bv is None or av.shape != bv.shape or av.dtype != bv.dtype:
            continue
        with gm.graph.inserting_before(norm):
            fused = gm.graph.call_function(add_rms_norm._opoverload, (a, b, *norm.args[1:]))
            normed = gm.graph.call_function(operator.getitem, (fused, 0))
            summed = gm.graph.call_function(operator.getitem, (fused, 1))
        fused.meta["val"] = (norm.meta.get("val"), add.meta.get("val"))
        for node, src in ((fused, norm), (normed, norm), (summed, add)):
            node.meta.update({k: src.meta[k] for k in ("stack_trace", "nn_module_stack") if k in src.meta})
        normed.meta["val"], summed.meta["val"] = norm.meta.get("val"), add.meta.get("val")
        norm.replace_all_uses_with(normed)
        add.replace_all_uses_with(summed)
        gm.graph.erase_node(norm)
        gm.graph.erase_node(add)
        replaced += 1
    return finish(gm, ctx, replaced)
