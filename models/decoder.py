"""The decoder-only causal LM of every supported family, written for capture by torch.export.

Parameter names equal Hugging Face state-dict keys (fused HF weights are split on load: models/weights.py),
so HF checkpoints load without renaming. Shapes are static and there is no data-dependent Python control
flow: RoPE tables, the eager causal mask and sliding-window masks are built from constants (the sequence
length) once per forward in `DecoderModel`. What differs between families is read from ModelConfig
fields (models/config.py); with the llama fields every form is the one the graph passes match.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .config import ModelConfig
from .deepseek_moe import DeepseekMoeBlock
from .layers import GatedMLP, RMSNorm, UnitOffsetRMSNorm, make_norm, rope_angles, rope_table
from .masks import packed_causal_mask, window_masks
from .mla import LatentAttention
from .moe import Experts, RouterStats, SparseMoeBlock, load_balancing_loss, marked, router_z_loss, seq_aux_loss
from .rope import rope_inv_freq

IGNORE_INDEX = -100  # label value that contributes no loss (prompt tokens, padding)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); with sandwich norms each branch
    output is normed too before its residual add (Gemma 2/3, GLM-4). The MLP of layer `index` is a mixture of
    experts where the config says so (cfg.is_moe_layer); DeepSeek-V3 has latent attention and its own MoE."""

    def __init__(self, cfg: ModelConfig, index: int = 0) -> None:
        super().__init__()
        self.self_attn = LatentAttention(cfg) if cfg.mla else Attention(cfg)
        moe = DeepseekMoeBlock if cfg.model_type == "deepseek_v3" else SparseMoeBlock
        self.mlp = moe(cfg) if cfg.is_moe_layer(index) else GatedMLP(cfg)
        self._norms = cfg.norm_names  # (before attn, after attn, before mlp, after mlp); None: absent
        for name in self._norms:
            if name is not None:
                setattr(self, name, make_norm(cfg, cfg.hidden_size))

    def _norm(self, which: int, x: torch.Tensor) -> torch.Tensor:
        name = self._norms[which]
        return x if name is None else getattr(self, name)(x)

    def attn_input(self, x: torch.Tensor) -> torch.Tensor:
        """The normed input of attention."""
        return self._norm(0, x)

    def add_attention(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """The residual stream after attention's output `attn_out` [B, S, hidden] is added."""
        return x + self._norm(1, attn_out)

    def mlp_block(self, x: torch.Tensor, router_stats: list[RouterStats] | None = None) -> torch.Tensor:
        """x + mlp(norm(x)) (with a norm on the MLP output too for sandwich norms); an MoE layer appends its
        load-balance statistics to `router_stats` when it is given."""
        h = self._norm(2, x)
        if router_stats is not None and isinstance(self.mlp, SparseMoeBlock):
            h, stats = self.mlp.forward_with_stats(h)
            router_stats.append(stats)
        else:
            h = self.mlp(h)
        return x + self._norm(3, h)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, causal_mask: torch.Tensor | None,
        sample_mask: torch.Tensor | None = None, window_mask: torch.Tensor | None = None,
        router_stats: list[RouterStats] | None = None,
    ) -> torch.Tensor:
        x = self.add_attention(x, self.self_attn(self.attn_input(x), cos, sin, causal_mask, sample_mask,
                                                 window_mask))
        return self.mlp_block(x, router_stats)


class _SharedHead(nn.Module):
    """An MTP module's final norm before the (shared) LM head: `shared_head.norm` as DeepSeek-V3's files name it."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = make_norm(cfg, cfg.hidden_size)


class MtpLayer(DecoderLayer):
    """Multi-token prediction module of depth d = k + 1 (model.mtp.<k>; DeepSeek-V3 §2.2): a decoder layer of the
    model's kind (MoE where layer L + k would be) whose input joins the previous depth's hidden state at position i
    with the embedding of the token d ahead of it:

        x = eh_proj([enorm(embed(t[i + d])); hnorm(h_prev[i])])     [B, S, 2H] -> [B, S, H]
        h = layer(x);   logits = lm_head(shared_head.norm(h))        predicts t[i + d + 1]

    The embedding and the LM head are the main model's (shared, as in DeepSeek-V3). h_prev is the main model's
    final (normed) hidden state at depth 1 (what the LM head reads), the previous module's output after."""

    def __init__(self, cfg: ModelConfig, depth: int) -> None:
        super().__init__(cfg, cfg.num_hidden_layers + depth)
        self.enorm = make_norm(cfg, cfg.hidden_size)
        self.hnorm = make_norm(cfg, cfg.hidden_size)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = _SharedHead(cfg)

    def predict(self, h_prev: torch.Tensor, embedded: torch.Tensor, *layer_args) -> torch.Tensor:
        """This depth's hidden state [B, S, H] (before shared_head.norm); `layer_args` as DecoderLayer.forward's."""
        x = self.eh_proj(torch.cat([self.enorm(embedded), self.hnorm(h_prev)], dim=-1))
        return self(x, *layer_args)


