"""Activation offload ("swap attention"): chosen saved activations live in host memory between the forward
and the backward.

A partition-time rewrite of the forward/backward pair aot_autograd's partitioner returns (so it sees exactly
what the recompute policy decided to save — what is recomputed is never offloaded):

- forward: right after a chosen saved value is produced, `graphllm::offload_to_host(x)`; the graph hands the
  host copy to the backward instead of `x`, so the device buffer is freed after the value's last forward use;
- backward: `graphllm::prefetch_to_device(x_host, device)` replaces the saved input at every use, placed
  `prefetch_layers` layers ahead of the first use — right before the first use of any saved value of layer
  L + prefetch_layers (the backward runs the layers in reverse), so the copy overlaps that layer's backward.

Chosen: the saved values produced in a decoder layer (`nn_module_stack` "layers.<i>"), not the parameters or
inputs (`primals_*`) nor views of them; `attention` keeps those an attention op reads or produces. `layers`
keeps the first N layers (the backward reaches them last, so they are held longest); `budget` offloads, first
layers first, until at most that fraction of the saved bytes stays on the device. Saved values that are one
value (the same view of one tensor, saved by several ops) move as one host copy with one prefetch.

Legal because the ops copy values unchanged: losses and gradients are bitwise equal
(tests/test_activation_offload.py). The aot backends call it through their partition function
(`wrap_partition`; the npu ones refuse the option: graphllm/planning/compat.py), inductor through its `custom_partitioner_fn` hook (`InductorOffloadPartitioner`).
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomPartitionerFn, get_hash_for_files

from graphllm.planning.memory import VIEW_OPS, input_views
from graphllm.planning.offload_config import ActivationOffloadConfig
from graphllm.recompute import _OPS_OF_KIND, _layers, _op_name

logger = logging.getLogger("graphllm")

OFFLOAD_PASS = "offload_activations"
"""`graphllm_pass` stamp on the inserted nodes (dumps and `graphllm inspect` show it)."""
_ATTENTION = set(_OPS_OF_KIND["attention"])
_PASS_THROUGH = (operator.getitem, torch.ops.aten.detach.default, torch.ops.aten.alias.default,
                 torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.reshape.default,
                 torch.ops.aten.transpose.int, torch.ops.aten.permute.default, torch.ops.aten.clone.default)
"""Ops that only move a value (its layout, a multi-output op's item): attention's output stays attention's
through them (the o_proj matmul saves it as [tokens, heads·head_dim])."""


@dataclass(frozen=True, slots=True)
class Saved:
    """One value the forward hands to the backward."""

    name: str
    layer: int | None
    nbytes: int
    attention: bool


def saved_values(fwd: fx.GraphModule, bwd: fx.GraphModule) -> list[Saved]:
    """The forward values the backward reads (its placeholders other than tangents), in forward order, with
    their decoder layer; parameters, inputs and views of them are left out (offloading them frees nothing)."""
    read = {n.name for n in bwd.graph.nodes if n.op == "placeholder" and not n.name.startswith("tangents")}
    views = input_views(fwd)
    forward = [n for n in fwd.graph.nodes if n.op == "call_function"]
    layers = _layers(forward)
    out = []
    for node in forward:
        val = node.meta.get("val")
        if node.name not in read or node.name in views or not isinstance(val, torch.Tensor):
            continue
        out.append(Saved(node.name, layers[node], val.numel() * val.element_size(), _touches_attention(node)))
    return out


def _touches_attention(node: fx.Node) -> bool:
    """An attention op's input or output (through getitem and views)."""
    source = node
    while source.target in _PASS_THROUGH and isinstance(source.args[0], fx.Node):
        source = source.args[0]
    if _op_name(source) in _ATTENTION:
        return True
    users = list(node.users)
    while users:
        u = users.pop()
        if u.op != "call_function":
            continue
        if _op_name(u) in _ATTENTION:
            return True
        if u.target in _PASS_THROUGH:
            users.extend(u.users)
    return False


def choose(saved: list[Saved], cfg: ActivationOffloadConfig) -> list[Saved]:
    """The saved values the policy moves to the host."""
    pool = [s for s in saved if s.layer is not None and (cfg.activations == "all" or s.attention)]
    if cfg.layers is not None:
        return [s for s in pool if s.layer < cfg.layers]
    if cfg.budget is None:
        return pool
    resident = sum(s.nbytes for s in saved)
    keep = cfg.budget * resident
    out = []
    for s in sorted(pool, key=lambda s: s.layer):  # first layers first: the backward needs them last
        if resident <= keep:
            break
        out.append(s)
        resident -= s.nbytes
    return out


def offload_saved(fwd: fx.GraphModule, bwd: fx.GraphModule, cfg: ActivationOffloadConfig) -> list[Saved]:
    """Rewrite the pair in place: offload in the forward, prefetch in the backward; returns what moved.

    Saved values that are one value (the same view of the same tensor: q, k and v's projections each save the
    normed input as its own `view`) move once: one host copy handed over for all of them, one prefetch."""
    from graphllm.passes.manager import PASS_META_KEY

    saved = saved_values(fwd, bwd)
    chosen = choose(saved, cfg)
    if not chosen:
        return []
    nodes = {n.name: n for n in fwd.graph.nodes}
    same = _same_values(nodes, chosen)  # name → the first chosen value equal to it
    out_node = fwd.graph.find_nodes(op="output")[0]
    outputs = list(out_node.args[0])
    read = {n.name for n in bwd.graph.find_nodes(op="placeholder")}
    first_saved = len(outputs)  # the saved values are the outputs' tail (after the user outputs)
    while first_saved and isinstance(outputs[first_saved - 1], fx.Node) and outputs[first_saved - 1].name in read:
        first_saved -= 1
    host_of: dict[str, fx.Node] = {}
    for s in chosen:
        node = nodes[s.name]
        if same[s.name] == s.name:
            with fwd.graph.inserting_after(node):
                host = fwd.graph.call_function(torch.ops.graphllm.offload_to_host.default, (node,))
            host.meta.update(val=_on(node.meta["val"], "cpu"), **{PASS_META_KEY: OFFLOAD_PASS})
            host.meta["stack_trace"] = node.meta.get("stack_trace")
            host_of[s.name] = host
        else:  # chosen comes in forward order: the first of a same-value group was offloaded already
            host_of[s.name] = host_of[same[s.name]]
    outputs[first_saved:] = [host_of.get(o.name, o) if isinstance(o, fx.Node) else o for o in outputs[first_saved:]]
    out_node.args = (tuple(outputs),) + tuple(out_node.args[1:])
    fwd.graph.lint()
    fwd.recompile()
    _prefetch(bwd, chosen, saved, same, cfg.prefetch_layers)
    return chosen


def _same_values(nodes: dict[str, fx.Node], chosen: list[Saved]) -> dict[str, str]:
    """Each chosen value → the first chosen value computed by the same chain of view ops from the same node."""
    def key(node: fx.Node) -> tuple:
        chain = []
        while node.target in VIEW_OPS and isinstance(node.args[0], fx.Node):
            chain.append((node.target, repr(node.args[1:]), repr(node.kwargs)))
            node = node.args[0]
        return node, tuple(chain)

    first: dict[tuple, str] = {}
    return {s.name: first.setdefault(key(nodes[s.name]), s.name) for s in chosen}


def _prefetch(bwd: fx.GraphModule, chosen: list[Saved], saved: list[Saved], same: dict[str, str],
              distance: int) -> None:
    from graphllm.passes.manager import PASS_META_KEY

    order = {n: i for i, n in enumerate(bwd.graph.nodes)}
    placeholders = {n.name: n for n in bwd.graph.find_nodes(op="placeholder")}
    first_use = {s.name: min((u for u in placeholders[s.name].users), key=order.__getitem__) for s in saved
                 if placeholders[s.name].users}
    layer_start: dict[int, fx.Node] = {}  # a layer's backward begins (about) at the first use of its saved values
    for s in saved:
        if s.layer is not None and s.name in first_use:
            cur = layer_start.get(s.layer)
            if cur is None or order[first_use[s.name]] < order[cur]:
                layer_start[s.layer] = first_use[s.name]
    first_op = next(n for n in bwd.graph.nodes if n.op != "placeholder")
    for s in (s for s in chosen if same[s.name] == s.name):
        group = [placeholders[c.name] for c in chosen if same[c.name] == s.name]
        uses = [first_use[p.name] for p in group if p.name in first_use]
        if not uses:
            continue
        later = [layer_start[lay] for lay in range(s.layer + 1, s.layer + distance + 1) if lay in layer_start]
        if distance and s.layer + distance > max(layer_start):
            later.append(first_op)  # the last layers' values: prefetched as the backward starts
        anchor = min([*uses, *later], key=order.__getitem__)
        ph = group[0]
        with bwd.graph.inserting_before(anchor):
            dev = bwd.graph.call_function(torch.ops.graphllm.prefetch_to_device.default,
                                          (ph, str(ph.meta["val"].device)))
        dev.meta.update(val=ph.meta["val"], offload_layer=s.layer, **{PASS_META_KEY: OFFLOAD_PASS})
        for p in group:  # the same value's other inputs stay, unread (the forward hands them the same host copy)
            p.replace_all_uses_with(dev, delete_user_cb=lambda u: u is not dev)
            p.meta.update(val=_on(p.meta["val"], "cpu"), offloaded=True)
    bwd.graph.lint()
    bwd.recompile()


def _on(val: torch.Tensor, device: str) -> torch.Tensor:
    """A fake/meta value like `val` on `device` (the graph's metadata of a moved value)."""
    mode = getattr(val, "fake_mode", None)
    if mode is None:
        return val.to(device) if val.device.type == "meta" else val
    with mode:
        return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=device)


