"""Activation recomputation as an aot_autograd partition policy.

aot_autograd traces one joint forward+backward graph and a partition function splits it into the
forward and backward graphs; whatever forward value the backward needs and the forward does not hand
over must be recomputed in the backward. The policy picks that split:

- none: `default_partition`, today's behaviour (saves every forward value the backward reads).
- full: MindSpeed's `--recompute-granularity full`: the forward ops of each checkpointed decoder layer
  are tagged `MUST_RECOMPUTE` with the layer's group as `ac_graph_id`; the min-cut partitioner's
  `cleanup_recompute_tags` then turns the values that cross into the next group (the layer's output, which
  the next layer's first op reads) into `MUST_SAVE`. Options: `method` "uniform" (groups of `layers`
  layers, `--recompute-method uniform`) or "block" (only the first `layers` layers).
- selective: `MUST_RECOMPUTE` on chosen op kinds (`ops`: attention, activation, norm; MindSpeed's
  `--recompute-activations`, `--recompute-activation-function`, `--recompute-norm`); min-cut decides the rest.
- budget: `min_cut_rematerialization_partition` under `activation_memory_budget = fraction`.

The fused LM-head loss (graphllm::linear_cross_entropy, its vocab-parallel parts, or their decomposition's chunk
loop) is never recomputed: under every policy its forward values that the backward reads — [N]-sized per-token
statistics — are tagged `MUST_SAVE` (`keep_fused_loss`). Its backward already recomputes each vocabulary chunk's
logits itself, so recomputing its forward too would run the whole head's matmul once more to save a few KiB (the
budget policy's knapsack does exactly that at small budgets). It sits after the last layer, so `full` and
`selective` never tag it for recomputation.

Legal because recomputing runs the same ops on the same inputs: losses and gradients are bitwise equal
(tests/test_recompute.py). Layers are found from `nn_module_stack` ("model.layers.<i>..."), which
Dynamo records on every node and aot_autograd carries onto the joint graph's forward nodes.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import re
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from graphllm.planning.recompute_config import RecomputeConfig

logger = logging.getLogger("graphllm")

RECOMPUTE_PASS = "recompute"
"""`graphllm_pass` stamp on backward-graph nodes that recompute forward ops (shown by `graphllm inspect`)."""

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
_OPS_OF_KIND = {
    "attention": ("attention", "varlen_attention", "window_attention", "attention_block",
                  "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
                  "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"),
    "activation": ("swiglu", "silu", "gelu"),
    "norm": ("rms_norm", "add_rms_norm", "_fused_rms_norm", "native_layer_norm"),
}

Partition = Callable[..., tuple[fx.GraphModule, fx.GraphModule]]


def partition_fn_for(cfg: RecomputeConfig) -> Partition:
    """The aot_autograd partition function for the policy (signature of `default_partition`)."""
    from torch._functorch.partitioners import default_partition, min_cut_rematerialization_partition

    if cfg.policy == "none":
        return default_partition

    def partition(joint_module: fx.GraphModule, joint_inputs: Any, *, num_fwd_outputs: int,
                  **kw: Any) -> tuple[fx.GraphModule, fx.GraphModule]:
        tagged = tag_joint_graph(joint_module.graph, cfg)
        with budget_patch(cfg):
            fwd, bwd = min_cut_rematerialization_partition(joint_module, joint_inputs,
                                                           num_fwd_outputs=num_fwd_outputs, **kw)
        logger.info("recompute %s: %d joint nodes tagged", cfg.describe(), tagged)
        return fwd, bwd

    partition.__name__ = f"recompute_{cfg.policy}_partition"
    return partition


def inductor_config_patches(cfg: RecomputeConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(torch._functorch.config, torch._inductor.config) patches that give inductor's own min-cut
    partitioner this policy. compile_fx takes no partition function, but it runs
    `joint_custom_post_pass` on the joint graph right before partitioning."""
    if cfg.policy == "none":
        return {}, {}
    def tag(graph: fx.Graph) -> None:
        tag_joint_graph(graph, cfg)

    if cfg.policy == "budget":
        return {"activation_memory_budget": float(cfg.budget)}, {"joint_custom_post_pass": tag}
    return {}, {"joint_custom_post_pass": tag}


def budget_patch(cfg: RecomputeConfig) -> contextlib.AbstractContextManager:
    """`activation_memory_budget` for the budget policy; nothing otherwise."""
    if cfg.policy != "budget":
        return contextlib.nullcontext()
    return torch._functorch.config.patch(activation_memory_budget=float(cfg.budget))


