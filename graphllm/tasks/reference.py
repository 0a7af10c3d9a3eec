"""DPO's reference model: a forward-only graph of sequence log-probabilities, and the precomputed table.

`--reference graph`: `reference_target` is captured through `build_pipeline(plan, purpose="reference")`
(the plan's pipeline without its adapter steps) and compiled once; the engine runs it, under no_grad, on each
micro-batch's rows before the policy step. Its weights:
- with LoRA: the LM's own Parameters (a shallow clone of the module tree sharing every Parameter and buffer,
  so compiling it adopts nothing into the policy): the frozen base, adapters off — no second copy; with QLoRA
  its pipeline quantises the base like the policy's and drops the adapters (`adapters_off`), so it reads the same
  NF4 buffers as the policy (the rounded base the policy trains on) and nothing holds the fp32 base;
- without LoRA: a frozen deep copy of the LM as loaded (the `--model` weights), made before the policy is
  compiled (so under tensor parallelism it is sharded from the full weights like the policy).

`--reference precompute`: `precompute_reference` runs the same graph once over a split's pairs before
training and returns the table the data feed then serves with each batch; the graph and its weights are
dropped afterwards. The policy at step 0 is the reference, so both modes give the same reference log-probs.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from graphllm.tasks.objectives import ReferenceLogps


def _shallow_clone(module: nn.Module) -> nn.Module:
    """New module objects sharing every Parameter and buffer of `module`."""
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


def reference_target(plan, lm: nn.Module) -> ReferenceLogps:
    """The reference's capture target for `plan` (see the module docstring); logps averaged for ipo."""
    average = plan.task.dpo_loss == "ipo"
    if plan.lora.enabled:
        return ReferenceLogps(_shallow_clone(lm), average=average)
    frozen = copy.deepcopy(lm)
    frozen.requires_grad_(False)
    return ReferenceLogps(frozen, average=average)


def precompute_reference(reference, dataset, *, micro_batch: int, device: str, dp_rank: int = 0, dp: int = 1,
                         group=None) -> np.ndarray:
    """Reference log-probs of every pair of `dataset` (a pairwise dataset or blend): float32 [pairs, 2]
    (chosen, rejected). `reference` is the compiled reference graph for [micro_batch, S] rows; data-parallel
    rank `dp_rank` of `dp` computes every dp-th micro-batch and the table is summed over `group` (float32, the
    graph's own dtype: each value is stored exactly)."""
    from graphllm.data.datasets import collate

    per_call = micro_batch // 2
    n = len(dataset)
    table = torch.zeros(n, 2, dtype=torch.float32)
    for k, start in enumerate(range(0, n, per_call)):
        if k % dp != dp_rank:
            continue
        indices = np.arange(start, start + per_call) % n  # the last call wraps around to fill its rows
        ids, labels, _ = collate(dataset, indices)
        with torch.no_grad():
            logps = reference(ids.to(device), labels.to(device)).float().cpu().view(per_call, 2)
        take = min(per_call, n - start)
        table[start:start + take] = logps[:take]
    if group is not None:
        import torch.distributed as dist

        on_device = table.to(device)  # the group's backend may only reduce device tensors (nccl, hccl)
        dist.all_reduce(on_device, group=group)
        table = on_device.cpu()
    return table.numpy()
