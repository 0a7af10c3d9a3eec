"""Re-derive node shapes after a pass changed some tensor sizes (sharding), fixing literal shapes.

Sharding passes change the sizes of parameters and activations (a q projection's output goes from
all heads to this rank's heads). Nodes whose arguments spell a size (`view(x, [B, S, 8, 32])`) must
then say the new size. `repropagate` walks the graph in order under the capture's FakeTensorMode,
recomputes every node's `meta["val"]`, and rewrites the size argument of view/reshape/expand nodes
whose input changed: the changed input dimension is mapped through the reshape (groups of dimensions
with equal products) onto the outermost matching output dimension, which is how heads are laid out
(`[B, S, H*D] <-> [B, S, H, D]`: H changes, D does not) — unless the reshape splits dims an earlier one merged
(a mixture of experts' [B, S, H] → [B·S, H] → [B, S, H]): those get back the factors they were merged from.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from graphllm.errors import GraphllmError

aten = torch.ops.aten
RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def old_shapes(gm: fx.GraphModule) -> dict[fx.Node, tuple[int, ...]]:
    """Snapshot of each node's output shape, taken before a pass rewrites the graph."""
    out = {}
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor):
            out[n] = tuple(v.shape)
    return out


def _groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Split dims of `a` and `b` (equal numel) into consecutive groups with equal products."""
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        gi, gj = [i], [j]
        pa, pb = a[i] if i < len(a) else 1, b[j] if j < len(b) else 1
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                pa *= a[i]; gi.append(i); i += 1
            elif j < len(b):
                pb *= b[j]; gj.append(j); j += 1
            else:
                break
        groups.append(([d for d in gi if d < len(a)], [d for d in gj if d < len(b)]))
    return groups


def reshaped_size(old_in: tuple[int, ...], new_in: tuple[int, ...], old_out: tuple[int, ...],
                  merges: dict[tuple[int, ...], tuple[int, ...]] | None = None) -> list[int]:
    """The output size a reshape must now ask for, given how its input's size changed. `merges` (kept across one
    graph's reshapes): the dims an earlier reshape merged, old sizes → new ones, so that a reshape splitting them
    again restores the same factors ([B, S/tp, H] → [B·S/tp, H] → [B, S/tp, H], not [B/tp, S, H])."""
    new_out = list(old_out)
    merges = {} if merges is None else merges
    for g_in, g_out in _groups(old_in, old_out):
        changed = [d for d in g_in if new_in[d] != old_in[d]]
        if not changed:
            continue
        if len(g_in) > 1 and len(g_out) == 1:
            merges[tuple(old_in[d] for d in g_in)] = tuple(new_in[d] for d in g_in)
        undone = merges.get(tuple(old_out[d] for d in g_out)) if len(g_in) == 1 and len(g_out) > 1 else None
        if undone is not None and math.prod(undone) == new_in[g_in[0]]:
            for d, n in zip(g_out, undone):
                new_out[d] = n
            continue
        factor = Fraction(math.prod(new_in[d] for d in g_in), math.prod(old_in[d] for d in g_in))
        for o in g_out:  # outermost output dim the change divides evenly
            scaled = old_out[o] * factor
            if scaled.denominator == 1 and scaled >= 1:
                new_out[o] = int(scaled)
                break
        else:
            raise GraphllmError(f"cannot map a size change {old_in} -> {new_in} through a reshape to {old_out}")
    return new_out


def _fix_args(node: fx.Node, shapes: dict[fx.Node, tuple[int, ...]], in_val: torch.Tensor,
              merges: dict[tuple[int, ...], tuple[int, ...]]) -> None:
    src = node.args[0]
    old_in, old_out = shapes.get(src), shapes.get(node)
    if old_in is None or old_out is None or tuple(in_val.shape) == old_in:
        return
    new_in = tuple(in_val.shape)
    if node.target in RESHAPES:
        size = reshaped_size(old_in, new_in, old_out, merges)
        spelled = list(node.args[1])
        node.args = (src, [-1 if s == -1 else n for s, n in zip(spelled, size)], *node.args[2:])
    elif node.target is aten.expand.default:
        lead = len(old_out) - len(old_in)
        size = [new_in[i - lead] if i >= lead and old_out[i] == old_in[i - lead] else s
                for i, s in enumerate(node.args[1])]
        node.args = (src, size, *node.args[2:])


def repropagate(gm: fx.GraphModule, shapes: dict[fx.Node, tuple[int, ...]]) -> None:
    """Recompute meta["val"] for every node, fixing size arguments (see module docstring)."""
    vals = [n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    mode = detect_fake_mode(vals)
    if mode is None:
        raise GraphllmError("repropagate needs a captured graph (nodes with fake-tensor meta['val'])")
    env: dict[fx.Node, Any] = {}
    merges: dict[tuple[int, ...], tuple[int, ...]] = {}
    with mode:
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                env[node] = node.meta["val"]
            elif node.op == "get_attr":
                env[node] = mode.from_tensor(_attr(gm, node.target), static_shapes=True)
            elif node.op == "call_function":
                if node.target in RESHAPES or node.target is aten.expand.default:
                    _fix_args(node, shapes, env[node.args[0]], merges)
                args = fx.node.map_arg(node.args, lambda a: env[a])
                kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
                env[node] = node.target(*args, **kwargs)
            elif node.op == "output":
                continue
            else:
                raise GraphllmError(f"repropagate: unsupported node {node.op} {node.target}")
            node.meta["val"] = env[node]


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
