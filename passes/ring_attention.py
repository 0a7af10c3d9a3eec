"""Ring and Ulysses attention spelled as graph nodes (what passes/context_parallel.py emits per attention).

Ring: the keys and values, concatenated along the head dimension's entries into one tensor (so their widths
may differ, as multi-latent attention's do), travel around the "cp_ring" group one step at a
time (`cp_ring_shift`). The shift that brings step i+1's keys is issued before step i's attention, so it
travels while that attention computes (after lowering, its wait sits at step i+1's first use). Each step
computes the blocks `graphllm.planning.context.ring_schedule` lists with `graphllm::attention_block`,
which returns the block's output and its log-sum-exp; the partial results of each run of query rows are
merged by the log-sum-exp rule in float32:

    lse = log(exp(lse_a) + exp(lse_b));   out = out_a · exp(lse_a - lse) + out_b · exp(lse_b - lse)

Autograd differentiates the unrolled ring: the shift's backward is the reverse shift, so the keys' and
values' gradients travel back around the ring to the rank that owns them.

Ulysses: `cp_all_to_all` turns [B, H, S/U, D] (sequence-sharded) into [B, H/U, S, D] (head-sharded) over
the "cp_ulysses" group and back after attention; key/value heads fewer than U are repeated first (GQA).
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx

from graphllm.passes.graph_edit import emit
from graphllm.planning.context import RingStep

aten = torch.ops.aten
gl = torch.ops.graphllm
HEAD_DIM, SEQ_DIM, WIDTH_DIM = 1, 2, 3  # attention tensors are [batch, heads, sequence, head_dim]


def runs_of(index: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs [a, b) of an index list, in order."""
    runs: list[list[int]] = []
    for i in index:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(a, b) for a, b in runs]


def take_runs(gm: fx.GraphModule, x: fx.Node, dim: int, index: list[int], length: int, like: fx.Node) -> fx.Node:
    """x's entries `index` along `dim` (of `length`), as slices of consecutive runs concatenated."""
    runs = runs_of(index)
    if runs == [(0, length)]:
        return x
    parts = [emit(gm, aten.slice.Tensor, (x, dim, a, b), like) for a, b in runs]
    return parts[0] if len(parts) == 1 else emit(gm, aten.cat.default, (parts, dim), like)


def _rows(gm: fx.GraphModule, x: fx.Node | None, dim: int, a: int, b: int, length: int, like: fx.Node):
    if x is None or (a, b) == (0, length):
        return x
    return emit(gm, aten.slice.Tensor, (x, dim, a, b), like)


def _merge(gm: fx.GraphModule, acc: tuple[fx.Node, fx.Node], new: tuple[fx.Node, fx.Node], like: fx.Node):
    """lse = m + log(e1 + e2) with m = max(l1, l2), e_i = exp(l_i - m) (logaddexp spelled in ops torchair
    converts: its own converter is a stub); out = (o1·e1 + o2·e2) / (e1 + e2). The accumulator's l1 is
    finite (every query sees itself in the first, diagonal block), so m is too, and an empty l2 = -inf
    gives e2 = 0."""
    (o1, l1), (o2, l2) = acc, new
    m = emit(gm, aten.maximum.default, (l1, l2), like)
    e1 = emit(gm, aten.exp.default, (emit(gm, aten.sub.Tensor, (l1, m), like),), like)
    e2 = emit(gm, aten.exp.default, (emit(gm, aten.sub.Tensor, (l2, m), like),), like)
    total = emit(gm, aten.add.Tensor, (e1, e2), like)
    lse = emit(gm, aten.add.Tensor, (m, emit(gm, aten.log.default, (total,), like)), like)
    w1, w2 = (emit(gm, aten.unsqueeze.default, (emit(gm, aten.div.Tensor, (e, total), like), -1), like)
              for e in (e1, e2))
    out = emit(gm, aten.add.Tensor, (emit(gm, aten.mul.Tensor, (o1, w1), like),
                                     emit(gm, aten.mul.Tensor, (o2, w2), like)), like)
    return out, lse


