"""lower_ops: replace graphllm op calls by the backend's lowering (its table in ops/lowering.py).

The pipeline runs this step after every model pass, bound to the chosen backend's table (`lowering`:
"eager", "decompose" or "npu"), so every user pass still sees graphllm ops. A lowering is the op's own
reference math in plain PyTorch, or the device kernel that computes it, so results are unchanged up to
the backend's reduction order.
"""

import torch.fx as fx

from graphllm.ops.lowering import lowering_table
from graphllm.passes.manager import PassContext, graph_pass


@graph_pass("lower_ops", stage="model")
def lower_ops(gm: fx.GraphModule, ctx: PassContext, *, lowering: str = "eager") -> fx.GraphModule:
    table = lowering_table(lowering)
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
