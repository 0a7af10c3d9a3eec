"""Split a captured `forward(input_ids, labels) -> loss` graph into pipeline stages and a loss graph.

Each node gets an *effective layer*: the decoder layer named by its nn_module_stack (or by a parameter
input "…layers.<i>.…"), raised to the latest layer among its inputs, so every value flows forward
only. Nodes before layer 0 (embedding) are layer -1, nodes after the last layer that no later layer
needs (final norm, LM head) are layer L, and every node that depends on `labels` belongs to the loss
graph. A getitem of a multi-output node stays with its producer, so tuples never cross stages.
Parameters, constants (folded RoPE tables) and nodes computed from constants only are copied into
each graph that uses them; a node computed from parameters only goes to its earliest user's stage.
Stage s holds the s-th contiguous chunk of layers. Stage 0 takes `input_ids`; stage k > 0 takes
exactly stage k-1's outputs: the values made in stages ≤ k that a later stage or the loss reads, so a
value crossing several stages is passed through those in between. The split is exact: running the
stages in order and then the loss graph computes the same ops on the same values as the whole graph.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
import torch.fx as fx

from graphllm.errors import GraphllmError
from graphllm.planning.flops import node_flops
from graphllm.planning.layout import Layout

_LAYER = re.compile(r"\blayers\.(\d+)\b")
_COPY = "copy"  # node kind: duplicated into every graph that reads it
_LOSS = "loss"


@dataclass
class PipelineSplit:
    """Stage graphs in pipeline order, the loss graph, and what each stage holds."""

    stages: list[fx.GraphModule]
    """pp*vpp graphs; stage 0 takes input_ids, stage k>0 takes stage k-1's outputs; each returns a tuple."""
    loss: fx.GraphModule
    """forward(*last_stage_outputs, labels) -> scalar loss."""
    layers: list[list[int]]
    """Decoder layer indices per stage."""
    param_names: list[list[str]]
    """Full-model parameter names per stage (the loss graph's, if any, count as the last stage's)."""
    shared: dict[str, tuple[int, ...]]
    """Parameters that several stages use (a tied embedding and LM head, the embedding that multi-token prediction
    reads again at the end), by their first stage's name: the stages (ascending). Each stage's rank computes a
    partial gradient; the pipeline sums them (graphllm.parallel.pipeline)."""


