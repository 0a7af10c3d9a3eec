"""graphllm::attention_block — attention of query rows against one block of keys, with its log-sum-exp.

Ring attention (context parallelism) computes attention block by block: each ring step attends the local
queries to one block of keys/values and merges the partial results by the log-sum-exp rule

    lse = logaddexp(lse1, lse2);  out = out1 · exp(lse1 − lse) + out2 · exp(lse2 − lse)

which is exact because softmax over the union of the blocks is each block's softmax reweighted by its share
of the total mass. So the op returns `lse` beside `out`, and its backward takes a gradient for both (the merge
differentiates through lse). Layout BNSD, grouped-query aware as graphllm::attention (query head h uses kv
head h // (H / Hkv)); `causal` is SDPA's top-left aligned mask (the diagonal block); `q_segment`/`k_segment`
restrict each query to keys of its own packed sample.

A query row that sees no key of the block (possible with segments) has out = 0 and lse = −inf, the identity
of the merge, and gets zero gradients; nothing produces NaN. Lowered to `attention_block_decomposed` for
inductor and to npu_fusion_attention (softmax_max, softmax_sum -> lse) for torchair. The backward rule saves
q, k, v, the segments and lse only, and recomputes the probabilities and out (flash-attention style).

The op's kernel (what the eager backend runs) and its backward rule take the query rows QUERY_CHUNK at a time,
so their fp32 intermediates are [B, H, chunk, Sk] instead of [B, H, Sq, Sk]; each chunk is the dense math of
`attention_block_decomposed` on its rows (rows are independent: softmax and lse are per row), dk and dv sum
over the chunks. A causal chunk skips the keys after its last row instead of masking them. The decomposition
itself stays dense: inductor fuses and tiles it on its own.
"""

import torch
from torch import Tensor

from graphllm.ops.autocast import register_autocast_policy

_NEG_INF = float("-inf")

QUERY_CHUNK = 1024
"""Query rows per chunk of the kernel and the backward rule (read at call time, so tests can shrink it). The
peak is a few [B, H, chunk, Sk] fp32 tensors: 256 MiB each for 8 heads × 8K keys, where the whole 8K-row block
took 2 GiB each; 1024 rows keep every matmul large enough to run at GEMM speed."""


