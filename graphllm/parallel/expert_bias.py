"""Aux-free load balancing (DeepSeek-V3's routing bias): after each optimizer step, nudge every router's bias.

The router chooses experts by score + e_score_correction_bias (models/deepseek_moe.py) and weighs them by the
score alone, so the bias steers tokens without entering the loss. After each step, for every MoE layer with
c_e the pairs expert e received over the step's whole batch (every micro-batch and data-parallel rank):

    bias_e += rate · sign(mean(c) - c_e)            (an expert above the mean load is chosen less next step)

The counts come out of the training graph (passes/moe_stats.py with `bias_counts`) as metrics the engine averages
over micro-batches and data-parallel ranks like the loss — the mean is the sum scaled, so the signs are the step's,
and every rank applies the same update to its own copy of the buffer, which the compiled graph reads in place.
Checkpoints save and load the biases with the parameters (Engine.named_state: the model's persistent buffers).
"""

from __future__ import annotations

import torch

from graphllm.planning.moe_config import COUNTS_PREFIX


def update_expert_bias(buffers: dict[str, torch.Tensor], metrics: dict[str, float], rate: float) -> int:
    """Apply one step's update to each bias buffer (`buffers`: the model's named buffers) from the step's count
    metrics; returns how many biases moved."""
    counts: dict[str, dict[int, float]] = {}
    for key, value in metrics.items():
        if key.startswith(COUNTS_PREFIX):
            name, _, expert = key[len(COUNTS_PREFIX):].rpartition("/")
            counts.setdefault(name, {})[int(expert)] = value
    for name, by_expert in counts.items():
        bias = buffers[name]
        c = torch.tensor([by_expert[e] for e in range(bias.numel())], dtype=torch.float32)
        with torch.no_grad():
            bias.add_((rate * torch.sign(c.mean() - c)).to(bias.device, bias.dtype))
    return len(counts)

