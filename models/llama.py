"""A llama-family causal LM (llama, qwen2, mistral) written for capture by torch.export.

Parameter names equal Hugging Face state-dict keys, so HF checkpoints load without renaming.
Shapes are static and there is no data-dependent Python control flow: RoPE tables and the eager
causal mask are built from constants (the sequence length) once per forward in `LlamaModel`.

The arithmetic is written in fixed forms (RMSNorm, SwiGLU, rotate_half, attention) because graph
passes pattern-match them; change a form here only together with the pass that matches it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from graphllm.errors import GraphllmError

from .config import ModelConfig
from .rope import rope_inv_freq


IGNORE_INDEX = -100  # label value that contributes no loss (prompt tokens, padding)


class LlamaRMSNorm(nn.Module):
    """RMSNorm computed in float32, result cast back to the input dtype before the weight multiply."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype != torch.float32:
            x = x.to(torch.float32)
        var = x.pow(2).mean(-1, keepdim=True)  # [..., 1]
        x = x * torch.rsqrt(var + self.eps)
        if dtype != torch.float32:
            x = x.to(dtype)
        return self.weight * x

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        bias = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., D]: (x1, x2) -> (-x2, x1) on the two halves of the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, Hkv * n_rep, S, D], each kv head repeated n_rep times (HF's repeat_kv)."""
    if n_rep == 1:
        return x
    B, Hkv, S, D = x.shape
    x = x[:, :, None, :, :].expand(B, Hkv, n_rep, S, D)
    return x.reshape(B, Hkv * n_rep, S, D)


def packed_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] positions restarting at 0 per sample -> bool [B, 1, S, S]: key j visible to query i when
    both are in one sample and j ≤ i. (fuse_attention recognises this form, with the segment ids.)"""
    S = position_ids.shape[-1]
    segment_ids = torch.cumsum((position_ids == 0).to(torch.int64), dim=-1)  # [B, S]: sample of each token
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # [B, 1, S, S]
    causal = torch.ones(S, S, dtype=torch.bool, device=position_ids.device).tril()  # [S, S]
    return same & causal


class LlamaAttention(nn.Module):
    """Multi-head attention with GQA and RoPE; causal, no padding mask."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scaling = cfg.head_dim**-0.5
        self.attn_implementation = cfg.attn_implementation
        qkv_bias = cfg.attention_bias
        o_bias = cfg.attention_bias and cfg.model_type == "llama"  # qwen2: q/k/v bias only
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, H * D, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, Hkv * D, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, Hkv * D, bias=qkv_bias)
        self.o_proj = nn.Linear(H * D, cfg.hidden_size, bias=o_bias)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, causal_mask: torch.Tensor | None,
        sample_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # x [B, S, hidden]; cos, sin [1 or B, 1, S, D]; causal_mask [S, S] (eager only);
        # sample_mask bool [B, 1, S, S]: True where query i may attend to key j (packed rows), else causal
        B, S, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, S, H, D).transpose(1, 2)  # [B, H, S, D]
        k = self.k_proj(x).view(B, S, Hkv, D).transpose(1, 2)  # [B, Hkv, S, D]
        v = self.v_proj(x).view(B, S, Hkv, D).transpose(1, 2)  # [B, Hkv, S, D]

        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin

        if sample_mask is not None and self.attn_implementation == "sdpa":
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=sample_mask, scale=self.scaling, enable_gqa=(Hkv != H)
            )  # [B, H, S, D]
        elif self.attn_implementation == "sdpa":
            out = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.scaling, enable_gqa=(Hkv != H)
            )  # [B, H, S, D]
        else:
            assert causal_mask is not None or sample_mask is not None, "eager attention needs a mask from LlamaModel"
            k = repeat_kv(k, H // Hkv)  # [B, H, S, D]
            v = repeat_kv(v, H // Hkv)
            scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling  # [B, H, S, S]
            if sample_mask is not None:
                scores = scores.masked_fill(~sample_mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + causal_mask
            probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(probs, v)  # [B, H, S, D]
        out = out.transpose(1, 2).reshape(B, S, H * D)  # [B, S, H*D]
        return self.o_proj(out)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, causal_mask: torch.Tensor | None,
        sample_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, causal_mask, sample_mask)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm; builds RoPE tables and the causal mask once per forward."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)  # float32 [D/2]
        self.attn_implementation = cfg.attn_implementation
        self.sliding_window = cfg.sliding_window
        self._cfg = cfg

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # `.to(bfloat16)` would round inv_freq and shift every RoPE angle; HF keeps it float32 too.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = rope_inv_freq(self._cfg).to(self.inv_freq.device)
        return self

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        # input_ids [B, S] -> hidden [B, S, hidden]. position_ids [B, S] (packed rows): RoPE positions, and
        # each 0 starts a new sample that attention does not cross (Megatron's EOD reset)
        _, S = input_ids.shape
        if self.sliding_window is not None and S > self.sliding_window:
            raise GraphllmError(
                f"sequence length {S} exceeds the model's sliding_window={self.sliding_window}; "
                f"only full causal attention is implemented: use sequences of at most {self.sliding_window} tokens"
            )
        h = self.embed_tokens(input_ids)
        dtype, device = h.dtype, h.device

        if position_ids is None:
            pos = torch.arange(S, device=device)
            freqs = torch.outer(pos.float(), self.inv_freq)  # [S, D/2]
            emb = torch.cat((freqs, freqs), dim=-1)  # [S, D]
            cos = emb.cos()[None, None].to(dtype)  # [1, 1, S, D]
            sin = emb.sin()[None, None].to(dtype)  # [1, 1, S, D]
        else:
            freqs = position_ids[..., None].float() * self.inv_freq  # [B, S, D/2]
            emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, D]
            cos = emb.cos()[:, None].to(dtype)  # [B, 1, S, D]
            sin = emb.sin()[:, None].to(dtype)  # [B, 1, S, D]

        causal_mask = sample_mask = None
        if position_ids is not None:
            sample_mask = packed_causal_mask(position_ids)  # [B, 1, S, S]
        elif self.attn_implementation == "eager":
            causal_mask = torch.full((S, S), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)  # [S, S]

        for layer in self.layers:
            h = layer(h, cos, sin, causal_mask, sample_mask)
        return self.norm(h)


class LlamaForCausalLM(nn.Module):
    """Causal LM: forward(input_ids [B, S]) -> logits [B, S, vocab] in the compute dtype.

    `config` is the ModelConfig; `source` is set by `load_model` (preset name or checkpoint path).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.source: str = "<built>"
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, S, V]; with `labels` [B, S] (already aligned: labels[:, t] is the token after
        input_ids[:, t]; -100 ignored) the mean cross-entropy instead, computed in fp32, so a captured
        training graph holds the loss next to the LM head. `position_ids` [B, S]: packed rows, whose
        positions restart at 0 at each sample; attention stays inside each sample (EOD reset)."""
        logits = self.lm_head(self.model(input_ids, position_ids))  # [B, S, V]
        if labels is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)

    def post_materialize(self) -> None:
        """After `to_empty` from meta: re-tie lm_head to the embedding and recompute the RoPE buffer."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        device = self.model.embed_tokens.weight.device
        self.model.inv_freq = rope_inv_freq(self.config).to(device)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """normal(0, initializer_range) for linear and embedding weights, ones for norms, zero biases.

        Deterministic for a seed and independent of device: draws come from a CPU generator in module order.
        """
        gen = torch.Generator(device="cpu").manual_seed(seed)
        std = self.config.initializer_range
        seen: set[int] = set()
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if id(module.weight) not in seen:  # a tied lm_head is drawn once, as the embedding
                    seen.add(id(module.weight))
                    w = torch.empty(module.weight.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
                    module.weight.copy_(w)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, LlamaRMSNorm):
                module.weight.fill_(1.0)
        self.model.inv_freq.copy_(rope_inv_freq(self.config))

    def num_params(self) -> int:
        """Distinct parameters (a tied lm_head counts once)."""
        return sum(p.numel() for p in self.parameters())
