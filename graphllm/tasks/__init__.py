"""Training objectives beyond next-token cross-entropy (graphllm.planning.task_config): what the compiled
training step computes from a batch for DPO, SimPO, outcome and process reward models.

A task is a capture target (graphllm/tasks/objectives.py, reward_model.py): `build_task` picks it for a
plan, `graph_inputs` gives the captured graph's example inputs and `batch_example` what a step's batch
holds (the engine adds DPO's reference log-probs itself under `--reference graph`). For `--task lm` the
target is the causal LM itself, `model(input_ids, labels[, position_ids]) -> loss`, unchanged.

| task | graph inputs | returns |
|---|---|---|
| lm | input_ids, labels[, position_ids] | loss |
| dpo | input_ids [2P, S], labels [2P, S], ref_logps [2P] | (loss, metrics [6]) |
| simpo | input_ids [2P, S], labels [2P, S] | (loss, metrics [6]) |
| rm | input_ids [2P, S], labels [2P, S] | (loss, metrics [4]) |
| prm | input_ids, labels, reward_ids [B, 2][, position_ids] | (loss, metrics [1]) |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn



@dataclass(kw_only=True)
class Task:
    """The modules of one plan's objective."""

    kind: str
    trained: nn.Module
    """What the optimizer, checkpoints and `Built.model` see: the LM, or for rm the RewardModel (no LM head)."""
    target: nn.Module
    """What is captured: the LM itself for lm, else the objective's module (sharing the LM's children)."""
    metrics: tuple[str, ...] = ()
    """Names of the metrics vector the target returns beside the loss (empty: it returns a bare loss)."""


def build_task(plan, lm: nn.Module) -> Task:
    """The capture target of `plan.task` around the loaded causal LM `lm`."""
    from graphllm.tasks.objectives import DpoStep, PrmStep, SimpoStep
    from graphllm.tasks.reward_model import RewardModel

    task = plan.task
    # a pairwise task with --eod-reset is refused by the plan (graphllm/planning/compat.py)
    if task.kind == "lm":  # with MTP modules the LM returns (loss, [mean MTP cross-entropy]) (models/decoder.py)
        return Task(kind="lm", trained=lm, target=lm, metrics=("mtp/loss",) if lm.config.mtp_layers else ())
    if task.kind == "rm":
        rm = RewardModel(lm, seed=plan.seed)
        return Task(kind="rm", trained=rm, target=rm, metrics=RewardModel.METRICS)
    cls = {"dpo": DpoStep, "simpo": SimpoStep, "prm": PrmStep}[task.kind]
    target = cls(lm) if cls is PrmStep else cls(lm, task)
    return Task(kind=task.kind, trained=lm, target=target, metrics=cls.METRICS)


def graph_inputs(plan, rows: int | None = None) -> tuple[torch.Tensor, ...]:
    """Example inputs of the captured graph (zeros, shapes and dtypes as the table above). S is the sequence
    one rank holds: the plan's seq_len, or seq_len / cp under context parallelism (the engine cuts each row's
    tokens to this rank's, graphllm.planning.context.cp_token_index)."""
    return _zeros(plan, rows or plan.batch_size, local_seq_len(plan))


def _zeros(plan, rows: int, seq: int) -> tuple[torch.Tensor, ...]:
    shape, dev = (rows, seq), plan.device
    batch: tuple[torch.Tensor, ...] = (torch.zeros(shape, dtype=torch.long, device=dev),
                                       torch.zeros(shape, dtype=torch.long, device=dev))
    if plan.task.kind == "dpo":
        batch += (torch.zeros(rows, dtype=torch.float32, device=dev),)
    elif plan.task.kind == "prm":
        batch += (torch.zeros(rows, 2, dtype=torch.long, device=dev),)
    if plan.eod_reset:
        batch += (torch.arange(shape[1], device=dev).expand(shape).contiguous(),)
    return batch


def local_seq_len(plan) -> int:
    """Tokens of each row one rank's graph takes: seq_len / cp."""
    return plan.seq_len // plan.layout.cp


def batch_example(plan, rows: int | None = None) -> tuple[torch.Tensor, ...]:
    """What a step's batch holds (Engine.forward_backward's arguments): the graph's inputs, whole sequences
    (seq_len tokens: the engine takes each rank's), less DPO's reference log-probs under `--reference graph`
    (the engine computes them)."""
    batch = _zeros(plan, rows or plan.batch_size, plan.seq_len)
    if uses_reference_graph(plan):
        return batch[:2] + batch[3:]
    return batch


def uses_reference_graph(plan) -> bool:
    """The engine runs the reference graph on every micro-batch (DPO with `--reference graph`)."""
    return plan.task.kind == "dpo" and plan.task.reference == "graph"
