"""Communication a rank's graphs perform per step, read off the forward/backward graphs' nodes."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping

import torch
import torch.fx as fx

from graphllm.ops.collectives import COLLECTIVE_OPS
from graphllm.ops.mc2 import MC2_OPS

c10d = torch.ops._c10d_functional
_C10D = {c10d.all_reduce.default: "all_reduce", c10d.all_reduce_.default: "all_reduce",  # inductor re-inplaces
         c10d.all_gather_into_tensor.default: "all_gather",
         c10d.reduce_scatter_tensor.default: "reduce_scatter", c10d.all_to_all_single.default: "all_to_all"}


def _torchair_kind(n: fx.Node) -> str | None:
    """torchair's all-to-all (what the cp collectives lower to on npu), when torchair or its emulation defined it."""
    return "all_to_all" if getattr(n.target, "name", lambda: "")() == "npu_define::all_to_all_single_npu" else None


def _nbytes(v: Any) -> int:
    return v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 0


def _mc2_payload(n: fx.Node) -> tuple[str, int]:
    """(group kind, bytes on the wire) of an MC2 op: the all-reduced output, the gathered input, or the
    full matmul output before its reduce-scatter."""
    val = n.meta.get("val")
    if n.target is torch.ops.graphllm.all_gather_matmul.default:
        return n.args[-2], _nbytes(val[1]) if isinstance(val, tuple) else 0
    size = n.args[3] if n.target is torch.ops.graphllm.matmul_reduce_scatter.default else 1
    return n.args[-2], _nbytes(val) * size


def graph_collectives(gm: fx.GraphModule, group_kinds: Mapping[str, str] | None = None) -> dict[str, dict[str, int]]:
    """{"<group> <collective>": {"calls": n, "bytes": payload bytes}} for one graph (payload: the larger
    of input and output, i.e. the full tensor of a gather or scatter). Lowered `_c10d_functional`
    collectives name their group by its c10d name; `group_kinds` maps those names back to "tp"/"dp"/"pp"."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: {"calls": 0, "bytes": 0})
    names = dict(group_kinds or {})
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in MC2_OPS:
            group, nbytes = _mc2_payload(n)
            key = f"{group} {MC2_OPS[n.target]}"
            out[key]["calls"] += 1
            out[key]["bytes"] += nbytes
            continue
        kind = COLLECTIVE_OPS.get(n.target) or _C10D.get(n.target) or _torchair_kind(n)
        if kind is None or kind == "identity":
            continue
        if n.target in COLLECTIVE_OPS:
            group = n.args[-1]
        elif kind == "all_to_all" and n.target not in _C10D:  # torchair's: (..., tag "ptd:<name>", ranks, size)
            group = names.get(str(n.args[5]).removeprefix("ptd:"), str(n.args[5]))
        else:
            group = names.get(n.args[-1], str(n.args[-1]))
        inp = n.args[0].meta.get("val") if isinstance(n.args[0], fx.Node) else None
        key = f"{group} {kind}"
        out[key]["calls"] += 1
        out[key]["bytes"] += max(_nbytes(inp), _nbytes(n.meta.get("val")))
    return dict(out)


def add_into(total: dict[str, dict[str, int]], part: dict[str, dict[str, int]], times: int = 1) -> None:
    for kind, c in part.items():
        t = total.setdefault(kind, {"calls": 0, "bytes": 0})
        t["calls"] += c["calls"] * times
        t["bytes"] += c["bytes"] * times
