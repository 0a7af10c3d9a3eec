"""Small graph-editing helpers the parallel passes share: emit a call with provenance, swap a parameter."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx

PROVENANCE_KEYS = ("stack_trace", "nn_module_stack", "source_fn_stack")
TP_ROLE_KEY = "graphllm_tp_role"
"""node.meta key set by tensor_parallel on the collectives it inserts (what sequence_parallel rewrites):
"col_in" (copy before a column-parallel linear), "row_out" (reduce after a row-parallel linear),
"embed_out" (reduce after the vocab-parallel embedding), "head_in" (copy before the LM head),
"loss" (reductions inside vocab-parallel cross-entropy), "weight" (gradient all-reduce of a weight)."""


def emit(gm: fx.GraphModule, target: Any, args: Sequence[Any], like: fx.Node, role: str | None = None,
         kwargs: dict | None = None) -> fx.Node:
    """`gm.graph.call_function(target, args)` at the current insertion point, with `like`'s provenance
    (so dumps and the pipeline split attribute it to the same module)."""
    node = gm.graph.call_function(target, tuple(args), kwargs or {})
    for key in PROVENANCE_KEYS:
        if key in like.meta:
            node.meta[key] = like.meta[key]
    if role is not None:
        node.meta[TP_ROLE_KEY] = role
    return node


def get_attr_value(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_parameter(gm: fx.GraphModule, target: str, value: torch.nn.Parameter) -> None:
    owner_name, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    setattr(owner, attr, value)


def read_source(node: fx.Node) -> fx.Node:
    """Where `node`'s value comes from through ops of one tensor input (transposes, views, casts): a parameter's
    get_attr when it is one (a grouped matmul's weight), else the first op of several inputs or a placeholder."""
    while node.op == "call_function":
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        if len(tensors) != 1:
            break
        node = tensors[0]
    return node
