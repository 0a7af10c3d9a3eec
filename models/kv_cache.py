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

The arithmetic is the model's own (models/decoder.py: the layers' norms, attention projections, RoPE,
soft-capping and MLP, the same per-layer windows and RoPE bases; SDPA in the prefill unless scores are
soft-capped); decode attention is plain matmul/softmax ops, a form fuse_attention does not claim (its op
is square causal attention). A windowed layer's decode step sees the cache slots pos - W < j < pos.

Latent attention (DeepSeek-V3, models/mla.py) caches its compressed latent instead: the "k" cache holds the normed
latent c [L, B, 1, M, kv_lora_rank], the "v" cache the rotated shared k_rope [L, B, 1, M, qk_rope_head_dim]
(`cache_dims` gives the engine both shapes), and decode attends over them with kv_b_proj absorbed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .decoder import DecoderForCausalLM, DecoderModel
from .masks import window_masks


def cache_dims(cfg: ModelConfig) -> tuple[int, int, int]:
    """(heads, k width, v width) of one layer's cache entry per token: (Hkv, D, D), or for latent attention
    (1, kv_lora_rank, qk_rope_head_dim): the latent and the shared RoPE key."""
    if cfg.mla:
        return 1, cfg.kv_lora_rank, cfg.head_dim
    return cfg.num_key_value_heads, cfg.head_dim, cfg.head_dim


def _decode_masks(inner: DecoderModel, pos: torch.Tensor, M: int) -> dict[int | None, torch.Tensor]:
    """Window (None: full attention) -> bool [B, 1, 1, M], True at the cache slots a new token at `pos` must
    not see: it sees filled slots j < pos, within a window W only j > pos - W (its own key is added apart)."""
    cfg = inner._cfg
    slots = torch.arange(M, device=pos.device)[None, :]  # [1, M]
    valid = slots < pos[:, None]  # [B, M]: filled cache slots
    out: dict[int | None, torch.Tensor] = {None: ~valid[:, None, None, :]}
    for w in sorted({cfg.window_of(i) for i in range(cfg.num_hidden_layers)} - {None}):
        out[w] = ~(valid & (slots > pos[:, None] - w))[:, None, None, :]
    return out


class PrefillStep(nn.Module):
    """Prompt forward that also returns every layer's keys and values (see module docstring)."""

    def __init__(self, model: DecoderForCausalLM) -> None:
        super().__init__()
        # the model's own children, so parameter paths are the model's (model.layers.*, lm_head) and
        # name-based plans (passes/tp_plan.py) apply to these graphs as to the training graph
        self.model, self.lm_head = model.model, model.lm_head
        self.config = model.config
        self._logits = model.logits

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor):
        inner, cfg = self.model, self.config
        B, S = ids.shape
        h = inner.embed(ids)  # [B, S, hidden]
        tables = inner.rope_tables(S, None, h.dtype, ids.device)  # {local: cos, sin [1, 1, S, R]}
        causal_mask = None
        if cfg.attn_logit_softcapping is not None:  # soft-capped layers are eager: an additive causal mask
            causal_mask = torch.full((S, S), torch.finfo(h.dtype).min, dtype=h.dtype, device=ids.device).triu(1)
        windows = {cfg.window_of(i) for i in range(cfg.num_hidden_layers)} - {None}
        masks = window_masks(windows, S, None, ids.device)  # window -> bool [S, S]; none when window ≥ S
        ks, vs = [], []
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            cos, sin = tables[cfg.local_rope(i)]
            if cfg.mla:  # cache the latent c and k_rope (module docstring)
                q, c, k_rope = attn.latent(layer.attn_input(h), cos, sin)
                k, v = attn.expand(c, k_rope)
                ks.append(c)
                vs.append(k_rope)
            else:
                q, k, v = attn.qkv(layer.attn_input(h), cos, sin)
                ks.append(k)
                vs.append(v)
            out = attn.attend(q, k, v, causal_mask, masks.get(cfg.window_of(i)), sdpa=True)  # [B, S, hidden]
            h = layer.mlp_block(layer.add_attention(h, out))
        last = h[torch.arange(B, device=ids.device), lengths - 1]  # [B, hidden]: each row's last real token
        logits = self._logits(inner.norm(last))  # [B, V]
        return logits, torch.stack(ks), torch.stack(vs)  # [L, B, Hkv, S, D] each (cache_dims)


class DecodeStep(nn.Module):
    """One token per row over the static cache (see module docstring)."""

    def __init__(self, model: DecoderForCausalLM) -> None:
        super().__init__()
        # the model's own children, so parameter paths are the model's (model.layers.*, lm_head) and
        # name-based plans (passes/tp_plan.py) apply to these graphs as to the training graph
        self.model, self.lm_head = model.model, model.lm_head
        self.config = model.config
        self._logits = model.logits

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
        inner, cfg = self.model, self.config
        B = ids.shape[0]
        M = k_cache.shape[3]
        h = inner.embed(ids)  # [B, 1, hidden]
        tables = inner.rope_tables(1, pos, h.dtype, ids.device, index=(slice(None), None, None))  # [B, 1, 1, R]
        masked = _decode_masks(inner, pos, M)  # window -> [B, 1, 1, M]
        neg = torch.finfo(h.dtype).min
        ks, vs = [], []
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            cos, sin = tables[cfg.local_rope(i)]
            if cfg.mla:  # over the latent cache, kv_b_proj absorbed (models/mla.py)
                out, c, k_rope = attn.decode(layer.attn_input(h), cos, sin, k_cache[i], v_cache[i],
                                             masked[cfg.window_of(i)])
                ks.append(c)
                vs.append(k_rope)
                h = layer.mlp_block(layer.add_attention(h, out))
                continue
            H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
            q, k, v = attn.qkv(layer.attn_input(h), cos, sin)  # q [B, H, 1, D]; k, v [B, Hkv, 1, D]
            ks.append(k)
            vs.append(v)
            qg = q.reshape(B, Hkv, H // Hkv, D)  # query heads grouped by the kv head they share (HF repeat_kv order)
            s_cache = attn.cap(torch.matmul(qg, k_cache[i].transpose(2, 3)) * attn.scaling)  # [B, Hkv, rep, M]
            s_cache = s_cache.masked_fill(masked[cfg.window_of(i)], neg)
            s_self = attn.cap((qg * k).sum(-1, keepdim=True) * attn.scaling)  # [B, Hkv, rep, 1]
            probs = F.softmax(torch.cat((s_cache, s_self), dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(probs[..., :M], v_cache[i]) + probs[..., M:] * v  # [B, Hkv, rep, D]
            h = layer.mlp_block(layer.add_attention(h, attn.o_proj(out.reshape(B, 1, H * D))))
        logits = self._logits(inner.norm(h[:, 0]))  # [B, V]
        return logits, torch.stack(ks), torch.stack(vs)  # [L, B, Hkv, 1, D] each (cache_dims)
