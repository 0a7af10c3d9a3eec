"""quantize_base: keep each LoRA layer's frozen base weight in NF4 and dequantise it where it is read (QLoRA).

For every graphllm.lora_linear whose base weight (argument 1) is a frozen Parameter read by a get_attr:

    lora_linear(x, W, ...)  ->  lora_linear(x, nf4_dequantize(codes, qscales, scales2, offset, pairs, qmap,
                                                                shape, dtype), ...)

W is quantised once, here (ops/nf4.py: blocks of 64, double-quantised scales, 0.516 byte a weight), and the
Parameter is deleted from the graph module; four non-persistent buffers take its place on the same module
(`<module>.weight_nf4_codes|qscales|scales2|offset`) and the two code books sit once on the root
(`nf4_code_pairs`, `nf4_qmap`). `release_quantized_base(model, gm)`, called by the compile step after the model
passes, does the same to the model, so nothing holds the full-precision weight. Non-persistent: checkpoints
carry the adapters, not the base, which every rebuild re-derives bit for bit from `--model` (quantisation is
deterministic). Graphs that quantise the same Parameter share its buffers (`_quantized`): DPO's reference under
QLoRA (passes/lora.py `adapters_off`) reads the policy's NF4 base.

The dequantised weight is what lora_linear saves for its backward (dx = g W); saved, every layer's whole weight
would stay alive from the forward to the backward. The dequantise node is tagged `recompute = MUST_RECOMPUTE`:
Dynamo keeps the tag of a node it re-traces from a GraphModule, aot_autograd copies it to the joint graph, and
both partitioners (min-cut, and default_partition since torch 2.5) then recompute the weight from the NF4
buffers in the backward instead of saving it (eager backend: the op is kept). Inductor and the NPU lower it to its
decomposition inside a checkpoint region (ops/nf4.py `nf4_dequantize_recomputed`), tagged alike by aot_autograd.
`tag_dequantized_weights` extends the tag, on a joint graph, to the dtype casts and views of the weight that other
ops make (F.linear's transpose, autocast's bf16 copy): default_partition saves those otherwise.

Under tensor parallelism it runs after tensor_parallel, which shards Parameters by name: each rank quantises its
own shard (the double quantisation's offset and groups are then per shard; docs/qlora.md).

Legal as QLoRA is: the base changes by NF4 rounding (`changes_numerics`); the model then trains as LoRA on that
base, and a QLoRA step equals a LoRA step on the dequantised weights up to reduction order.
Skipped (counted): weights read by anything else as well (quantising them would change those readers too).
"""

from __future__ import annotations

import re
import weakref
from typing import Callable

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._functorch.partitioners import must_recompute
from torch.utils.checkpoint import CheckpointPolicy

from graphllm.errors import GraphllmError
from graphllm.ops.lora import lora_linear
from graphllm.ops.nf4 import (NF4Weight, code_pairs, dynamic_map, nf4_dequantize, nf4_dequantize_decomposed,
                              quantize_nf4)
from graphllm.passes.graph_edit import PROVENANCE_KEYS, get_attr_value
from graphllm.passes.manager import PassContext, graph_pass
from graphllm.passes.matching import is_call

SUFFIX = "_nf4_"
"""Buffers of a quantised `weight` are `weight_nf4_codes`, `weight_nf4_qscales`, ... on its module."""
CODE_BOOKS = {"nf4_code_pairs": code_pairs, "nf4_qmap": dynamic_map}
"""Root buffers shared by every dequantise node: name -> how to build it."""
_WEIGHT_ARG = 1  # lora_linear(x, weight, bias, A, B, ...)
_CARRIERS = (torch.ops.aten._to_copy.default, torch.ops.aten.t.default, torch.ops.aten.transpose.int,
             torch.ops.aten.permute.default, torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default,
             torch.ops.aten.expand.default, torch.ops.aten.alias.default, torch.ops.aten.detach.default,
             torch.ops.prims.convert_element_type.default)
"""Ops that only re-type or re-view their first input: a saved result of one still holds the whole weight."""
_TP_OPS = (torch.ops.graphllm.tp_copy.default, torch.ops.graphllm.tp_reduce.default)


