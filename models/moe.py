"""The mixture-of-experts MLP of Mixtral and Qwen3-MoE, and transformers' load-balancing loss.

One static graph, no Python loop over experts (dropless: every token-expert pair is computed):

    router    logits = x Wᵀ [T, E] → softmax (float32) → top-k (weights, expert ids) [T, k] → renormalise
    permute   graphllm::moe_permute: the T·k pairs sorted by expert id, tokens gathered in that order
              [T·k, H], tokens per expert [E] (ops/moe_dispatch.py)
    experts   graphllm::grouped_matmul (ops/grouped_matmul.py) with those counts as group sizes:
              gate_up [T·k, 2I] → silu(gate) · up → down [T·k, H]
    combine   graphllm::moe_unpermute: each row times its routing weight, added back to its token [T, H]

The ops are looked up by name in `torch.ops.graphllm`: models/ is a layer below ops/ and imports nothing
from it, and the graphllm package registers its ops (graphllm.ops) on import, before any model exists.
`dispatch` (permute → experts → combine) is what expert parallelism rewrites (passes/expert_parallel.py):
its permute counts only the rank's experts and collectives move the tokens.

Parameter names and layouts are transformers' in-memory ones (`mlp.gate.weight` [E, H],
`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]); the per-expert names that
transformers writes to disk are mapped by models/moe_weights.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from typing import NamedTuple

from .config import ModelConfig

class RouterStats(NamedTuple):
    """One MoE layer's routing, for the router losses (load_balancing_loss, router_z_loss, seq_aux_loss)."""

    ids: torch.Tensor
    """Expert ids [T, k] of the T = B·S tokens (all k choices, before any capacity drop)."""
    probs: torch.Tensor
    """Router probabilities [T, E] float32, summing to 1 per token (softmax; DeepSeek's sigmoid scores normalised)."""
    logits: torch.Tensor
    """Router logits [T, E] (before softmax or sigmoid)."""
    rows: int
    """Sequences B of the T tokens (row-major: token t is row t // S)."""


FUSED_BLOCKS = {"mlp.experts.gate_up_proj": (1, 2)}
"""Parameters (by name suffix) whose dim d is n equal blocks (gate rows | up rows): checkpoints store them with
the block axis explicit, [E, 2, I, H], so an expert-tensor-parallel shard (each block's slice) is one
rectangular piece of the stored tensor in every layout (graphllm/parallel/stored_form.py)."""


