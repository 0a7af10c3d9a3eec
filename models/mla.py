"""Multi-head latent attention (MLA) of DeepSeek-V3, as transformers' DeepseekV3Attention computes it.

Keys and values come from one compressed latent per token instead of per-head projections:

    query   q_a_proj → q_a_layernorm → q_b_proj (or one q_proj when q_lora_rank is None) [B, H, S, dn + dr]
    latent  kv_a_proj_with_mqa(x) = (c [B, S, r] → kv_a_layernorm, k_rope [B, S, dr] shared by every head)
    keys    kv_b_proj(c) = per head (k_nope [dn], v [dv]); k = (k_nope, k_rope) [B, H, S, dn + dr]

RoPE rotates only the last dr dims of q and the shared k_rope ("decoupled" RoPE, dr = head_dim). With
rope_interleave (DeepSeek's checkpoints) the rotary dims come in adjacent pairs; as transformers does, they are
gathered into (evens, odds) and rotated with rotate_half, which is bit-identical to rotating the pairs in place.
The softmax scale is qk_head_dim**-0.5 times YaRN's mscale(factor, mscale_all_dim)² (ModelConfig.attention_scale).

KV cache (models/kv_cache.py): generation caches the latent, not k/v: per layer and token kv_lora_rank +
qk_rope_head_dim values (the normed c and the rotated k_rope) against num_heads × (qk_head_dim + v_head_dim) for
plain k/v; for DeepSeek-V3 (r 512, dr 64, 128 heads, qk 192, v 128) 576 vs 40960 values, 71× fewer bytes. The
decode step never expands the cache: kv_b_proj is absorbed into the query (q_nope · W_ukᵀ, in latent space) and into
the output (latent-space attention output · W_uvᵀ), which is the same sum in another order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .config import ModelConfig
from .layers import RMSNorm, apply_rotary

# transformers builds q_a_layernorm and kv_a_layernorm with RMSNorm's default eps, not rms_norm_eps
LATENT_NORM_EPS = 1e-6


class LatentAttention(nn.Module):
    """Causal MLA of one layer; parameter names are transformers' (q_a_proj, kv_a_proj_with_mqa, ...).

    Same calling convention as models/attention.Attention (qkv, attend, forward), so the training forward and
    the prefill use it unchanged; `latent`/`expand` split qkv at the cached latent, `decode` attends over it."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        H, hidden, bias = cfg.num_attention_heads, cfg.hidden_size, cfg.attention_bias
        self.num_heads, self.num_kv_heads = H, H
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.head_dim, cfg.v_head_dim
        self.kv_lora_rank, self.q_lora_rank = cfg.kv_lora_rank, cfg.q_lora_rank
        self.qk_dim = cfg.qk_head_dim
        self.scaling = cfg.attention_scale
        self.interleaved = cfg.rope_interleaved
        self.attn_implementation = cfg.attn_implementation
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, H * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, cfg.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, hidden, bias=bias)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [..., dr] RoPE-rotated; interleaved pairs are first gathered as (evens, odds) (module docstring)."""
        if self.interleaved:
            x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        return apply_rotary(x, cos, sin)

    def latent(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, S, hidden] -> q [B, H, S, dn + dr] (RoPE part rotated), the normed latent c [B, 1, S, r] and the
        rotated shared k_rope [B, 1, S, dr]: what the KV cache holds."""
        B, S, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, S, self.num_heads, self.qk_dim).transpose(1, 2)  # [B, H, S, dn + dr]
        q_nope, q_rope = torch.split(q, [self.nope_dim, self.rope_dim], dim=-1)
        c, k_rope = torch.split(self.kv_a_proj_with_mqa(x), [self.kv_lora_rank, self.rope_dim], dim=-1)
        c = self.kv_a_layernorm(c)[:, None]  # [B, 1, S, r]
        k_rope = self.rotate(k_rope[:, None], cos, sin)  # [B, 1, S, dr]
        q = torch.cat((q_nope, self.rotate(q_rope, cos, sin)), dim=-1)
        return q, c, k_rope

    def expand(self, c: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent c [B, 1, S, r] and k_rope [B, 1, S, dr] -> k [B, H, S, dn + dr], v [B, H, S, dv]."""
        B, _, S, _ = c.shape
        H = self.num_heads
        kv = self.kv_b_proj(c[:, 0]).view(B, S, H, self.nope_dim + self.v_dim).transpose(1, 2)  # [B, H, S, dn + dv]
        k_nope, v = torch.split(kv, [self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_rope.expand(B, H, S, self.rope_dim)), dim=-1)
        return k, v

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, S, hidden] -> q, k [B, H, S, dn + dr], v [B, H, S, dv]."""
        q, c, k_rope = self.latent(x, cos, sin)
        return (q, *self.expand(c, k_rope))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal_mask: torch.Tensor | None,
               mask: torch.Tensor | None, *, sdpa: bool) -> torch.Tensor:
        """softmax(q kᵀ · scale + mask) v, then o_proj: [B, S, hidden]. `mask`: bool [S, S] or [B, 1, S, S] (packed
        rows), True where query i may see key j; None: causal, which eager attention takes as `causal_mask`."""
        B, H, S, _ = q.shape
        if sdpa and mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)  # [B, H, S, dv]
        elif sdpa:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling)
        else:
            assert causal_mask is not None or mask is not None, "eager attention needs a mask from the model"
            scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling  # [B, H, S, S]
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + causal_mask
            probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(probs, v)  # [B, H, S, dv]
        return self.o_proj(out.transpose(1, 2).reshape(B, S, H * self.v_dim))

    # x [B, S, hidden]; cos, sin [1 or B, 1, S, dr]; causal_mask [S, S] (eager only); sample_mask bool [B, 1, S, S]
    # (packed rows); window_mask: never (ModelConfig refuses windows for deepseek_v3). The same steps as plain
    # attention's over this class's qkv and attend.
    forward = Attention.forward

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, c_cache: torch.Tensor,
               rope_cache: torch.Tensor, masked: torch.Tensor):
        """One new token per row over the latent cache, kv_b_proj absorbed (module docstring).

        x [B, 1, hidden]; c_cache [B, 1, M, r], rope_cache [B, 1, M, dr]; masked bool [B, 1, 1, M], True at the
        slots not to see. The new token attends to itself apart (it is not in the cache yet). Returns o_proj's
        output [B, 1, hidden] and the new cache entries c [B, 1, 1, r], k_rope [B, 1, 1, dr]."""
        B, H, M = x.shape[0], self.num_heads, c_cache.shape[2]
        q, c, k_rope = self.latent(x, cos, sin)  # q [B, H, 1, dn + dr]
        q_nope, q_rope = torch.split(q, [self.nope_dim, self.rope_dim], dim=-1)
        w = self.kv_b_proj.weight.view(H, self.nope_dim + self.v_dim, self.kv_lora_rank)  # [H, dn + dv, r]
        w_uk, w_uv = torch.split(w, [self.nope_dim, self.v_dim], dim=1)  # [H, dn, r], [H, dv, r]
        q_lat = torch.matmul(q_nope, w_uk)  # [B, H, 1, r]: q_nope · k_nope = (q_nope W_uk) · c
        s_cache = torch.matmul(q_lat, c_cache.transpose(2, 3)) + torch.matmul(q_rope, rope_cache.transpose(2, 3))
        s_cache = (s_cache * self.scaling).masked_fill(masked, torch.finfo(x.dtype).min)  # [B, H, 1, M]
        s_self = ((q_lat * c).sum(-1, keepdim=True) + (q_rope * k_rope).sum(-1, keepdim=True)) * self.scaling
        probs = F.softmax(torch.cat((s_cache, s_self), dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)
        out_lat = torch.matmul(probs[..., :M], c_cache) + probs[..., M:] * c  # [B, H, 1, r]
        out = torch.matmul(out_lat, w_uv.transpose(1, 2))  # [B, H, 1, dv]
        return self.o_proj(out.transpose(1, 2).reshape(B, 1, H * self.v_dim)), c, k_rope