_QUANTIZED: dict[int, tuple[weakref.ref, NF4Weight]] = {}
"""Parameter id -> its NF4 form, while the Parameter lives: the graphs that quantise one Parameter share its
buffers (DPO's reference under QLoRA and the policy: one NF4 copy, not two)."""


def _quantized(weight: torch.nn.Parameter) -> NF4Weight:
    hit = _QUANTIZED.get(id(weight))
    if hit is not None and hit[0]() is weight:
        return hit[1]
    q = quantize_nf4(weight)
    _QUANTIZED[id(weight)] = (weakref.ref(weight), q)
    weakref.finalize(weight, _QUANTIZED.pop, id(weight), None)
    return q


def _owner(gm: fx.GraphModule, target: str) -> tuple[torch.nn.Module, str]:
    owner_name, _, attr = target.rpartition(".")
    return (gm.get_submodule(owner_name) if owner_name else gm), attr


def _read(gm: fx.GraphModule, before: fx.Node, target: str, value: torch.Tensor, mode, like: fx.Node) -> fx.Node:
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(target)
    node.meta["val"] = mode.from_tensor(value, static_shapes=True)
    for key in PROVENANCE_KEYS:
        if key in like.meta:
            node.meta[key] = like.meta[key]
    return node


def _quantizable(gm: fx.GraphModule, weight: fx.Node) -> bool:
    """A frozen floating-point 2-D Parameter read only as the base of lora ops."""
    if weight.op != "get_attr":
        return False
    value = get_attr_value(gm, weight.target)
    return (isinstance(value, torch.nn.Parameter) and not value.requires_grad and value.dim() == 2
            and value.is_floating_point()
            and all(is_call(u, lora_linear._opoverload) and u.args[_WEIGHT_ARG] is weight
                    and weight not in u.args[_WEIGHT_ARG + 1:] for u in weight.users))


def _code_books(gm: fx.GraphModule, device: torch.device, mode, first: fx.Node) -> dict[str, fx.Node]:
    nodes = {}
    for name, build in CODE_BOOKS.items():
        if not hasattr(gm, name):
            gm.register_buffer(name, build().to(device), persistent=False)
        nodes[name] = _read(gm, first, name, getattr(gm, name), mode, first)
    return nodes


def _replace(gm: fx.GraphModule, weight: fx.Node, books: dict[str, fx.Node], mode) -> NF4Weight:
    """Quantise `weight`'s Parameter into buffers beside it and feed its lora ops a dequantise node each."""
    owner, attr = _owner(gm, weight.target)
    q = _quantized(get_attr_value(gm, weight.target))
    delattr(owner, attr)  # the graph module no longer holds the full-precision weight
    for name in NF4Weight.BUFFERS:
        owner.register_buffer(f"{attr}{SUFFIX}{name}", getattr(q, name), persistent=False)
    for lin in list(weight.users):
        reads = [_read(gm, lin, f"{weight.target}{SUFFIX}{name}", getattr(q, name), mode, lin)
                 for name in NF4Weight.BUFFERS]
        with gm.graph.inserting_before(lin):
            deq = gm.graph.call_function(nf4_dequantize._opoverload, (*reads, books["nf4_code_pairs"],
                                                                      books["nf4_qmap"], list(q.shape), q.dtype))
        with mode:
            deq.meta["val"] = torch.empty(q.shape, dtype=q.dtype, device=weight.meta["val"].device)
        for key in PROVENANCE_KEYS:
            if key in lin.meta:
                deq.meta[key] = lin.meta[key]
        deq.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE  # regenerated in the backward, never saved
        lin.replace_input_with(weight, deq)
    gm.graph.erase_node(weight)
    return q