def _module_layer(n: fx.Node) -> int | None:
    for path, _ in (n.meta.get("nn_module_stack") or {}).values():
        m = _LAYER.search(str(path))
        if m:
            return int(m.group(1))
    return None


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _effective_layers(gm: fx.GraphModule, num_layers: int) -> dict[fx.Node, int | str]:
    """Node -> effective layer (-1 … num_layers), "loss", or "copy"."""
    nodes = list(gm.graph.nodes)
    names = {n.target: n for n in nodes if n.op == "placeholder"}
    if set(names) != {"input_ids", "labels"}:
        raise GraphllmError(f"pipeline parallelism needs a graph captured as forward(input_ids, labels) -> loss, "
                            f"got inputs {sorted(names)}; compile with labels")
    own = {n: _module_layer(n) for n in nodes}
    found = {i for i in own.values() if i is not None}
    if found != set(range(num_layers)):
        raise GraphllmError(f"the graph's nodes name decoder layers {sorted(found)} (nn_module_stack "
                            f"'layers.<i>') but num_layers={num_layers}; pass the model's num_hidden_layers and "
                            "keep node provenance in custom passes")
    later_layer: dict[fx.Node, bool] = {}  # does any node downstream carry its own layer?
    for n in reversed(nodes):
        later_layer[n] = any(own[u] is not None or later_layer[u] for u in n.users)
    eff: dict[fx.Node, int | str | None] = {}
    param_layer: dict[fx.Node, int | None] = {}  # parameter get_attr -> the layer its name says, if any
    for n in nodes:
        if n.op == "placeholder":
            eff[n] = -1 if n.target == "input_ids" else _LOSS
        elif n.op == "get_attr":
            eff[n] = _COPY
            if isinstance(_attr(gm, n.target), torch.nn.Parameter):
                m = _LAYER.search(n.target)
                param_layer[n] = int(m.group(1)) if m else None
        elif n.op == "output":
            eff[n] = _LOSS
        else:
            ins = n.all_input_nodes
            if n.target is operator.getitem and isinstance(ins[0].meta.get("val"), (tuple, list)):
                eff[n] = eff[ins[0]]  # stay with the multi-output producer: tuples never cross stages
                continue
            deps = [eff[a] for a in ins if eff[a] != _COPY]
            if _LOSS in deps:
                eff[n] = _LOSS
                continue
            layers = [d for d in deps if d is not None] + [own[n]]
            layers += [param_layer.get(a) for a in ins]
            layers = [x for x in layers if x is not None]
            if layers:
                e = max(layers)
                tail = own[n] is None and e >= 0 and not later_layer[n]
                eff[n] = num_layers if tail else e
            elif None in deps or any(a in param_layer for a in ins) or n.is_impure():
                eff[n] = None  # reads parameters only: placed with its earliest user below
            else:
                eff[n] = _COPY  # computed from constants only
    out = next(n for n in nodes if n.op == "output")
    if not any(eff[a] == _LOSS for a in out.all_input_nodes):
        raise GraphllmError("the graph's output does not depend on labels; pipeline parallelism needs the loss "
                            "inside the graph (compile with labels)")
    order = {_LOSS: num_layers + 1}
    for n in reversed(nodes):
        if eff[n] is None:
            users = [eff[u] for u in n.users]
            eff[n] = min(users, key=lambda e: order.get(e, e)) if users else num_layers
    for n in nodes:  # a getitem of a multi-output node placed above follows it again
        if n.target is operator.getitem and isinstance(n.args[0].meta.get("val"), (tuple, list)):
            eff[n] = eff[n.args[0]]
    return eff


def _balance(costs: list[int], pre: int, post: int, stages: int) -> list[int]:
    """Layers per stage: contiguous, ≥ 1 each, minimising the largest stage cost (pre on stage 0, post on
    the last)."""
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: smallest max cost of stages 0..s-1 holding the first i layers; cut[s][i]: stage s-1 start
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for s in range(1, stages + 1):
        for i in range(s, n - (stages - s) + 1):
            for j in range(s - 1, i):
                cost = prefix[i] - prefix[j] + (pre if s == 1 else 0) + (post if s == stages else 0)
                m = max(best[s - 1][j], cost)
                if m < best[s][i]:
                    best[s][i], cut[s][i] = m, j
    counts, i = [], n
    for s in range(stages, 0, -1):
        counts.append(i - cut[s][i])
        i = cut[s][i]
    return counts[::-1]


def _layers_per_stage(layout: Layout, num_layers: int, eff: dict, gm: fx.GraphModule) -> list[int]:
    s = layout.num_stages
    if layout.pp_layers is not None:
        counts = list(layout.pp_layers)
        if len(counts) != s or sum(counts) != num_layers or min(counts) < 0:
            raise GraphllmError(f"--pp-layers {','.join(map(str, counts))} must list pp×vpp = {s} counts ≥ 0 "
                                f"summing to the model's {num_layers} layers")
        return counts
    if s > num_layers:
        raise GraphllmError(f"pp×vpp = {s} stages but the model has {num_layers} layers; lower --pp/--vpp or give "
                            "--pp-layers with empty stages")
    costs, pre, post = [0] * num_layers, 0, 0
    for n in gm.graph.nodes:
        e, f = eff[n], node_flops(n)
        if e == -1:
            pre += f
        elif e == num_layers or e == _LOSS:
            post += f
        elif isinstance(e, int):
            costs[e] += f
    return _balance(costs, pre, post, s)


