"""fuse_linear_cross_entropy: raise `cross_entropy(linear(h, W) → casts/reshapes)` to graphllm::linear_cross_entropy.

The captured training graph ends in

    logits = linear(hidden [B, S, H], W [V, H])          # bf16 under autocast
    cross_entropy_loss(flatten(logits.float(), 0, 1), labels.flatten(), reduction, ignore_index)

and the fused op (ops/linear_cross_entropy.py) computes the same loss a vocabulary chunk at a time, so neither the
forward nor the backward holds the [N, V] logits. Legal because the op computes exactly that cross-entropy — the
matmul in the linear's dtype, the log-sum-exp in fp32 as after `.float()` — with the softmax's sums split over
chunks: results change by reduction order only. Every reduction F.cross_entropy has (mean, sum, none: DPO's
per-token log-probabilities) maps onto the op's.

Refused, and why:
- anything between the linear and the loss but reshapes that keep the vocabulary as the last dimension and casts
  to fp32: soft-capping (`tanh(logits / c) * c`, Gemma 2), a temperature, a gather (PRM's reward tokens) change
  the logits the loss reads;
- logits with another user (returned, or read by another op): they would be computed anyway;
- a loss on non-fp32 logits (the op's log-sum-exp is fp32: other numbers), class weights, label smoothing (the op
  has neither), a linear with a bias (an LM head has none);
- a head whose weight's module path matches `exclude` (the pipeline passes the LoRA targets, so that a LoRA plan
  adapting lm_head gets its linear).

Left alone too when the fp32 logits [tokens, vocab] are under `min_bytes` (default MIN_LOGITS_BYTES): there the
unfused head is faster and its logits are not what bounds memory (`--fused-loss on` sets 0, `off` drops the pass).

Options: `chunks` (vocabulary chunks; default: `vocab_chunks` of the tokens and the vocabulary), `exclude`,
`min_bytes`.
Under tensor parallelism, tensor_parallel's vocab_head style rewrites the op into its vocabulary-parallel form
(passes/vocab_parallel.py).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from graphllm.ops.linear_cross_entropy import linear_cross_entropy
from graphllm.passes.graph_edit import emit
from graphllm.passes.lora import matches, module_path
from graphllm.passes.manager import PassContext, graph_pass
from graphllm.passes.matching import aten, arg, calls_to, finish, is_call, val

DEFAULT_CHUNKS = 8
"""Vocabulary chunks when one chunk's fp32 logits fit MAX_CHUNK_BYTES: an eighth of the logits at a time (small-llama:
512 tokens × 4000 rows, 7.8 MiB), and a loop short enough to unroll."""
MAX_CHUNK_BYTES = 256 * 2**20
"""More chunks when a chunk's fp32 logits [N, V/K] would exceed this (long sequences, large vocabularies)..."""
MAX_CHUNKS = 64
"""...up to this many (the traced graph holds one copy of the chunk's ops per chunk)."""

MIN_LOGITS_BYTES = 2**30
"""Fuse when the fp32 logits reach 1 GiB (Llama-3's 128k vocabulary at 2048 tokens a micro-batch; 8 × 4096 tokens at
a 32k vocabulary is 4 GiB): the logits, their softmax and its gradient then lead the step's peak. Below it the
trade is poor — small-llama at 4 × 512 tokens (262 MB of logits) saves 213 MiB of peak for a 5% slower step and at
1 × 512 saves nothing for 7% (benchmarks/fused_loss.py, 2-core CPU)."""

_RESHAPES = (aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_CASTS = (aten._to_copy.default, aten.to.dtype)


def vocab_chunks(tokens: int, vocab: int) -> int:
    """How many vocabulary chunks the op computes the loss in, for `tokens` rows and `vocab` columns."""
    wanted = max(DEFAULT_CHUNKS, math.ceil(tokens * vocab * 4 / MAX_CHUNK_BYTES))
    return max(1, min(wanted, MAX_CHUNKS, vocab))


def _is_fp32_cast(node: fx.Node) -> bool:
    if is_call(node, aten._to_copy.default):
        return set(node.kwargs) <= {"dtype"} and node.kwargs.get("dtype") == torch.float32 and len(node.args) == 1
    return is_call(node, aten.to.dtype) and node.args[1:] == (torch.float32,) and not node.kwargs


def _head(logits: fx.Node, vocab_last: int | None) -> fx.Node | None:
    """The linear that `logits` comes from through single-user reshapes keeping the vocabulary last and fp32
    casts, or None."""
    node = logits
    while is_call(node, *_RESHAPES, *_CASTS):
        v = val(node)
        if len(node.users) != 1 or v is None or v.shape[-1] != vocab_last:
            return None  # another reader of the logits, or a reshape that moves the vocabulary dimension
        if is_call(node, *_CASTS) and not _is_fp32_cast(node):
            return None
        node = node.args[0]
    if not is_call(node, aten.linear.default) or len(node.users) != 1:
        return None
    if (node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")) is not None:
        return None
    return node


@graph_pass("fuse_linear_cross_entropy", stage="model")
def fuse_linear_cross_entropy(gm: fx.GraphModule, ctx: PassContext, *, chunks: int | None = None,
                              exclude: tuple[str, ...] = (), min_bytes: int = MIN_LOGITS_BYTES) -> fx.GraphModule:
    replaced = 0
    for ce in calls_to(gm, aten.cross_entropy_loss.default):
        logits, target = ce.args[0], ce.args[1]
        if arg(ce, 2, "weight") is not None or arg(ce, 5, "label_smoothing", 0.0):
            continue  # the op has no class weights and no label smoothing
        lv, tv = val(logits), val(target)
        if lv is None or tv is None or lv.dim() != 2 or lv.dtype != torch.float32 or tv.dim() != 1:
            continue  # a loss over bf16 logits computes its log-sum-exp in bf16: not the op's numbers
        if lv.numel() * 4 < min_bytes:
            continue  # small logits: the unfused head is faster (MIN_LOGITS_BYTES)
        lin = _head(logits, lv.shape[-1])
        if lin is None:
            continue
        hidden, weight = lin.args[0], lin.args[1]
        hv, wv = val(hidden), val(weight)
        if hv is None or wv is None or wv.dim() != 2 or wv.shape[0] != lv.shape[1] or hv.numel() != lv.shape[0] * wv.shape[1]:
            continue
        if exclude and weight.op == "get_attr" and matches(module_path(weight.target), exclude):
            continue  # a LoRA target: the lora pass adapts this linear
        fake_mode = detect_fake_mode([hv, wv, tv])
        if fake_mode is None:
            continue  # no fake tensors to derive the op's output metadata from (not a captured graph)
        k = chunks or vocab_chunks(lv.shape[0], lv.shape[1])
        args = (hidden, weight, target, arg(ce, 4, "ignore_index", -100), arg(ce, 3, "reduction", 1),
                math.ceil(lv.shape[1] / k))
        with gm.graph.inserting_before(ce):
            fused = emit(gm, linear_cross_entropy._opoverload, args, lin)
            loss = emit(gm, operator.getitem, (fused, 0), lin)
        with fake_mode:
            fused.meta["val"] = linear_cross_entropy._opoverload(hv, wv, tv, *args[3:])
        loss.meta["val"] = ce.meta.get("val")
        ce.replace_all_uses_with(loss)
        gm.graph.erase_node(ce)
        replaced += 1
    return finish(gm, ctx, replaced)
