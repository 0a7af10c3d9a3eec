"""Multi-head attention with GQA and RoPE, in the forms fuse_attention matches.

Three forms: SDPA `is_causal=True` (no mask), SDPA with a boolean mask (packed rows, sliding windows), and
eager matmul/softmax (an additive causal mask, or masked_fill with a boolean mask). Soft-capped scores
(Gemma 2: cap · tanh(s / cap)) cannot go through SDPA, so such layers are always eager, as in transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import apply_rotary, make_norm, repeat_kv


class Attention(nn.Module):
    """Causal attention of one layer; no padding mask. Parameter names are HF's (q/k/v/o_proj, q/k_norm)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scaling = cfg.attention_scale
        self.softcap = cfg.attn_logit_softcapping
        self.interleaved = cfg.rope_interleaved
        self.attn_implementation = cfg.attn_implementation
        qkv_bias = cfg.attention_bias
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, H * D, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, Hkv * D, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, Hkv * D, bias=qkv_bias)
        self.o_proj = nn.Linear(H * D, cfg.hidden_size, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = make_norm(cfg, D)
            self.k_norm = make_norm(cfg, D)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, S, hidden] -> q [B, H, S, D], k, v [B, Hkv, S, D], q/k normed (qk_norm) and RoPE-rotated."""
        B, S, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, S, H, D).transpose(1, 2)  # [B, H, S, D]
        k = self.k_proj(x).view(B, S, Hkv, D).transpose(1, 2)  # [B, Hkv, S, D]
        v = self.v_proj(x).view(B, S, Hkv, D).transpose(1, 2)  # [B, Hkv, S, D]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q, cos, sin, interleaved=self.interleaved)
        k = apply_rotary(k, cos, sin, interleaved=self.interleaved)
        return q, k, v

    def cap(self, scores: torch.Tensor) -> torch.Tensor:
        """Soft-capped scores cap · tanh(scores / cap) (Gemma 2), or the scores unchanged."""
        if self.softcap is None:
            return scores
        return torch.tanh(scores / self.softcap) * self.softcap

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal_mask: torch.Tensor | None,
               mask: torch.Tensor | None, *, sdpa: bool) -> torch.Tensor:
        """softmax(q kᵀ · scale [capped] + mask) v, then o_proj: [B, S, hidden].

        `mask`: bool [S, S] or [B, 1, S, S], True where query i may see key j (window, packed rows); None:
        plain causal, which eager attention takes as the additive `causal_mask` [S, S]."""
        B, H, S, D = q.shape
        Hkv = self.num_kv_heads
        if mask is not None and sdpa and self.softcap is None:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=(Hkv != H)
            )  # [B, H, S, D]
        elif sdpa and self.softcap is None:
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.scaling, enable_gqa=(Hkv != H)
            )  # [B, H, S, D]
        else:
            assert causal_mask is not None or mask is not None, "eager attention needs a mask from the model"
            k = repeat_kv(k, H // Hkv)  # [B, H, S, D]
            v = repeat_kv(v, H // Hkv)
            scores = self.cap(torch.matmul(q, k.transpose(2, 3)) * self.scaling)  # [B, H, S, S]
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + causal_mask
            probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(probs, v)  # [B, H, S, D]
        out = out.transpose(1, 2).reshape(B, S, H * D)  # [B, S, H*D]
        return self.o_proj(out)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, causal_mask: torch.Tensor | None,
        sample_mask: torch.Tensor | None = None, window_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # x [B, S, hidden]; cos, sin [1 or B, 1, S, R]; causal_mask [S, S] (eager only); sample_mask bool
        # [B, 1, S, S] (packed rows); window_mask bool [S, S] or [B, 1, S, S] (a window shorter than S)
        q, k, v = self.qkv(x, cos, sin)
        mask = window_mask if window_mask is not None else sample_mask
        return self.attend(q, k, v, causal_mask, mask, sdpa=self.attn_implementation == "sdpa")
