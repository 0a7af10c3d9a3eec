"""lower_ops: replace graphllm op calls by the backend's lowering (its entry in ops.lowering).

The compile step appends this pass after the user-visible pipeline, bound to the chosen backend's
table, so every user pass still sees graphllm ops. A lowering is the op's own reference math in plain
PyTorch, so results are unchanged up to the backend's reduction order.
"""

from typing import Callable, Mapping

import torch.fx as fx

from graphllm.passes.manager import PassContext, graph_pass


@graph_pass("lower_ops", stage="model")
def lower_ops(gm: fx.GraphModule, ctx: PassContext, *, table: Mapping[object, Callable] = {}) -> fx.GraphModule:
    lowered = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in table:
            node.target = table[node.target]
            lowered += 1
    if lowered:
        ctx.count("lowered", lowered)
        ctx.logger.info("lower_ops: lowered %d op calls", lowered)
        gm.recompile()
    return gm
