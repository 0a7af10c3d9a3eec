"""Capture targets: one small module per objective, computing `(loss, metrics)` from a batch.

Each wraps the causal LM by holding its children under the same names (`self.model, self.lm_head =
lm.model, lm.lm_head`, as models/kv_cache.py's PrefillStep does), so parameter names, checkpoints,
tensor-parallel plans and graph-hash checks are those of the LM. `metrics` is a small detached float32
vector whose entries `METRICS` names; the engine averages it like the loss and the trainer logs it.

Batches of the pairwise objectives interleave pairs: rows (chosen_0, rejected_0, chosen_1, ...), so slicing
rows per data-parallel rank and per micro-batch keeps every pair whole. Labels are aligned (labels[:, t] is
the token after position t) with -100 on prompt tokens and padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from graphllm.planning.task_config import TaskConfig
from graphllm.tasks.losses import (IGNORE_INDEX, PREFERENCE_METRICS, dpo_loss, reward_metrics, sequence_logps,
                                   simpo_loss, split_pairs)


class _LMHead(nn.Module):
    """The LM's children under their own names, and the logits of a batch."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.model, self.lm_head = lm.model, lm.lm_head
        self.config = lm.config

    def logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.model(input_ids, position_ids))  # [B, S, V]


class DpoStep(_LMHead):
    """DPO: `forward(input_ids [2P, S], labels [2P, S], ref_logps [2P]) -> (loss, metrics [6])`.

    `ref_logps` are the reference model's sequence log-probabilities of the same rows (a frozen graph, or
    precomputed; graphllm.tasks.reference), summed over label tokens — averaged for `--dpo-loss ipo`."""

    METRICS = PREFERENCE_METRICS

    def __init__(self, lm: nn.Module, task: TaskConfig) -> None:
        super().__init__(lm)
        self.beta, self.loss_type, self.label_smoothing = task.dpo_beta, task.dpo_loss, task.dpo_label_smoothing
        self.average = task.dpo_loss == "ipo"

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, ref_logps: torch.Tensor):
        logps = sequence_logps(self.logits(input_ids), labels, average=self.average)  # [2P]
        policy_c, policy_r = split_pairs(logps)
        ref_c, ref_r = split_pairs(ref_logps.float())
        losses, rewards_c, rewards_r = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=self.beta,
                                                loss_type=self.loss_type, label_smoothing=self.label_smoothing)
        return losses.mean(), reward_metrics(rewards_c, rewards_r, policy_c, policy_r)


class SimpoStep(_LMHead):
    """SimPO: `forward(input_ids [2P, S], labels [2P, S]) -> (loss, metrics [6])`, no reference model.
    logps/* are the length-averaged log-probabilities SimPO uses (as TRL's CPOTrainer logs them)."""

    METRICS = PREFERENCE_METRICS

    def __init__(self, lm: nn.Module, task: TaskConfig) -> None:
        super().__init__(lm)
        self.beta, self.gamma = task.simpo_beta, task.simpo_gamma

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor):
        avg_c, avg_r = split_pairs(sequence_logps(self.logits(input_ids), labels, average=True))
        losses, rewards_c, rewards_r = simpo_loss(avg_c, avg_r, beta=self.beta, gamma=self.gamma)
        return losses.mean(), reward_metrics(rewards_c, rewards_r, avg_c, avg_r)


class PrmStep(_LMHead):
    """Process reward model: `forward(input_ids [B, S], labels [B, S], reward_ids [B, 2][, position_ids])
    -> (loss, metrics [1])`.

    MindSpeed-LLM's PRM objective (mindspeed_llm/tasks/posttrain/prm/prm_trainer.py, `loss_func` with
    `--reward-tokens`): at the step-tag positions, the logits restricted to the two reward tokens, and a
    cross-entropy against which of them the label is, averaged over the tags of the micro-batch; accuracy
    is the argmax agreeing with the label. MindSpeed finds the tags by the placeholder token in the inputs;
    graphllm's prm data marks them in the labels (`graphllm preprocess prm`: the good/bad token id on the
    tag, -100 elsewhere; the trainer's shift puts it on the step's last token), so here a tag is a label
    that is not -100. `reward_ids` row b = (good id, bad id) of that row's dataset (meta "prm")."""

    METRICS = ("accuracy",)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, reward_ids: torch.Tensor,
                position_ids: torch.Tensor | None = None):
        logits = self.logits(input_ids, position_ids)  # [B, S, V]
        B, S = labels.shape
        two = logits.float().gather(-1, reward_ids[:, None, :].expand(B, S, 2))  # [B, S, 2]: (good, bad)
        tagged = labels != IGNORE_INDEX  # [B, S]
        target = torch.where(tagged, (labels == reward_ids[:, 1:2]).long(), IGNORE_INDEX)  # 0 good, 1 bad
        nll = F.cross_entropy(two.flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
        count = tagged.sum().clamp(min=1)
        hits = ((two.argmax(-1) == target) & tagged).sum()
        return nll.sum() / count, torch.stack([(hits / count).float()]).detach()


class ReferenceLogps(_LMHead):
    """DPO's reference: `forward(input_ids [B, S], labels [B, S]) -> logps [B]` (forward only)."""

    def __init__(self, lm: nn.Module, *, average: bool) -> None:
        super().__init__(lm)
        self.average = average

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return sequence_logps(self.logits(input_ids), labels, average=self.average)