class Experts(nn.Module):
    """E gated MLPs stored as 3D tensors, as transformers stores them (gate and up rows concatenated)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E, H, inter = cfg.num_experts, cfg.hidden_size, cfg.expert_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * inter, H))  # [E, 2I, H]: rows 0..I gate, I..2I up
        self.down_proj = nn.Parameter(torch.empty(E, H, inter))  # [E, H, I]

    def forward(self, x_sorted: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
        """x_sorted [N, H], rows grouped by expert, group_sizes [E] int64 → [N, H]."""
        gmm = torch.ops.graphllm.grouped_matmul
        # the weights as stored, [E, out, in]: the op multiplies by each expert's transpose without a copy
        gate_up = gmm(x_sorted, self.gate_up_proj, group_sizes, transpose_weight=True)  # [N, 2I]
        gate, up = gate_up.chunk(2, dim=-1)
        return gmm(F.silu(gate) * up, self.down_proj, group_sizes, transpose_weight=True)  # [N, H]

    def extra_repr(self) -> str:
        E, two_i, H = self.gate_up_proj.shape
        return f"experts={E}, hidden={H}, intermediate={two_i // 2}"


class SparseMoeBlock(nn.Module):
    """Top-k softmax routing over `num_experts` SwiGLU experts, dropless (see the module docstring)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        # Qwen3-MoE rounds the routing weights to the compute dtype before the combine; Mixtral keeps float32
        self.weights_in_compute_dtype = cfg.model_type == "qwen3_moe"
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router: [E, H]
        self.experts = Experts(cfg)

    def router_logits(self, x_TH: torch.Tensor) -> torch.Tensor:
        """x [T, H] → the router's logits [T, E]."""
        return self.gate(x_TH)

    def route(self, logits: torch.Tensor, x_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits [T, E] → (routing weights [T, k], expert ids [T, k], router probabilities [T, E] float32)."""
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)  # [T, E]
        weights, ids = torch.topk(probs, self.top_k, dim=-1)  # [T, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.weights_in_compute_dtype:
            weights = weights.to(x_dtype)
        return weights, ids, probs

    def balance_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """route's probabilities [T, E] as the balance losses weigh them (softmax: themselves)."""
        return probs

    def dispatch(self, x_TH: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], routing weights and expert ids [T, k] → Σ_j weights[t, j] · expert_{ids[t, j]}(x[t]) [T, H]."""
        gl = torch.ops.graphllm
        x_sorted, order, counts = gl.moe_permute(x_TH, ids, 0, self.num_experts)
        return gl.moe_unpermute(self.experts(x_sorted, counts), order, weights)

    def forward_with_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        """x [B, S, H] → (output [B, S, H], this layer's RouterStats)."""
        B, S, H = x.shape
        x_TH = x.reshape(B * S, H)
        logits = self.router_logits(x_TH)
        weights, ids, probs = self.route(logits, x.dtype)
        out = self.dispatch(x_TH, weights, ids).reshape(B, S, H)
        return out, RouterStats(ids=ids, probs=self.balance_probs(probs), logits=logits, rows=B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_stats(x)[0]


def _assignments(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Expert ids [..., T, k] → top-k assignments per expert [..., E] float32."""
    flat = ids.flatten(-2)
    return torch.zeros(*flat.shape[:-1], num_experts, device=ids.device).scatter_add(
        -1, flat, torch.ones(flat.shape, device=ids.device))


def marked(stats: RouterStats, parts: int = 1) -> RouterStats:
    """`stats` through graphllm::router_stat, the marks of what the router losses read: passes that split the
    micro-batch's sequences over ranks gather them back (sequence and context parallelism). `parts`: the
    context-parallel ranks the sequences are split over (the marked statistics are the gathered ones)."""
    mark = torch.ops.graphllm.router_stat
    return stats._replace(ids=mark(stats.ids, stats.rows, parts), probs=mark(stats.probs, stats.rows, parts),
                          logits=mark(stats.logits, stats.rows, parts))


def load_balancing_loss(stats: list[RouterStats], num_experts: int) -> torch.Tensor:
    """transformers' `load_balancing_loss_func` (Switch Transformer): E · Σ_e f_e · P_e, where f_e is expert e's
    share of top-k assignments and P_e its mean router probability, both averaged over all MoE layers' tokens
    (assignments and probabilities are summed over the layers first, then divided by the rows of all layers)."""
    rows = float(sum(s.ids.shape[0] for s in stats))
    tokens_per_expert = sum(_assignments(s.ids, num_experts) for s in stats) / rows  # [E]
    prob_per_expert = sum(s.probs.sum(dim=0) for s in stats) / rows  # [E]
    return torch.sum(tokens_per_expert * prob_per_expert) * num_experts


def router_z_loss(stats: list[RouterStats]) -> torch.Tensor:
    """ST-MoE's router z-loss, summed over the MoE layers: each layer's mean over tokens of logsumexp(logits)²
    (it keeps the router's logits small; Megatron's --moe-z-loss-coeff multiplies it)."""
    return sum(torch.logsumexp(s.logits.float(), dim=-1).square().mean() for s in stats)


def seq_aux_loss(stats: list[RouterStats], num_experts: int, top_k: int) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, summed over the MoE layers, each the mean over its sequences of
    Σ_e f_e · P_e, with f_e = E / (k·S) × the sequence's top-k assignments to e and P_e the mean over its S tokens
    of e's normalised probability (DeepSeek-V3 §2.1.2; the coefficient α is --moe-seq-aux-loss-coeff)."""
    total = 0
    for s in stats:
        B = s.rows
        S = s.ids.shape[0] // B
        f = _assignments(s.ids.reshape(B, S, -1), num_experts) * (num_experts / (top_k * S))  # [B, E]
        P = s.probs.reshape(B, S, num_experts).mean(dim=1)  # [B, E]
        total = total + (f * P).sum(dim=-1).mean()
    return total
