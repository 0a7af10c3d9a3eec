"""pair_rope: a layer's two graphllm::rope calls (q and k, same cos/sin) → one graphllm::rope_qk.

For inference graphs on the NPU: rope_qk lowers to `npu_apply_rotary_pos_emb`, which rotates query and
key in one kernel (torch_npu documents it as an inference op with no backward); in training, or where
the kernel's limits are not met, it lowers to two `npu_rotary_mul`, and elsewhere to its decomposition,
so the pass changes no arithmetic. Pairs are consecutive rope calls with the same cos and sin in one
module (`nn_module_stack`), the q and k rotations of one attention layer. Not in the default pipeline:
generation pipelines add it.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from graphllm.passes.graph_edit import emit
from graphllm.passes.manager import PassContext, graph_pass
from graphllm.passes.matching import calls_to

gl = torch.ops.graphllm


def _module(n: fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


@graph_pass("pair_rope")
def pair_rope(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    ropes = calls_to(gm, gl.rope.default)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    paired, i = 0, 0
    while i + 1 < len(ropes):
        a, b = ropes[i], ropes[i + 1]
        if a.args[1:] != b.args[1:] or _module(a) != _module(b) or any(order[u] < order[b] for u in a.users):
            i += 1
            continue
        with gm.graph.inserting_before(b):  # both inputs exist here, and a's users all come later
            both = emit(gm, gl.rope_qk.default, (a.args[0], b.args[0], *a.args[1:]), a)
            outs = [emit(gm, operator.getitem, (both, j), n) for j, n in enumerate((a, b))]
        both.meta["val"] = (a.meta["val"], b.meta["val"])
        for n, out in zip((a, b), outs):
            out.meta["val"] = n.meta["val"]
        a.replace_all_uses_with(outs[0])
        b.replace_all_uses_with(outs[1])
        gm.graph.erase_node(a)
        gm.graph.erase_node(b)
        paired += 1
        i += 2
    ctx.count("paired", paired)
    gm.graph.lint()
    gm.recompile()
    return gm
