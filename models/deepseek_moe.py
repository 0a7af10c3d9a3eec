"""DeepSeek-V3's mixture-of-experts MLP: sigmoid scores, group-limited top-k ("noaux_tc") and shared experts.

    router    scores = sigmoid(x Wᵀ) in float32 [T, E]; choice = scores + e_score_correction_bias
    groups    the E experts form n_group groups; each group's rank is the sum of its two best choice scores;
              the topk_group best groups are kept, the other experts' choice scores set to -inf
    top-k     expert ids = top-k of the masked choice scores; weights = the *uncorrected* scores at those ids,
              renormalised to sum 1 (norm_topk_prob), times routed_scaling_factor
    experts   SparseMoeBlock.dispatch, unchanged (graphllm::moe_permute → grouped_matmul ×2 → moe_unpermute), so
              expert parallelism (passes/expert_parallel.py) rewrites this block as it does Mixtral's
    shared    a dense SwiGLU of n_shared_experts × moe_intermediate_size, added to the routed output

There is no Switch-style load-balancing loss: DeepSeek-V3 balances with e_score_correction_bias, a persistent
buffer updated outside the gradient by the training recipe (--moe-bias-update-rate; transformers'
DeepseekV3ForCausalLM adds no aux loss either, and ModelConfig refuses output_router_logits). A run may add
DeepSeek-V3's small sequence-wise balance loss (--moe-seq-aux-loss-coeff, over `balance_probs`: the scores
normalised per token) and the router z-loss. The bias stays float32 when the model is cast, as transformers
keeps it.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import GatedMLP
from .moe import RouterStats, SparseMoeBlock


class TopkRouter(nn.Linear):
    """The router's weight [E, H] (a bias-free Linear, so init and the `mlp.gate.weight` name are the other MoE
    families') and transformers' `e_score_correction_bias` [E] float32 buffer, in the state dict under that name."""

    def __init__(self, hidden: int, experts: int) -> None:
        super().__init__(hidden, experts, bias=False)
        self.register_buffer("e_score_correction_bias", torch.zeros(experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # `.to(bfloat16)` would round the bias, which picks the experts; keep its float32 values, follow the device
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        if self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = bias.to(self.e_score_correction_bias.device)
        return self


class DeepseekMoeBlock(SparseMoeBlock):
    """SparseMoeBlock with DeepSeek-V3's router (`route`) and shared experts; `dispatch` is inherited."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.gate = TopkRouter(cfg.hidden_size, cfg.num_experts)
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.weights_in_compute_dtype = False  # float32 weights into the combine, as transformers' experts take them
        shared = dataclasses.replace(cfg, intermediate_size=cfg.expert_size * cfg.n_shared_experts)
        self.shared_experts = GatedMLP(shared)

    def router_logits(self, x_TH: torch.Tensor) -> torch.Tensor:
        """x [T, H] → the router's logits [T, E] float32 (x and the weight in float32, as transformers)."""
        return F.linear(x_TH.float(), self.gate.weight.float())

    def route(self, logits: torch.Tensor, x_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits [T, E] → (routing weights [T, k] float32, expert ids [T, k], sigmoid scores [T, E])."""
        T, E, G = logits.shape[0], self.num_experts, self.n_group
        scores = torch.sigmoid(logits)  # [T, E]
        choice = scores + self.gate.e_score_correction_bias  # [T, E]
        group_scores = choice.view(T, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)  # [T, G]
        group_ids = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
        kept = torch.zeros_like(group_scores).scatter(1, group_ids, 1.0).bool()  # [T, G]
        kept = kept[:, :, None].expand(T, G, E // G).reshape(T, E)  # [T, E]
        ids = torch.topk(choice.masked_fill(~kept, float("-inf")), k=self.top_k, dim=-1, sorted=False)[1]  # [T, k]
        weights = scores.gather(1, ids)  # [T, k]
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)  # transformers' guard against 0 / 0
        return weights * self.routed_scaling_factor, ids, scores

    def balance_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """The sigmoid scores normalised over the experts (DeepSeek-V3's s'), for the sequence-wise balance loss."""
        return probs / probs.sum(dim=-1, keepdim=True)

    def forward_with_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        """x [B, S, H] → (routed experts + shared experts [B, S, H], RouterStats)."""
        routed, stats = super().forward_with_stats(x)
        return routed + self.shared_experts(x), stats