def split_pipeline(gm: fx.GraphModule, layout: Layout, num_layers: int) -> PipelineSplit:
    """Split `gm` into layout.num_stages stage graphs and a loss graph (see the module docstring).

    Layers per stage come from `layout.pp_layers`, else a FLOP-balanced contiguous split.
    """
    eff = _effective_layers(gm, num_layers)
    counts = _layers_per_stage(layout, num_layers, eff, gm)
    last = layout.num_stages - 1
    stage_of_layer, layers, start = {}, [], 0
    for s, c in enumerate(counts):
        layers.append(list(range(start, start + c)))
        stage_of_layer.update({i: s for i in layers[-1]})
        start += c

    def stage(e) -> int:  # the loss graph is numbered last + 1
        return last + 1 if e == _LOSS else 0 if e == -1 else last if e == num_layers else stage_of_layer[e]

    nodes = list(gm.graph.nodes)
    placed = {n: stage(eff[n]) for n in nodes if eff[n] != _COPY}
    # a value is made in its node's stage (input_ids arrives before stage 0) and read by its users' stages
    live: list[list[fx.Node]] = []
    for k in range(last + 1):
        live.append([n for n in nodes if placed.get(n, k + 1) <= k and any(placed.get(u, -1) > k for u in n.users)])
        for v in live[-1]:
            if not isinstance(v.meta.get("val"), torch.Tensor):
                raise GraphllmError(f"value {v.name} ({v.format_node()}) crosses pipeline stage {k} but is not a "
                                    "tensor with a recorded shape (meta['val']); the graph cannot be split there")
    graphs = []
    for k in range(last + 2):
        inputs = [n for n in nodes if n.op == "placeholder" and n.target == "input_ids"] if k == 0 else live[k - 1]
        if k == last + 1:
            inputs = inputs + [n for n in nodes if n.op == "placeholder" and n.target == "labels"]
        graphs.append(_build(gm, k, inputs, [n for n in nodes if placed.get(n) == k and n.op not in
                                             ("placeholder", "output")], eff, live[k] if k <= last else None))
    stages, loss = graphs[:-1], graphs[-1]
    param_names = [_params(g) for g in stages]
    param_names[-1] += [p for p in _params(loss) if p not in param_names[-1]]
    first: dict[int, str] = {}  # id(parameter) -> the name its first stage reads it by
    used: dict[int, set[int]] = {}  # id(parameter) -> the stages reading it
    for k, g in enumerate(stages + [loss]):
        for name in _params(g):
            pid = id(_attr(g, name))
            first.setdefault(pid, name)
            used.setdefault(pid, set()).add(min(k, last))
    shared = {first[pid]: tuple(sorted(ks)) for pid, ks in used.items() if len(ks) > 1}
    return PipelineSplit(stages=stages, loss=loss, layers=layers, param_names=param_names, shared=shared)


def _build(gm: fx.GraphModule, k: int, inputs: list[fx.Node], body: list[fx.Node], eff: dict,
           outputs: list[fx.Node] | None) -> fx.GraphModule:
    """One stage graph (outputs given) or the loss graph (outputs None: the original graph's output)."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in inputs:
        env[n] = g.placeholder(n.name)
        env[n].meta = dict(n.meta)

    def fetch(a: fx.Node) -> fx.Node:
        if a not in env:
            assert eff[a] == _COPY, f"{a.name} is read by stage {k} but neither made nor received there"
            if a.op == "get_attr":
                env[a] = g.get_attr(a.target)
                env[a].meta = dict(a.meta)
            else:
                env[a] = g.node_copy(a, fetch)
        return env[a]

    for n in body:
        env[n] = g.node_copy(n, fetch)
    if outputs is None:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        g.output(fx.map_arg(out.args[0], fetch))
    else:
        g.output(tuple(env[n] for n in outputs))
    g.lint()
    return fx.GraphModule(gm, g, class_name="PipelineLoss" if outputs is None else f"PipelineStage{k}")


def _params(g: fx.GraphModule) -> list[str]:
    return [n.target for n in g.graph.nodes
            if n.op == "get_attr" and isinstance(_attr(g, n.target), torch.nn.Parameter)]
