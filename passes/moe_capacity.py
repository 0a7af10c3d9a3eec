"""moe_capacity: at most C token-expert pairs per expert and micro-batch (--moe-capacity-factor F).

C = ceil(F · T · k / E) for a rank's T tokens routed to k of E experts each (graphllm.planning.moe_config).
Before each graphllm::moe_permute the pass inserts, in plain ATen ops on the [T, k] expert ids:

    position[p] = how many earlier pairs (token order: p = t·k + j) chose the same expert
                = (cumsum(onehot, 0) · onehot).sum(-1) - 1, onehot = (ids[:, None] == arange(E))
    ids'        = where(position < C, ids, E)

and the permutation reads ids'. The id E is no expert: moe_permute sorts such pairs into its tail, which
the grouped matmuls leave zero and moe_unpermute adds as nothing, so a dropped pair costs no expert compute
and its token keeps its other experts' outputs and the residual (Megatron's "position" drop policy,
without padding the experts to C rows). The router, its probabilities and the load-balancing loss see the
routing before the drop, as in Megatron. Expert parallelism (passes/expert_parallel.py) runs after this
pass, so capacity is counted on the rank's own tokens, whatever --ep is: ep2 drops the pairs dp2 drops.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphllm.passes.graph_edit import emit
from graphllm.passes.manager import PassContext, graph_pass
from graphllm.passes.matching import is_call
from graphllm.passes.shapes import repropagate
from graphllm.planning.moe_config import MoeConfig

aten = torch.ops.aten
_PERMUTE = torch.ops.graphllm.moe_permute.default


@graph_pass("moe_capacity", stage="model")
def moe_capacity(gm: fx.GraphModule, ctx: PassContext, *, capacity_factor: float) -> fx.GraphModule:
    moe = MoeConfig(capacity_factor=capacity_factor)
    for permute in [n for n in gm.graph.nodes if is_call(n, _PERMUTE)]:
        x, ids, first, num = permute.args
        tokens, k = ids.meta["val"].shape
        experts = first + num
        cap = moe.capacity(tokens, k, experts)
        with gm.graph.inserting_before(permute):
            def op(target, *args, **kwargs):
                return emit(gm, target, args, permute, "capacity", kwargs)

            flat = op(aten.view.default, ids, [-1])  # [T·k], token-major
            arange = op(aten.arange.default, experts, dtype=torch.long, device=ids.meta["val"].device)
            onehot = op(aten._to_copy.default, op(aten.eq.Tensor, op(aten.unsqueeze.default, flat, 1), arange),
                        dtype=torch.long)  # [T·k, E]; not one_hot, which asserts (no GE converter)
            seen = op(aten.sum.dim_IntList, op(aten.mul.Tensor, op(aten.cumsum.default, onehot, 0), onehot), [-1])
            keep = op(aten.le.Scalar, seen, cap)  # seen = position + 1
            kept = op(aten.view.default, op(aten.where.ScalarOther, keep, flat, experts), [tokens, k])
        permute.args = (x, kept, first, num)
        ctx.count("MoE layers")
        ctx.count(f"capacity {cap} of {tokens * k} pairs")
    repropagate(gm, {})
    gm.recompile()
    return gm