@graph_pass("quantize_base", stage="model", after=("lora",), changes_numerics=True)
def quantize_base(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    lora_ops = [n for n in gm.graph.nodes if is_call(n, lora_linear._opoverload)]
    if not lora_ops:
        raise GraphllmError("--qlora quantises the base weights under LoRA adapters, but the graph has none: "
                            "give --lora-rank > 0 and --lora-target names of the model's linear layers")
    if ctx.layout.tp > 1 and not any(is_call(n, *_TP_OPS) for n in gm.graph.nodes):
        # tensor_parallel shards Parameters by name: run first, it would leave a quantised base whole
        raise RuntimeError("quantize_base must run after tensor_parallel (each rank quantises its own shard)")
    weights = list(dict.fromkeys(n.args[_WEIGHT_ARG] for n in lora_ops if isinstance(n.args[_WEIGHT_ARG], fx.Node)))
    chosen = [w for w in weights if _quantizable(gm, w)]
    mode = detect_fake_mode([n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)])
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    books = _code_books(gm, get_attr_value(gm, chosen[0].target).device, mode, first) if chosen else {}
    params = stored = 0
    for weight in chosen:
        params += weight.meta["val"].numel()
        stored += _replace(gm, weight, books, mode).nbytes
    ctx.count("quantized weights", len(chosen))
    ctx.count("kept in full precision (read elsewhere too)", len(weights) - len(chosen))
    ctx.count("NF4 bytes per 1000 base parameters", round(1000 * stored / max(params, 1)))
    ctx.logger.info("quantize_base: %d base weights in NF4 (%d parameters, %d bytes)", len(chosen), params, stored)
    gm.graph.lint()
    gm.recompile()
    return gm


def quantized_base_names(gm: fx.GraphModule) -> list[str]:
    """Fully-qualified names of the weights `quantize_base` replaced (the owners of `*_nf4_codes` buffers)."""
    tail = f"{SUFFIX}codes"
    return [name[: -len(tail)] for name, _ in gm.named_buffers() if name.endswith(tail)]


def release_quantized_base(model: torch.nn.Module, gm: fx.GraphModule) -> int:
    """Make `model` match the graph after quantize_base: each quantised weight's Parameter deleted from it, the NF4
    buffers and code books registered on it (non-persistent). Returns how many Parameters were released."""
    released = 0
    for name in quantized_base_names(gm):
        owner_name, _, attr = name.rpartition(".")
        try:
            owner = model.get_submodule(owner_name) if owner_name else model
        except AttributeError:
            continue
        if isinstance(owner._parameters.get(attr), torch.nn.Parameter):
            del owner._parameters[attr]
            released += 1
        gm_owner = gm.get_submodule(owner_name) if owner_name else gm
        for buf in NF4Weight.BUFFERS:
            owner.register_buffer(f"{attr}{SUFFIX}{buf}", getattr(gm_owner, f"{attr}{SUFFIX}{buf}"), persistent=False)
    for name in CODE_BOOKS:
        if hasattr(gm, name) and not hasattr(model, name):
            model.register_buffer(name, getattr(gm, name), persistent=False)
    return released


_FRAME = re.compile(r'File "[^"]+", line \d+, in (\w+)')


def is_dequantize(node: fx.Node) -> bool:
    """A node computing a dequantised weight: the op itself (eager backend) or an ATen op of its decomposition
    (inductor, npu; found by its innermost stack frame)."""
    if is_call(node, nf4_dequantize._opoverload):
        return True
    frames = _FRAME.findall(node.meta.get("stack_trace") or "") if node.op == "call_function" else []
    return bool(frames) and frames[-1] == nf4_dequantize_decomposed.__name__


def tag_dequantized_weights(graph: fx.Graph) -> int:
    """On a joint graph: tag MUST_RECOMPUTE every dequantising node and, transitively, the casts and views of
    their results; returns how many nodes it tagged."""
    tagged, frontier = 0, [n for n in graph.nodes if is_dequantize(n)]
    for node in frontier:
        if not must_recompute(node):
            node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            tagged += 1
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if is_call(user, *_CARRIERS) and user.args[0] is node and not must_recompute(user):
                user.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
                tagged += 1
                frontier.append(user)
    return tagged


def recomputing_dequantized(partition: Callable) -> Callable:
    """`partition` (an aot_autograd partition function) that first tags the joint graph's dequantised weights and
    their casts and views for recomputation (`tag_dequantized_weights`)."""
    def partition_fn(joint_module: fx.GraphModule, joint_inputs, **kw):
        tag_dequantized_weights(joint_module.graph)
        return partition(joint_module, joint_inputs, **kw)

    partition_fn.__name__ = f"{getattr(partition, '__name__', 'partition')}_recomputing_nf4"
    return partition_fn