def _rope_buffers(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's float32 RoPE buffers: inv_freq, plus longrope's long factors and Gemma 3's local base."""
    out = {"inv_freq": rope_inv_freq(cfg)}
    if cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "longrope":
        out["inv_freq_long"] = rope_inv_freq(cfg, long=True)
    if cfg.rope_local_theta is not None:
        out["inv_freq_local"] = rope_inv_freq(cfg, local=True)
    return out


class DecoderModel(nn.Module):
    """Embedding, decoder layers, final norm; builds RoPE tables and masks once per forward."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = make_norm(cfg, cfg.hidden_size)
        self.mtp = nn.ModuleList(MtpLayer(cfg, k) for k in range(cfg.mtp_layers))
        self.inv_freq: torch.Tensor
        for name, value in _rope_buffers(cfg).items():
            self.register_buffer(name, value, persistent=False)  # float32 [R/2]
        self.attn_implementation = cfg.attn_implementation
        self._cfg = cfg
        # sqrt(hidden) as transformers multiplies it: a float32 scalar cast to the compute dtype
        self._embed_scale = ({dt: torch.tensor(cfg.hidden_size**0.5, device="cpu").to(dt).item()
                              for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}
                             if cfg.embed_scale else None)

    def reset_rope(self) -> None:
        """Recompute the RoPE buffers in float32 on their device."""
        device = self.inv_freq.device
        for name, value in _rope_buffers(self._cfg).items():
            setattr(self, name, value.to(device))

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # `.to(bfloat16)` would round inv_freq and shift every RoPE angle; HF keeps it float32 too.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.reset_rope()
        return self

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, S] -> [B, S, hidden], times sqrt(hidden) where the family scales it (Gemma)."""
        h = self.embed_tokens(input_ids)
        if self._embed_scale is not None:
            h = h * self._embed_scale[h.dtype]
        return h

    def _inv_freq(self, S: int, positions: torch.Tensor | None, local: bool) -> torch.Tensor:
        if local:
            return self.inv_freq_local
        scaling = self._cfg.rope_scaling
        if scaling is None or scaling["rope_type"] != "longrope":
            return self.inv_freq
        original = scaling["original_max_position_embeddings"]
        if positions is None:  # transformers: the long factors once the sequence exceeds the original length
            return self.inv_freq_long if S > original else self.inv_freq
        return torch.where(positions.max() + 1 > original, self.inv_freq_long, self.inv_freq)

    def rope_tables(self, S: int, positions: torch.Tensor | None, dtype: torch.dtype, device: torch.device,
                    index: tuple = (slice(None), None)) -> dict[bool, tuple[torch.Tensor, torch.Tensor]]:
        """{local: (cos, sin)} for the RoPE kinds the layers use (local: Gemma 3's sliding layers).

        positions None: positions 0..S-1, tables [1, 1, S, R]; else positions [...] -> tables `[index]`
        of [..., R] (default [B, 1, S, R] for position_ids [B, S])."""
        cfg = self._cfg
        scale = cfg.rope_scaling.get("attention_factor", 1.0) if cfg.rope_scaling else 1.0
        kinds = sorted({cfg.local_rope(i) for i in range(cfg.num_hidden_layers)})
        pos = torch.arange(S, device=device) if positions is None else None
        out = {}
        for local in kinds:
            inv_freq = self._inv_freq(S, positions, local)
            if positions is None:
                freqs = torch.outer(pos.float(), inv_freq)  # [S, R/2]
                at = (None, None)
            else:
                freqs = positions[..., None].float() * inv_freq  # [..., R/2]
                at = index
            # latent attention gathers interleaved pairs into halves before rotating (models/mla.py): plain tables
            emb = rope_angles(freqs, cfg.rope_interleaved and not cfg.mla)  # [..., R]
            k_scale = 1.0 if local else scale
            out[local] = (rope_table(emb, torch.cos, k_scale, at, dtype), rope_table(emb, torch.sin, k_scale, at, dtype))
        return out

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                router_stats: list[RouterStats] | None = None,
                mtp_ids: list[torch.Tensor] | None = None) -> torch.Tensor | list[torch.Tensor]:
        # input_ids [B, S] -> hidden [B, S, hidden]. position_ids [B, S] (packed rows): RoPE positions, and
        # each 0 starts a new sample that attention does not cross (Megatron's EOD reset). router_stats: a list
        # that each MoE layer appends its load-balance statistics to. mtp_ids: per MTP module (depth d), the ids
        # d ahead [B, S]; then the result is [hidden, each module's normed hidden]
        cfg = self._cfg
        _, S = input_ids.shape
        h = self.embed(input_ids)
        dtype, device = h.dtype, h.device
        tables = self.rope_tables(S, position_ids, dtype, device)

        causal_mask = sample_mask = None
        if position_ids is not None:
            sample_mask = packed_causal_mask(position_ids)  # [B, 1, S, S]
        elif self.attn_implementation == "eager" or cfg.attn_logit_softcapping is not None:
            causal_mask = torch.full((S, S), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)  # [S, S]
        windows = {cfg.window_of(i) for i in range(cfg.num_hidden_layers)} - {None}
        masks = window_masks(windows, S, sample_mask, device)  # window -> bool mask; none when window ≥ S

        for i, layer in enumerate(self.layers):
            cos, sin = tables[cfg.local_rope(i)]
            window_mask = masks.get(cfg.window_of(i))
            if router_stats is not None:
                h = layer(h, cos, sin, causal_mask, sample_mask, window_mask, router_stats)
            elif window_mask is None:
                h = layer(h, cos, sin, causal_mask, sample_mask)
            else:
                h = layer(h, cos, sin, causal_mask, sample_mask, window_mask)
        h = self.norm(h)
        if not mtp_ids:
            return h
        last = cfg.num_hidden_layers - 1  # an MTP layer attends as the last decoder layer does
        cos, sin = tables[cfg.local_rope(last)]
        outs, args = [h], (cos, sin, causal_mask, sample_mask, masks.get(cfg.window_of(last)), router_stats)
        for module, ids in zip(self.mtp, mtp_ids):
            h = module.predict(h, self.embed(ids), *args)
            outs.append(module.shared_head.norm(h))
        return outs