def offloaded_bytes(bwd: fx.GraphModule) -> int:
    """Bytes of the saved values a backward graph receives in host memory, counted as `saved_activation_bytes`
    counts them (each saved input on its own)."""
    return sum(n.meta["val"].numel() * n.meta["val"].element_size() for n in bwd.graph.find_nodes(op="placeholder")
               if n.meta.get("offloaded"))


def wrap_partition(partition: Callable, cfg: ActivationOffloadConfig) -> Callable:
    """`partition` (default_partition's signature), then the offload rewrite of its result."""
    if not cfg.enabled:
        return partition

    def offloading(joint_module: fx.GraphModule, joint_inputs: Any, **kw: Any) -> tuple[fx.GraphModule, fx.GraphModule]:
        fwd, bwd = partition(joint_module, joint_inputs, **kw)
        moved = offload_saved(fwd, bwd, cfg)
        logger.info("offload_activations %s: %d saved values (%d bytes) to host", cfg.describe(), len(moved),
                    sum(s.nbytes for s in moved))
        return fwd, bwd

    offloading.__name__ = f"{getattr(partition, '__name__', 'partition')}_offload"
    return offloading


class InductorOffloadPartitioner(CustomPartitionerFn):
    """Inductor's `custom_partitioner_fn`: its own min-cut partitioner (the recompute tags and budget reach it
    through config), then the offload rewrite. Module-level so inductor's cache key can pickle it."""

    def __init__(self, cfg: ActivationOffloadConfig) -> None:
        self.cfg = cfg

    def __call__(self, gm: fx.GraphModule, joint_inputs: Any, **kw: Any) -> tuple[fx.GraphModule, fx.GraphModule]:
        from torch._functorch.partitioners import min_cut_rematerialization_partition

        return wrap_partition(min_cut_rematerialization_partition, self.cfg)(gm, joint_inputs, **kw)

    def uuid(self) -> Any:
        return (get_hash_for_files((__file__,)), self.cfg.describe())
