"""graphllm::attention — softmax(q kᵀ · scale + causal mask) v, layout BNSD, grouped-query aware.

q is [B, H, S, D]; k and v are [B, Hkv, S, D] with H a multiple of Hkv (each kv head serves
H / Hkv consecutive query heads, as HF's repeat_kv). Raised by `fuse_attention` from SDPA or from
the eager matmul-softmax-matmul form; lowered to SDPA for inductor and to `npu_fusion_attention`
(input_layout="BNSD", sparse_mode for causal) for torchair. The backward rule recomputes the
probabilities (flash-attention style: nothing of size S×S is saved).

graphllm::varlen_attention (packed samples) and graphllm::window_attention (a causal sliding window, as
Mistral and Gemma's local layers) follow below with the same layout and backward rule.
"""

import torch
from torch import Tensor

from graphllm.ops.autocast import register_autocast_policy
import torch.nn.functional as F


def attention_decomposed(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> Tensor:
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=causal, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )


@torch.library.custom_op("graphllm::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> Tensor:
    # contiguous: the fake function promises a contiguous result, and traced graphs rely on it
    return attention_decomposed(q, k, v, scale, causal).contiguous()


@attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> Tensor:
    torch._check(q.shape[1] % k.shape[1] == 0, lambda: "query heads must be a multiple of kv heads")
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _setup(ctx, inputs, output):
    q, k, v, scale, causal = inputs
    ctx.save_for_backward(q, k, v)
    ctx.scale, ctx.causal = scale, causal


def _attention_grads(q: Tensor, k: Tensor, v: Tensor, grad_out_BHSD: Tensor, scale: float,
                     masked_SS: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of softmax(q kᵀ · scale, masked where `masked_SS` is True) v; probabilities recomputed."""
    groups = q.shape[1] // k.shape[1]
    k_BHSD = k.repeat_interleave(groups, dim=1)
    v_BHSD = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k_BHSD.transpose(-2, -1)).to(torch.float32) * scale  # [B,H,S,S]
    if masked_SS is not None:
        scores = scores.masked_fill(masked_SS, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    g32 = grad_out_BHSD.to(torch.float32)
    grad_v = torch.matmul(probs.transpose(-2, -1), g32)  # [B,H,S,D]
    grad_p = torch.matmul(g32, v_BHSD.to(torch.float32).transpose(-2, -1))
    grad_s = probs * (grad_p - (grad_p * probs).sum(-1, keepdim=True)) * scale
    grad_q = torch.matmul(grad_s, k_BHSD.to(torch.float32))
    grad_k = torch.matmul(grad_s.transpose(-2, -1), q.to(torch.float32))

    def fold_groups(g: Tensor) -> Tensor:  # [B,H,S,D] -> [B,Hkv,S,D], summing each group
        b, h, s, d = g.shape
        return g.view(b, h // groups, groups, s, d).sum(2)

    return grad_q.to(q.dtype), fold_groups(grad_k).to(k.dtype), fold_groups(grad_v).to(v.dtype)


def _backward(ctx, grad_out_BHSD):
    q, k, v = ctx.saved_tensors
    mask = None
    if ctx.causal:
        s_q, s_k = q.shape[-2], k.shape[-2]
        # top-left aligned like SDPA's is_causal: query i sees keys 0..i
        mask = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).triu(1)
    return (*_attention_grads(q, k, v, grad_out_BHSD, ctx.scale, mask), None, None)


attention.register_autograd(_backward, setup_context=_setup)
register_autocast_policy("graphllm::attention", torch.bfloat16)


# -- graphllm::varlen_attention: causal attention inside packed samples --------------------------------
#
# Rows hold several samples back to back; `segment_ids` [B, S] (non-decreasing per row) says which sample
# each token belongs to, and a query attends only to keys of its own sample at or before it. This is what
# npu_fusion_attention computes in TND layout from actual_seq_qlen / actual_seq_kvlen (the cumulative
# sample ends over the flattened batch); the decomposition is SDPA with a block-diagonal causal mask.


def segment_causal_mask(segment_ids: Tensor) -> Tensor:
    """[B, S] segment ids -> bool [B, 1, S, S], True where query i may attend to key j."""
    S = segment_ids.shape[-1]
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # [B, 1, S, S]
    causal = torch.ones(S, S, dtype=torch.bool, device=segment_ids.device).tril()  # [S, S]
    return same & causal


def varlen_attention_decomposed(q: Tensor, k: Tensor, v: Tensor, segment_ids: Tensor, scale: float) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=segment_causal_mask(segment_ids), scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


@torch.library.custom_op("graphllm::varlen_attention", mutates_args=())
def varlen_attention(q: Tensor, k: Tensor, v: Tensor, segment_ids: Tensor, scale: float) -> Tensor:
    return varlen_attention_decomposed(q, k, v, segment_ids, scale).contiguous()


@varlen_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, segment_ids: Tensor, scale: float) -> Tensor:
    torch._check(q.shape[1] % k.shape[1] == 0, lambda: "query heads must be a multiple of kv heads")
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _varlen_setup(ctx, inputs, output):
    q, k, v, segment_ids, scale = inputs
    ctx.save_for_backward(q, k, v, segment_ids)
    ctx.scale = scale


def _varlen_backward(ctx, grad_out_BHSD):
    q, k, v, segment_ids = ctx.saved_tensors
    masked = ~segment_causal_mask(segment_ids)  # [B, 1, S, S] broadcast over heads
    return (*_attention_grads(q, k, v, grad_out_BHSD, ctx.scale, masked), None, None)


varlen_attention.register_autograd(_varlen_backward, setup_context=_varlen_setup)
register_autocast_policy("graphllm::varlen_attention", torch.bfloat16)


# -- graphllm::window_attention: causal attention over a sliding window ------------------------------------
#
# Query i sees keys j with i - window < j <= i: the `window` most recent tokens, itself included (Mistral's
# and Gemma's `sliding_window`, as transformers masks it). npu_fusion_attention computes exactly this band
# with sparse_mode 4 and pre_tockens = window - 1, next_tockens = 0; the decomposition is SDPA with the mask.


def window_causal_mask(s_q: int, s_k: int, window: int, device: torch.device | None = None) -> Tensor:
    """bool [Sq, Sk], True where query i may attend to key j (top-left aligned, as SDPA's is_causal)."""
    i = torch.arange(s_q, device=device)[:, None]
    j = torch.arange(s_k, device=device)[None, :]
    return (j <= i) & (i - j < window)


def window_attention_decomposed(q: Tensor, k: Tensor, v: Tensor, scale: float, window: int) -> Tensor:
    mask = window_causal_mask(q.shape[-2], k.shape[-2], window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


@torch.library.custom_op("graphllm::window_attention", mutates_args=())
def window_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, window: int) -> Tensor:
    return window_attention_decomposed(q, k, v, scale, window).contiguous()


@window_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, scale: float, window: int) -> Tensor:
    torch._check(q.shape[1] % k.shape[1] == 0, lambda: "query heads must be a multiple of kv heads")
    torch._check(window > 0, lambda: "the window must hold at least the query's own token")
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _window_setup(ctx, inputs, output):
    q, k, v, scale, window = inputs
    ctx.save_for_backward(q, k, v)
    ctx.scale, ctx.window = scale, window


def _window_backward(ctx, grad_out_BHSD):
    q, k, v = ctx.saved_tensors
    masked = ~window_causal_mask(q.shape[-2], k.shape[-2], ctx.window, q.device)
    return (*_attention_grads(q, k, v, grad_out_BHSD, ctx.scale, masked), None, None)


window_attention.register_autograd(_window_backward, setup_context=_window_setup)
register_autocast_policy("graphllm::window_attention", torch.bfloat16)