def _init_modules(modules: list[nn.Module], gen: torch.Generator, std: float) -> None:
    """init_weights' draws over `modules`, in order (a weight shared by two modules is drawn once)."""
    seen: set[int] = set()
    for module in modules:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            if id(module.weight) not in seen:  # a tied lm_head is drawn once, as the embedding
                seen.add(id(module.weight))
                w = torch.empty(module.weight.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
                module.weight.copy_(w)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, Experts):
            for p in (module.gate_up_proj, module.down_proj):
                p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=gen))
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, UnitOffsetRMSNorm):
            module.weight.zero_()


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, parts: int = 1) -> torch.Tensor:
    """Mean cross-entropy over the labels that are not IGNORE_INDEX, in fp32. `parts` > 1 (each sequence split over
    context-parallel ranks): marked as such a mean, for the context_parallel pass to weight (ops/sequence_parts.py)."""
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    return torch.ops.graphllm.token_mean(loss, labels) if parts > 1 else loss


def _ahead(t: torch.Tensor, k: int, fill: int, parts: int = 1) -> torch.Tensor:
    """t [B, S] moved k positions left: position i holds t[:, i + k], the last k positions `fill`. `parts` > 1: as
    graphllm::ahead, which the context_parallel pass makes read the tokens other ranks hold."""
    if parts > 1:
        return torch.ops.graphllm.ahead(t, k, fill)
    return torch.cat([t[:, k:], torch.full_like(t[:, :k], fill)], dim=1)


