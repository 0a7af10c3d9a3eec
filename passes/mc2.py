"""mc2: raise each tensor-parallel matmul + collective pair to one graphllm MC2 op (ops/mc2.py).

    sp_gather(x) → linear(·, w, b) [→ more linears]   all_gather_matmul(x, w, b) → (y, gathered);
                                                     the other linears read `gathered`
    linear(x, w) → sp_reduce_scatter                 matmul_reduce_scatter(x, w)
    linear(x, w) → tp_reduce                         matmul_all_reduce(x, w)   (no sequence parallelism)

Only the pairs tensor_parallel / sequence_parallel inserted for linears are raised (their nodes carry the
"col_in" / "row_out" role); the embedding's, LM head's and loss's collectives stay as they are. On the
npu backend the ops lower to torch_npu's fused kernels; elsewhere to `chunks` CoC pieces (`chunks` is
`--coc-parallel-num`; 1 gives the unchunked collectives), so `--mc2` can be developed and checked on
CPU. MindSpeed's MC2 needs sequence parallelism; graphllm also raises the all-reduce form
(npu_mm_all_reduce_base) for tensor parallelism without it.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from graphllm.errors import GraphllmError
from graphllm.passes.coc import tp_sites
from graphllm.passes.graph_edit import emit
from graphllm.passes.manager import PassContext, graph_pass
from graphllm.passes.matching import is_call
from graphllm.planning.layout import CHUNK_CHOICES

aten = torch.ops.aten
gl = torch.ops.graphllm
MC2_ROLE = "mc2"


def _linear_args(lin: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None]:
    x, w = lin.args[0], lin.args[1]
    bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
    return x, w, bias


def _is_3d(n: fx.Node) -> bool:
    return isinstance(n, fx.Node) and "val" in n.meta and n.meta["val"].dim() == 3


def _raise_gather(gm: fx.GraphModule, g: fx.Node, chunks: int) -> bool:
    x, dim, size, group = g.args
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    linears = sorted(g.users, key=order.__getitem__)
    if dim != 1 or not _is_3d(x) or not all(is_call(u, aten.linear.default) and u.args[0] is g for u in linears):
        return False
    first = linears[0]
    _, w, bias = _linear_args(first)
    with gm.graph.inserting_before(first):
        mc2 = emit(gm, gl.all_gather_matmul.default, (x, w, bias, size, group, chunks), first, MC2_ROLE)
        y = emit(gm, operator.getitem, (mc2, 0), first)
        gathered = emit(gm, operator.getitem, (mc2, 1), g)
    y.meta["val"] = first.meta["val"]
    gathered.meta["val"] = g.meta["val"]
    mc2.meta["val"] = (first.meta["val"], g.meta["val"])
    first.replace_all_uses_with(y)
    gm.graph.erase_node(first)
    g.replace_all_uses_with(gathered)  # the other linears read the gathered input
    gm.graph.erase_node(g)
    return True


def _raise_reduce(gm: fx.GraphModule, r: fx.Node, chunks: int) -> bool:
    lin = r.args[0]
    if not is_call(lin, aten.linear.default) or len(lin.users) != 1 or not _is_3d(lin.args[0]):
        return False
    x, w, bias = _linear_args(lin)
    if bias is not None:  # tensor_parallel adds a row-parallel bias after the reduction, never inside
        return False
    if r.target is gl.tp_reduce.default:
        target, args = gl.matmul_all_reduce.default, (x, w, None, r.args[1], chunks)
    elif r.args[1] == 1:
        target, args = gl.matmul_reduce_scatter.default, (x, w, None, r.args[2], r.args[3], chunks)
    else:
        return False
    with gm.graph.inserting_before(r):
        fused = emit(gm, target, args, r, MC2_ROLE)
    fused.meta["val"] = r.meta["val"]
    r.replace_all_uses_with(fused)
    gm.graph.erase_node(r)
    gm.graph.erase_node(lin)
    return True


@graph_pass("mc2")
def mc2(gm: fx.GraphModule, ctx: PassContext, *, chunks: int = 1) -> fx.GraphModule:
    if chunks not in CHUNK_CHOICES:
        raise GraphllmError(f"mc2: chunks must be one of {', '.join(map(str, CHUNK_CHOICES))}, got {chunks}")
    if ctx.layout.tp == 1:
        return gm
    raised = {"all_gather_matmul": 0, "matmul_reduce_scatter": 0, "matmul_all_reduce": 0}
    left = 0
    for node, site in tp_sites(gm):
        if site == "all_gather":
            ok, kind = _raise_gather(gm, node, chunks), "all_gather_matmul"
        else:
            ok, kind = _raise_reduce(gm, node, chunks), f"matmul_{site}"
        raised[kind] += ok
        left += not ok
    for kind, n in raised.items():
        if n:
            ctx.count(kind, n)
    if left:
        ctx.count("left unfused", left)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