def tag_joint_graph(graph: fx.Graph, cfg: RecomputeConfig) -> int:
    """Tag the joint graph's forward nodes with CheckpointPolicy for `full` / `selective`, and the fused loss's saved
    statistics for every policy; returns how many."""
    policy = cfg.policy
    if policy == "none":
        return 0
    kept = keep_fused_loss(graph)
    if policy not in ("full", "selective"):
        return kept
    selected = set(cfg.ops or ())
    kinds = {name for k in selected for name in _OPS_OF_KIND[k]}
    forward = [n for n in graph.nodes if n.op == "call_function" and _is_forward(n)]
    layers = _layers(forward)
    count, region, last = 0, -1, None
    for node in forward:
        layer = layers[node]
        if policy == "full":
            if layer is None:
                continue
            n = cfg.layers
            if cfg.method == "block" and layer >= n:
                continue
            group = layer // n if cfg.method == "uniform" else layer
        else:
            if cfg.layers is not None and (layer is None or layer >= cfg.layers):
                continue
            decomposed = _DECOMPOSED_KIND.get(_innermost_function(node))
            if _op_name(node) not in kinds and decomposed not in selected:
                last = None
                continue
            # one region per op: a graphllm op, or the consecutive nodes of one decomposed op
            key = (decomposed, layer) if decomposed else None
            if key is None or key != last:
                region += 1
            last, group = key, region
        node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
        node.meta["ac_graph_id"] = group
        count += 1
    count += kept
    if policy == "selective":
        # multi-output ops (add_rms_norm) are read through getitem: tag those with their op
        for node in graph.nodes:
            if node.op == "call_function" and node.target is _getitem() and node.args[0].meta.get("ac_graph_id") is not None \
                    and "recompute" in node.args[0].meta:
                node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
                node.meta["ac_graph_id"] = node.args[0].meta["ac_graph_id"]
    return count


_FUSED_LOSS_OPS = ("linear_cross_entropy", "linear_cross_entropy_parts")
_FUSED_LOSS_FUNCTIONS = ("parts_forward",)
"""The fused loss's forward: the ops (eager backend) and its decomposition's chunk loop (ops/linear_cross_entropy.py)."""


_PASS_THROUGH = (torch.ops.aten.detach.default, torch.ops.aten.alias.default, torch.ops.aten.view.default,
                 operator.getitem)


def keep_fused_loss(graph: fx.Graph) -> int:
    """MUST_SAVE on the fused LM-head loss's forward values the backward reads; returns how many."""
    n = 0
    for node in graph.nodes:
        if node.op != "call_function" or not _is_forward(node) or not any(_is_backward(u) for u in node.users):
            continue
        source = node
        while source.target in _PASS_THROUGH and isinstance(source.args[0], fx.Node):
            source = source.args[0]  # autograd saves an output through detach; a multi-output op's through getitem
        if _op_name(source) in _FUSED_LOSS_OPS or _innermost_function(source) in _FUSED_LOSS_FUNCTIONS:
            node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
            n += 1
    return n


def _layers(forward: list[fx.Node]) -> dict[fx.Node, int | None]:
    """Each forward node's decoder layer. Nodes traced inside a lowered op's decomposition (inductor's
    table: rms_norm, swiglu, rope, attention as ATen ops) carry no nn_module_stack; they sit right before
    the next node that has one, in the same module (the trace runs one op's decomposition, then moves on),
    so they take that node's layer."""
    out: dict[fx.Node, int | None] = {}
    pending: list[fx.Node] = []
    for node in forward:
        if not node.meta.get("nn_module_stack"):
            pending.append(node)
            continue
        out[node] = _layer_of(node)
        for p in pending:
            out[p] = out[node]
        pending.clear()
    for p in pending:
        out[p] = None
    return out


_FRAME = re.compile(r'File "[^"]+", line \d+, in (\w+)')
_DECOMPOSED_KIND = {"rms_norm_decomposed": "norm", "add_rms_norm_decomposed": "norm",
                    "swiglu_decomposed": "activation", "attention_decomposed": "attention",
                    "varlen_attention_decomposed": "attention", "window_attention_decomposed": "attention"}
"""The lowering functions of graphllm ops (ops/*.py) → the selective kind their nodes belong to."""


def _innermost_function(node: fx.Node) -> str | None:
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    return frames[-1] if frames else None


def mark_recomputed(backward: fx.GraphModule) -> int:
    """Stamp the backward graph's recomputed forward ops with graphllm_pass="recompute"; returns how many."""
    from graphllm.passes.manager import PASS_META_KEY

    n = 0
    for node in backward.graph.nodes:
        if node.op == "call_function" and _is_forward(node):
            node.meta[PASS_META_KEY] = RECOMPUTE_PASS
            n += 1
    return n


def recomputed_nodes(backward: fx.GraphModule) -> int:
    """How many of a backward graph's ops recompute forward ops (stamped by `mark_recomputed`)."""
    from graphllm.passes.manager import PASS_META_KEY

    return sum(1 for n in backward.graph.nodes if n.meta.get(PASS_META_KEY) == RECOMPUTE_PASS)


def _is_forward(node: fx.Node) -> bool:
    return node.meta.get("partitioner_tag") == "is_forward"


def _is_backward(node: fx.Node) -> bool:
    return node.meta.get("partitioner_tag") == "is_backward"


def _layer_of(node: fx.Node) -> int | None:
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        m = _LAYER.search(path)
        if m:
            return int(m.group(1))
    return None


def _op_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    return getattr(target, "__name__", str(target))


def _getitem():
    import operator

    return operator.getitem