def emit_ring(gm: fx.GraphModule, like: fx.Node, q: fx.Node, k: fx.Node, v: fx.Node, *, scale: float,
              steps: list[RingStep], ring: int, key_dim: int, q_seg: fx.Node | None,
              k_seg_of: Callable[[int], fx.Node | None]) -> fx.Node:
    """The unrolled ring for one attention; returns its output [B, H, L, D] (float32: the merge's sums; under
    bf16 autocast the next matmul casts it, and no block output is copied to float32 to be saved).
    `key_dim`: the width of k's heads (v's may differ); `k_seg_of(source)`: the segment ids [B, L] of a source ring rank's
    tokens (None: no packed samples). (q, k, v may be new nodes without shapes: sizes come as arguments.)"""
    length = steps[0].blocks[0].q1
    bounds = sorted({b.q0 for s in steps for b in s.blocks} | {b.q1 for s in steps for b in s.blocks})
    runs = list(zip(bounds[:-1], bounds[1:]))
    acc: dict[tuple[int, int], tuple[fx.Node, fx.Node]] = {}
    cur = emit(gm, aten.cat.default, ([k, v], WIDTH_DIM), like)  # one tensor travels: [B, Hkv, L, Dk + Dv]
    for s in steps:
        nxt = emit(gm, gl.cp_ring_shift.default, (cur, 1, ring, "cp_ring"), like) if s.step + 1 < ring else None
        kk = emit(gm, aten.slice.Tensor, (cur, WIDTH_DIM, 0, key_dim), like)
        vv = emit(gm, aten.slice.Tensor, (cur, WIDTH_DIM, key_dim, None), like)
        k_seg = k_seg_of(s.source)
        for b in s.blocks:
            res = emit(gm, gl.attention_block.default, (
                _rows(gm, q, SEQ_DIM, b.q0, b.q1, length, like), _rows(gm, kk, SEQ_DIM, b.k0, b.k1, length, like),
                _rows(gm, vv, SEQ_DIM, b.k0, b.k1, length, like), _rows(gm, q_seg, 1, b.q0, b.q1, length, like),
                _rows(gm, k_seg, 1, b.k0, b.k1, length, like), scale, b.causal), like)
            out = emit(gm, operator.getitem, (res, 0), like)  # merged with float32 weights: float32 sums
            lse = emit(gm, operator.getitem, (res, 1), like)
            for a, z in runs:
                if not (b.q0 <= a and z <= b.q1):
                    continue
                part = (_rows(gm, out, SEQ_DIM, a - b.q0, z - b.q0, b.q1 - b.q0, like),
                        _rows(gm, lse, SEQ_DIM, a - b.q0, z - b.q0, b.q1 - b.q0, like))
                acc[(a, z)] = _merge(gm, acc[(a, z)], part, like) if (a, z) in acc else part
        cur = nxt
    outs = [acc[r][0] for r in runs]
    return outs[0] if len(outs) == 1 else emit(gm, aten.cat.default, (outs, SEQ_DIM), like)


def ulysses_in(gm: fx.GraphModule, x: fx.Node, degree: int, like: fx.Node) -> fx.Node:
    """[B, h, S/U, D] → [B, h/U, S, D] over "cp_ulysses"; fewer heads than U are repeated up to U first."""
    heads = x.meta["val"].shape[HEAD_DIM]
    if heads < degree:
        x = emit(gm, aten.repeat_interleave.self_int, (x, degree // heads, HEAD_DIM), like)
    return emit(gm, gl.cp_all_to_all.default, (x, HEAD_DIM, SEQ_DIM, degree, "cp_ulysses"), like)


def ulysses_out(gm: fx.GraphModule, x: fx.Node, degree: int, like: fx.Node) -> fx.Node:
    """[B, H/U, S, D] → [B, H, S/U, D]: the inverse all-to-all."""
    return emit(gm, gl.cp_all_to_all.default, (x, SEQ_DIM, HEAD_DIM, degree, "cp_ulysses"), like)
