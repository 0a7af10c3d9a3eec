"""coc: communication/computation overlap for tensor-parallel linears by chunking (MindSpeed's CoC).

With sequence parallelism, a column-parallel linear waits for an all-gather of its whole input and a
row-parallel linear's output waits for its whole reduce-scatter. This pass splits each into `chunks`
pieces along the sequence so chunk j's collective can travel while chunk j±1 computes:

    all-gather → matmul      x [B, s, H] → slices x_j [B, s/N, H], each gathered (all N issued first),
                             each multiplied; the results are interleaved back into sequence order
                             (rank-major: [B, tp, N, s/N, O] → [B, S, O])
    matmul → reduce-scatter  x [B, S, I] viewed [B, tp, N, s/N, I]; chunk j takes every rank's j-th
                             rows, is multiplied and reduce-scattered; the N results concatenate to
                             this rank's [B, s, O]
    matmul → all-reduce      (no sequence parallelism) x sliced along the sequence; each slice
                             multiplied and all-reduced; concatenated

The arithmetic per output element is unchanged (each row's dot products are the same), so results
equal the unchunked graph up to the matmul kernel's blocking. The overlap itself needs asynchronous
collectives: `lower_collectives` issues them and waits just before first use (inductor; and the
eager backend when this pass runs). MindSpeed's `--coc-parallel-num` is `chunks`.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from graphllm.errors import GraphllmError
from graphllm.passes.graph_edit import TP_ROLE_KEY, emit
from graphllm.passes.manager import PassContext, graph_pass
from graphllm.passes.matching import is_call
from graphllm.passes.shapes import repropagate
from graphllm.planning.layout import CHUNK_CHOICES

aten = torch.ops.aten
gl = torch.ops.graphllm


def _shape(n: fx.Node) -> list[int]:
    return list(n.meta["val"].shape)


def _chunk_gather(gm: fx.GraphModule, g: fx.Node, n: int, tp: int) -> bool:
    x = g.args[0]
    b, s, h = _shape(x)
    linears = list(g.users)
    if s % n or not all(is_call(u, aten.linear.default) and u.args[0] is g for u in linears):
        return False
    c = s // n
    with gm.graph.inserting_before(linears[0]):
        parts = [emit(gm, gl.sp_gather.default, (emit(gm, aten.slice.Tensor, (x, 1, j * c, (j + 1) * c), g), 1, tp, "tp"),
                      g, "coc") for j in range(n)]
    for lin in linears:
        out = _shape(lin)[-1]
        with gm.graph.inserting_before(lin):
            ys = [emit(gm, aten.view.default, (emit(gm, aten.linear.default, (p, *lin.args[1:]), lin), [b, tp, 1, c, out]),
                       lin) for p in parts]
            full = emit(gm, aten.reshape.default, (emit(gm, aten.cat.default, (ys, 2), lin), [b, tp * s, out]), lin)
        lin.replace_all_uses_with(full)
        gm.graph.erase_node(lin)
    gm.graph.erase_node(g)
    return True


def _chunk_reduce(gm: fx.GraphModule, r: fx.Node, n: int, tp: int, scatter: bool) -> bool:
    lin = r.args[0]
    if not is_call(lin, aten.linear.default) or len(lin.users) != 1:
        return False
    x = lin.args[0]
    b, seq, i = _shape(x)
    out = _shape(lin)[-1]
    local = seq // tp if scatter else seq
    if local % n:
        return False
    c = local // n
    with gm.graph.inserting_before(r):
        if scatter:
            x5 = emit(gm, aten.view.default, (x, [b, tp, n, c, i]), lin)
            rows = [emit(gm, aten.reshape.default, (emit(gm, aten.select.int, (x5, 2, j), lin), [b, tp * c, i]), lin)
                    for j in range(n)]
        else:
            rows = [emit(gm, aten.slice.Tensor, (x, 1, j * c, (j + 1) * c), lin) for j in range(n)]
        outs = []
        for part in rows:
            z = emit(gm, aten.linear.default, (part, *lin.args[1:]), lin)
            args = (z, 1, tp, "tp") if scatter else (z, "tp")
            outs.append(emit(gm, r.target, args, r, "coc"))
        joined = emit(gm, aten.cat.default, (outs, 1), r)
    r.replace_all_uses_with(joined)
    gm.graph.erase_node(r)
    gm.graph.erase_node(lin)
    return True


def tp_sites(gm: fx.GraphModule):
    """(node, "all_gather" | "reduce_scatter" | "all_reduce") for each collective tensor_parallel and
    sequence_parallel put beside a linear (the sites the overlap passes, coc and mc2, rewrite)."""
    for node in list(gm.graph.nodes):
        role = node.meta.get(TP_ROLE_KEY)
        if role == "col_in" and is_call(node, gl.sp_gather.default):
            yield node, "all_gather"
        elif role == "row_out" and is_call(node, gl.sp_reduce_scatter.default):
            yield node, "reduce_scatter"
        elif role == "row_out" and is_call(node, gl.tp_reduce.default):
            yield node, "all_reduce"


@graph_pass("coc")
def coc(gm: fx.GraphModule, ctx: PassContext, *, chunks: int = 2) -> fx.GraphModule:
    if chunks not in CHUNK_CHOICES:
        raise GraphllmError(f"--coc-parallel-num must be one of {', '.join(map(str, CHUNK_CHOICES))}, got {chunks}")
    tp = ctx.layout.tp
    if chunks == 1 or tp == 1:
        return gm
    done = skipped = 0
    for node, kind in tp_sites(gm):
        if kind == "all_gather":
            ok = _chunk_gather(gm, node, chunks, tp)
        else:
            ok = _chunk_reduce(gm, node, chunks, tp, scatter=kind == "reduce_scatter")
        done, skipped = done + ok, skipped + (not ok)
    ctx.count("chunked", done)
    if skipped:
        ctx.count("left whole (sequence not divisible)", skipped)
    repropagate(gm, {})
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
