"""The preference and reward objectives as plain PyTorch formulas, on per-sequence log-probabilities or rewards.

Everything here is written out from its source (nothing is imported from those libraries):

- DPO (Rafailov et al. 2023, eq. 7) and its variants as TRL implements them in
  `trl/trainer/dpo_trainer.py: DPOTrainer.dpo_loss`. With the log-ratio margin
  `h = (log π(y_w) − log π(y_l)) − (log π_ref(y_w) − log π_ref(y_l))`:
  - sigmoid: `−(1 − ε)·log σ(β h) − ε·log σ(−β h)` (ε = label smoothing, conservative DPO, Mitchell 2023;
    ε = 0 is the paper's loss);
  - ipo: `(h − 1/(2β))²` (Azar et al. 2023, eq. 17; β is the paper's τ). TRL feeds IPO log-probabilities
    averaged over the completion's tokens (`concatenated_forward`: `all_logps / loss_mask.sum(-1)`), for the
    policy and the reference alike; graphllm does the same (`average=True` below);
  - hinge: `relu(1 − β h)` (SLiC, Zhao et al. 2023).
  Implicit rewards (logged): `β (log π(y) − log π_ref(y))` for each side.
- SimPO (Meng et al. 2024, eq. 6; TRL `CPOTrainer.cpo_loss` with `loss_type="simpo"`): with length-averaged
  log-probabilities `ā(y) = log π(y) / |y|`, `−log σ(β ā(y_w) − β ā(y_l) − γ)`; rewards `β ā(y)`. (TRL writes
  the margin as `β (ā_w − ā_l − γ/β)`, the same number.) No label smoothing: the plan has none for SimPO.
- Bradley–Terry (outcome reward models; Ouyang et al. 2022, eq. 1; TRL `RewardTrainer`):
  `−log σ(r(y_w) − r(y_l))`.

Pairs are interleaved along the batch: rows (chosen_0, rejected_0, chosen_1, rejected_1, ...), so
`split_pairs` is `x[0::2], x[1::2]`. Every function returns per-pair values; the objective is their mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # labels that take no loss (prompt tokens, padding): models.llama.IGNORE_INDEX


def split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[2P, ...] interleaved rows → (chosen [P, ...], rejected [P, ...])."""
    return x[0::2], x[1::2]


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, *, average: bool = False) -> torch.Tensor:
    """Sum (or mean, `average`) of the label tokens' log-probabilities per row: logits [B, S, V], labels [B, S]
    (aligned: labels[:, t] is the token after position t; IGNORE_INDEX takes none) → [B] float32.

    Written as a cross-entropy with reduction="none" in fp32, the form the LM head's loss already has, so
    tensor_parallel's vocab-parallel cross-entropy applies to it unchanged."""
    B, S = labels.shape
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none")  # [B*S], 0 at ignored positions
    logps = -nll.view(B, S).sum(-1)  # [B]
    if not average:
        return logps
    count = (labels != IGNORE_INDEX).sum(-1).clamp(min=1)  # a row cut to no label token counts one
    return logps / count


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses [P] and the implicit rewards (chosen [P], rejected [P]); see the module docstring."""
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)  # [P]
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}")
    return losses, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


def simpo_loss(avg_chosen: torch.Tensor, avg_rejected: torch.Tensor, *, beta: float,
               gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair SimPO losses [P] on length-averaged log-probabilities, and the rewards β·ā (chosen, rejected)."""
    losses = -F.logsigmoid(beta * avg_chosen - beta * avg_rejected - gamma)
    return losses, beta * avg_chosen.detach(), beta * avg_rejected.detach()


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair Bradley–Terry losses [P]: −log σ(r_chosen − r_rejected)."""
    return -F.logsigmoid(r_chosen - r_rejected)


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, logps_chosen: torch.Tensor,
                   logps_rejected: torch.Tensor) -> torch.Tensor:
    """TRL's logged figures as one float32 vector: rewards/chosen, rewards/rejected, rewards/accuracies,
    rewards/margins, logps/chosen, logps/rejected (means over the pairs; PREFERENCE_METRICS)."""
    c, r = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return torch.stack([c.mean(), r.mean(), (c > r).float().mean(), (c - r).mean(),
                        logps_chosen.detach().float().mean(), logps_rejected.detach().float().mean()])


PREFERENCE_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                      "logps/chosen", "logps/rejected")
"""The names of `reward_metrics`' entries, in order (TRL's DPOTrainer / CPOTrainer log keys)."""
