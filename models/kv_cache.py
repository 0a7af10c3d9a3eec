"""Inference forwards of LlamaForCausalLM over a static KV cache: prefill and one-token decode.

These are separate modules that reuse the model's own submodules (and so its Parameters), leaving
`LlamaForCausalLM.forward`, the training graph, untouched. Both have static shapes, so each is
captured and compiled once (graphllm.generate):

- `PrefillStep(ids [B, S], lengths [B]) -> (logits [B, V], k [L, B, Hkv, S, D], v [L, B, Hkv, S, D])`:
  right-padded prompts (row b's real tokens are ids[b, :lengths[b]]), causal attention, so padding
  after a row's last token changes none of its real positions; the logits are those of each row's
  last real token. k/v are RoPE-rotated, ready to be copied into cache positions [0, S).
- `DecodeStep(ids [B, 1], pos [B], k_cache, v_cache [L, B, Hkv, M, D]) -> (logits [B, V],
  k_new, v_new [L, B, Hkv, 1, D])`: one new token per row at its own position `pos[b]`; it attends
  to cache positions j < pos[b] plus its own key, which is not in the cache yet. The caller writes
  k_new/v_new at pos (graphllm.generate.engine, a scatter_ into the preallocated cache), so the graph
  stays functional (no input mutation) and never copies the cache.

The arithmetic follows models/llama.py (same RMSNorm/SwiGLU modules, the rotate_half RoPE form and
SDPA, which the passes fuse); decode attention is plain matmul/softmax ops, a form fuse_attention
does not claim (its op is square causal attention).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .llama import LlamaAttention, LlamaForCausalLM, rotate_half


def _rope_tables(inv_freq: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [...] -> cos, sin [..., D] in `dtype` (angles in float32, as LlamaModel does)."""
    freqs = pos[..., None].float() * inv_freq  # [..., D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [..., D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _qkv(attn: LlamaAttention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """x [B, S, hidden] -> q [B, H, S, D], k, v [B, Hkv, S, D], RoPE applied to q and k."""
    B, S, _ = x.shape
    H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(B, S, H, D).transpose(1, 2)
    k = attn.k_proj(x).view(B, S, Hkv, D).transpose(1, 2)
    v = attn.v_proj(x).view(B, S, Hkv, D).transpose(1, 2)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    return q, k, v


class PrefillStep(nn.Module):
    """Prompt forward that also returns every layer's keys and values (see module docstring)."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        super().__init__()
        # the model's own children, so parameter paths are the model's (model.layers.*, lm_head) and
        # name-based plans (passes/tp_plan.py) apply to these graphs as to the training graph
        self.model, self.lm_head = model.model, model.lm_head
        self.config = model.config

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor):
        inner = self.model
        B, S = ids.shape
        h = inner.embed_tokens(ids)  # [B, S, hidden]
        cos, sin = _rope_tables(inner.inv_freq, torch.arange(S, device=ids.device), h.dtype)  # [S, D]
        cos, sin = cos[None, None], sin[None, None]  # [1, 1, S, D]
        ks, vs = [], []
        for layer in inner.layers:
            attn = layer.self_attn
            q, k, v = _qkv(attn, layer.input_layernorm(h), cos, sin)
            ks.append(k)
            vs.append(v)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling,
                                                 enable_gqa=attn.num_kv_heads != attn.num_heads)  # [B, H, S, D]
            h = h + attn.o_proj(out.transpose(1, 2).reshape(B, S, attn.num_heads * attn.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        last = h[torch.arange(B, device=ids.device), lengths - 1]  # [B, hidden]: each row's last real token
        logits = self.lm_head(inner.norm(last))  # [B, V]
        return logits, torch.stack(ks), torch.stack(vs)  # [L, B, Hkv, S, D] each


class DecodeStep(nn.Module):
    """One token per row over the static cache (see module docstring)."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        super().__init__()
        # the model's own children, so parameter paths are the model's (model.layers.*, lm_head) and
        # name-based plans (passes/tp_plan.py) apply to these graphs as to the training graph
        self.model, self.lm_head = model.model, model.lm_head
        self.config = model.config

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
        inner = self.model
        B = ids.shape[0]
        M = k_cache.shape[3]
        h = inner.embed_tokens(ids)  # [B, 1, hidden]
        cos, sin = _rope_tables(inner.inv_freq, pos, h.dtype)  # [B, D]
        cos, sin = cos[:, None, None], sin[:, None, None]  # [B, 1, 1, D]
        valid = torch.arange(M, device=ids.device)[None, :] < pos[:, None]  # [B, M]: filled cache slots
        masked = ~valid[:, None, None, :]  # [B, 1, 1, M]
        neg = torch.finfo(h.dtype).min
        ks, vs = [], []
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
            q, k, v = _qkv(attn, layer.input_layernorm(h), cos, sin)  # q [B, H, 1, D]; k, v [B, Hkv, 1, D]
            ks.append(k)
            vs.append(v)
            qg = q.reshape(B, Hkv, H // Hkv, D)  # query heads grouped by the kv head they share (HF repeat_kv order)
            s_cache = torch.matmul(qg, k_cache[i].transpose(2, 3)) * attn.scaling  # [B, Hkv, rep, M]
            s_cache = s_cache.masked_fill(masked, neg)
            s_self = (qg * k).sum(-1, keepdim=True) * attn.scaling  # [B, Hkv, rep, 1]
            probs = F.softmax(torch.cat((s_cache, s_self), dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(probs[..., :M], v_cache[i]) + probs[..., M:] * v  # [B, Hkv, rep, D]
            h = h + attn.o_proj(out.reshape(B, 1, H * D))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = self.lm_head(inner.norm(h[:, 0]))  # [B, V]
        return logits, torch.stack(ks), torch.stack(vs)  # [L, B, Hkv, 1, D] each