class DecoderForCausalLM(nn.Module):
    """Causal LM: forward(input_ids [B, S]) -> logits [B, S, vocab] in the compute dtype.

    `config` is the ModelConfig; `source` is set by `load_model` (preset name or checkpoint path).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.source: str = "<built>"
        self.model = DecoderModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.mtp_loss_weight = 0.1
        """Weight of the MTP modules' mean cross-entropy in the training loss (the plan's --mtp-loss-weight)."""
        self.router_z_loss_coeff = 0.0
        """Weight of the router z-loss in the training loss (--moe-z-loss-coeff; 0: off)."""
        self.seq_aux_loss_coeff = 0.0
        """Weight of DeepSeek-V3's sequence-wise balance loss (--moe-seq-aux-loss-coeff; 0: off)."""
        self.seq_parts = 1
        """The ranks each sequence is split over when the graph is captured (--cp): the router losses are traced
        for the statistics of whole sequences, which the context_parallel pass gathers (models/moe.py `marked`), the
        cross-entropies are marked as token means and MTP's tokens ahead as such (ops/sequence_parts.py)."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head(hidden), soft-capped where the family caps the final logits (Gemma 2)."""
        logits = self.lm_head(hidden)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, S, V]; with `labels` [B, S] (already aligned: labels[:, t] is the token after
        input_ids[:, t]; -100 ignored) the mean cross-entropy instead, computed in fp32, so a captured
        training graph holds the loss next to the LM head. `position_ids` [B, S]: packed rows, whose
        positions restart at 0 at each sample; attention stays inside each sample (EOD reset).

        An MoE model whose config sets output_router_logits adds router_aux_loss_coef × the load-balancing
        loss (models/moe.py) to the loss, as transformers does when labels are given; the router z-loss and the
        sequence-wise balance loss are added with the weights the plan sets (router_z_loss_coeff,
        seq_aux_loss_coeff). With MTP modules
        (cfg.mtp_layers D) the loss adds mtp_loss_weight × the mean of their D cross-entropies and the result is
        (loss, [mean MTP cross-entropy]): the "mtp/loss" metric."""
        cfg = self.config
        aux = labels is not None and cfg.num_experts > 0 and (
            cfg.output_router_logits or self.router_z_loss_coeff or self.seq_aux_loss_coeff)
        router_stats: list[RouterStats] | None = [] if aux else None
        if labels is not None and cfg.mtp_layers:
            return self._mtp_loss(input_ids, labels, position_ids, router_stats)
        logits = self.logits(self.model(input_ids, position_ids, router_stats))  # [B, S, V]
        if labels is None:
            return logits
        return self._with_aux(_cross_entropy(logits, labels, self.seq_parts), router_stats)

    def _with_aux(self, loss: torch.Tensor, router_stats: list[RouterStats] | None) -> torch.Tensor:
        """`loss` plus the router losses the config and the plan turn on, from every MoE layer's RouterStats."""
        cfg = self.config
        if not router_stats:
            return loss
        router_stats = [marked(s, self.seq_parts) for s in router_stats]
        if cfg.output_router_logits:
            loss = loss + cfg.router_aux_loss_coef * load_balancing_loss(router_stats, cfg.num_experts)
        if self.router_z_loss_coeff:
            loss = loss + self.router_z_loss_coeff * router_z_loss(router_stats)
        if self.seq_aux_loss_coeff:
            loss = loss + self.seq_aux_loss_coeff * seq_aux_loss(router_stats, cfg.num_experts, cfg.num_experts_per_tok)
        return loss

    def _mtp_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None,
                  router_stats: list[RouterStats] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The module of depth d sees the ids d ahead and is scored on the labels d ahead (labels[:, t] is the token
        after input t); the last d positions of a row have no target (ignored)."""
        depths = range(1, self.config.mtp_layers + 1)
        parts = self.seq_parts
        hidden = self.model(input_ids, position_ids, router_stats, [_ahead(input_ids, k, 0, parts) for k in depths])
        loss = _cross_entropy(self.logits(hidden[0]), labels, parts)
        mtp = torch.stack([_cross_entropy(self.logits(h), _ahead(labels, k, IGNORE_INDEX, parts), parts)
                           for k, h in zip(depths, hidden[1:])]).mean()
        return self._with_aux(loss + self.mtp_loss_weight * mtp, router_stats), mtp.detach().reshape(1)

    def post_materialize(self) -> None:
        """After `to_empty` from meta: re-tie lm_head to the embedding and recompute the RoPE buffers."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        device = self.model.embed_tokens.weight.device
        for name, value in _rope_buffers(self.config).items():
            setattr(self.model, name, value.to(device))

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """normal(0, initializer_range) for linear and embedding weights, ones for norms (zeros for Gemma's
        unit-offset norms, which multiply by 1 + weight), zero biases.

        Deterministic for a seed and independent of device: draws come from a CPU generator in module order.
        The MTP modules are drawn after, from their own generator (init_mtp), so the rest of the model is the
        same with or without them.
        """
        gen = torch.Generator(device="cpu").manual_seed(seed)
        mtp = {id(m) for m in self.model.mtp.modules()}
        _init_modules([m for m in self.modules() if id(m) not in mtp], gen, self.config.initializer_range)
        self.model.reset_rope()
        for k in range(len(self.model.mtp)):
            self.init_mtp(k, seed)

    @torch.no_grad()
    def init_mtp(self, k: int, seed: int) -> None:
        """Draw MTP module k as init_weights would (generator seed + 1 + k); its routing bias starts at zero."""
        module = self.model.mtp[k]
        gen = torch.Generator(device="cpu").manual_seed(seed + 1 + k)
        _init_modules(list(module.modules()), gen, self.config.initializer_range)
        for name, buf in module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.zero_()

    def num_params(self) -> int:
        """Distinct parameters (a tied lm_head counts once)."""
        return sum(p.numel() for p in self.parameters())