def _check_segments(q_segment: Tensor | None, k_segment: Tensor | None) -> None:
    if (q_segment is None) != (k_segment is None):
        raise ValueError("attention_block: give both q_segment and k_segment or neither, got "
                         f"q_segment={'a tensor' if q_segment is not None else None}, "
                         f"k_segment={'a tensor' if k_segment is not None else None}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The scores and lse dtype: float32 for 16- and 32-bit inputs (float64 inputs keep float64, so
    gradcheck can check the op at float64 precision)."""
    return torch.promote_types(dtype, torch.float32)


def block_visible(q_segment: Tensor | None, k_segment: Tensor | None, causal: bool, s_q: int, s_k: int,
                  device: torch.device, *, q_offset: int = 0) -> Tensor | None:
    """bool, True where query i may see key j: [B, 1, Sq, Sk] with segments, [Sq, Sk] causal only, None when
    every key is visible. `q_offset`: the block row of query 0 (a chunk of the block's rows; causal only)."""
    _check_segments(q_segment, k_segment)
    visible = None
    if causal:  # top-left aligned like SDPA's is_causal: query i (block row q_offset + i) sees keys 0..q_offset+i
        visible = torch.ones(s_q, s_k, dtype=torch.bool, device=device).tril(q_offset)
    if q_segment is not None:
        same = q_segment[:, None, :, None] == k_segment[:, None, None, :]  # [B, 1, Sq, Sk]
        visible = same if visible is None else same & visible
    return visible


def _scores(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """[B, H, Sq, Sk] q·kᵀ·scale in the compute dtype, kv heads repeated for GQA."""
    dtype = compute_dtype(q.dtype)
    k_BHSD = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return torch.matmul(q.to(dtype), k_BHSD.to(dtype).transpose(-2, -1)) * scale


def attention_block_decomposed(q: Tensor, k: Tensor, v: Tensor, q_segment: Tensor | None, k_segment: Tensor | None,
                               scale: float, causal: bool, *, q_offset: int = 0) -> tuple[Tensor, Tensor]:
    """The reference math in plain torch ops, dense (the inductor lowering, and the kernel's math per chunk of
    rows starting at block row `q_offset`); autograd through it is finite for rows that see no key: their lse is
    selected (torch.where) rather than computed from −inf."""
    scores = _scores(q, k, scale)  # [B, H, Sq, Sk]
    visible = block_visible(q_segment, k_segment, causal, q.shape[-2], k.shape[-2], q.device, q_offset=q_offset)
    if visible is None:
        lse = lse_safe = torch.logsumexp(scores, dim=-1)  # [B, H, Sq]
    else:
        scores = scores.masked_fill(~visible, _NEG_INF)  # exp(−inf − finite) = 0: masked keys weigh nothing
        seen = visible.any(-1)  # [B, 1, Sq] or [Sq]: the row sees at least one key
        # a row that sees nothing takes the logsumexp of zeros instead of −inf (finite forward and backward;
        # the where below discards it, so its gradient is zero)
        lse_safe = torch.logsumexp(scores.masked_fill(~seen[..., None], 0.0), dim=-1)
        lse = torch.where(seen, lse_safe, _NEG_INF)
    probs = torch.exp(scores - lse_safe[..., None])
    v_BHSD = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    out = torch.matmul(probs, v_BHSD.to(probs.dtype)).to(q.dtype)  # [B, H, Sq, Dv]
    return out, lse


def row_chunks(s_q: int, s_k: int, causal: bool) -> list[tuple[int, int, int]]:
    """(q0, q1, k1) per chunk of QUERY_CHUNK query rows: rows [q0, q1) against keys [0, k1). A causal chunk's
    rows see no key at or after q1 (top-left aligned mask), so k1 = min(q1, Sk) skips them instead of masking."""
    return [(q0, min(q0 + QUERY_CHUNK, s_q), min(q0 + QUERY_CHUNK, s_q, s_k) if causal else s_k)
            for q0 in range(0, s_q, QUERY_CHUNK)]


def _rows(t: Tensor | None, start: int, stop: int) -> Tensor | None:
    """Positions [start, stop) of a [B, S] segment tensor (None stays None)."""
    return None if t is None else t[:, start:stop]


def attention_block_chunked(q: Tensor, k: Tensor, v: Tensor, q_segment: Tensor | None, k_segment: Tensor | None,
                            scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    """The op's kernel: `attention_block_decomposed` on each chunk of `row_chunks`, outputs concatenated."""
    chunks = row_chunks(q.shape[-2], k.shape[-2], causal)
    if len(chunks) <= 1:  # one chunk: the dense math as it is
        return attention_block_decomposed(q, k, v, q_segment, k_segment, scale, causal)
    parts = [attention_block_decomposed(q[:, :, q0:q1], k[:, :, :k1], v[:, :, :k1], _rows(q_segment, q0, q1),
                                        _rows(k_segment, 0, k1), scale, causal, q_offset=q0)
             for q0, q1, k1 in chunks]
    return torch.cat([o for o, _ in parts], dim=2), torch.cat([lse for _, lse in parts], dim=2)


@torch.library.custom_op("graphllm::attention_block", mutates_args=())
def attention_block(q: Tensor, k: Tensor, v: Tensor, q_segment: Tensor | None, k_segment: Tensor | None,
                    scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    out, lse = attention_block_chunked(q, k, v, q_segment, k_segment, scale, causal)
    # contiguous: the fake function promises contiguous results, and traced graphs rely on it
    return out.contiguous(), lse.contiguous()


@attention_block.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, q_segment: Tensor | None, k_segment: Tensor | None, scale: float,
      causal: bool) -> tuple[Tensor, Tensor]:
    _check_segments(q_segment, k_segment)
    torch._check(q.shape[1] % k.shape[1] == 0, lambda: "query heads must be a multiple of kv heads")
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=compute_dtype(q.dtype))


def attention_block_grads(q: Tensor, k: Tensor, v: Tensor, q_segment: Tensor | None, k_segment: Tensor | None,
                          lse: Tensor, grad_out: Tensor | None, grad_lse: Tensor | None, scale: float,
                          causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of (out, lse) = attention_block(...) from the saved lse; probabilities and out recomputed,
    all query rows at once (dense). Shared with the npu lowering (ops/lowering_npu.py), whose kernel has no lse
    input to its backward; the op's own rule is `attention_block_grads_chunked`."""
    dq, dk, dv = _grads(q, k, v, q_segment, k_segment, lse, grad_out, grad_lse, scale, causal, q_offset=0)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def attention_block_grads_chunked(q: Tensor, k: Tensor, v: Tensor, q_segment: Tensor | None,
                                  k_segment: Tensor | None, lse: Tensor, grad_out: Tensor | None,
                                  grad_lse: Tensor | None, scale: float, causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    """`attention_block_grads` QUERY_CHUNK query rows at a time (`row_chunks`): dq per chunk, dk and dv summed
    over the chunks in the compute dtype (rounded to the input dtype once, at the end)."""
    chunks = row_chunks(q.shape[-2], k.shape[-2], causal)
    if len(chunks) <= 1:
        return attention_block_grads(q, k, v, q_segment, k_segment, lse, grad_out, grad_lse, scale, causal)
    dtype = compute_dtype(q.dtype)
    dk, dv = k.new_zeros(k.shape, dtype=dtype), v.new_zeros(v.shape, dtype=dtype)  # [B, Hkv, Sk, D]
    dq_parts = []
    for q0, q1, k1 in chunks:
        dq, dk_part, dv_part = _grads(
            q[:, :, q0:q1], k[:, :, :k1], v[:, :, :k1], _rows(q_segment, q0, q1), _rows(k_segment, 0, k1),
            lse[:, :, q0:q1], None if grad_out is None else grad_out[:, :, q0:q1],
            None if grad_lse is None else grad_lse[:, :, q0:q1], scale, causal, q_offset=q0)
        dq_parts.append(dq)
        dk[:, :, :k1] += dk_part
        dv[:, :, :k1] += dv_part
    return torch.cat(dq_parts, dim=2).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _grads(q: Tensor, k: Tensor, v: Tensor, q_segment: Tensor | None, k_segment: Tensor | None, lse: Tensor,
           grad_out: Tensor | None, grad_lse: Tensor | None, scale: float, causal: bool, *,
           q_offset: int) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) in the compute dtype for query rows starting at block row `q_offset`.

    p = exp(s − lse), dv = pᵀ·dO, dp = dO·vᵀ, D = rowsum(dO ⊙ p·v), ds = p ⊙ (dp − D + dlse) · scale,
    dq = ds·k, dk = dsᵀ·q."""
    dtype = compute_dtype(q.dtype)
    groups = q.shape[1] // k.shape[1]
    k_BHSD = k.repeat_interleave(groups, dim=1).to(dtype)
    v_BHSD = v.repeat_interleave(groups, dim=1).to(dtype)
    scores = _scores(q, k, scale)  # [B, H, Sq, Sk]
    visible = block_visible(q_segment, k_segment, causal, q.shape[-2], k.shape[-2], q.device, q_offset=q_offset)
    if visible is not None:
        scores = scores.masked_fill(~visible, _NEG_INF)
    lse32 = lse.to(dtype)
    probs = torch.exp(scores - lse32.masked_fill(lse32 == _NEG_INF, 0.0)[..., None])  # rows that see nothing: 0
    if grad_out is None:
        grad_out = q.new_zeros((*q.shape[:-1], v.shape[-1]))
    g_out = grad_out.to(dtype)  # [B, H, Sq, Dv]
    row_term = (g_out * torch.matmul(probs, v_BHSD)).sum(-1, keepdim=True)  # D, with out recomputed as p·v
    if grad_lse is not None:
        row_term = row_term - grad_lse.to(dtype)[..., None]
    grad_s = probs * (torch.matmul(g_out, v_BHSD.transpose(-2, -1)) - row_term) * scale
    grad_q = torch.matmul(grad_s, k_BHSD)
    grad_k = torch.matmul(grad_s.transpose(-2, -1), q.to(dtype))
    grad_v = torch.matmul(probs.transpose(-2, -1), g_out)

    def fold_groups(g: Tensor) -> Tensor:  # [B,H,Sk,D] -> [B,Hkv,Sk,D], summing each group
        b, h, s, d = g.shape
        return g.view(b, h // groups, groups, s, d).sum(2)

    return grad_q, fold_groups(grad_k), fold_groups(grad_v)


def _setup(ctx, inputs, output):
    q, k, v, q_segment, k_segment, scale, causal = inputs
    ctx.save_for_backward(q, k, v, q_segment, k_segment, output[1])  # lse, not out: see attention_block_grads
    ctx.scale, ctx.causal = scale, causal


def _backward(ctx, grad_out, grad_lse):
    q, k, v, q_segment, k_segment, lse = ctx.saved_tensors
    grads = attention_block_grads_chunked(q, k, v, q_segment, k_segment, lse, grad_out, grad_lse, ctx.scale,
                                          ctx.causal)
    return (*grads, None, None, None, None)


attention_block.register_autograd(_backward, setup_context=_setup)
register_autocast_policy("graphllm::attention_block", torch.bfloat16)
