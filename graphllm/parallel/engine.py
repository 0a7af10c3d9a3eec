"""One rank's training step under any layout: micro-batches, data-parallel reduction, clipping, optimizer.

The step sees the same global batch on every rank (the data order is a function of the seed and the
step, not of the layout); this rank takes its data-parallel slice of the rows and, with context
parallelism, its context-parallel share of every row's tokens (graphllm.planning.context.cp_token_index),
then either runs the pipeline schedule over its micro-batches or, without a pipeline, accumulates their
gradients through the compiled graph. Gradients are then averaged over the parameters' replicas (the
data-parallel group; data × context-parallel, "dp_cp", when cp > 1), clipped by the global norm of the
whole model's gradient, and the optimizer (AdamW, or ZeRO-1 AdamW) steps. The loss a step reports is the
mean over micro-batches and data- (and context-) parallel ranks — for equal token counts per micro-batch,
exactly the single-process full-batch loss (a cp rank's graph returns a loss whose mean over the cp
group is the token-weighted loss of the whole sequences).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from graphllm.errors import GraphllmError
from graphllm.parallel.groups import ParallelState
from graphllm.planning.context import cp_token_index
from graphllm.planning.layout import Layout


def persistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of `module`'s state dict that are not parameters (persistent buffers: DeepSeek-V3's
    e_score_correction_bias), by state-dict name: model state a checkpoint must hold beside the parameters."""
    params = {id(p) for p in module.parameters()}
    return {k: v for k, v in module.state_dict(keep_vars=True).items() if id(v) not in params}


class Engine:
    """Training-step driver for one rank; `step_fn` is the compiled graph, `pipeline` a PipelineRunner."""

    def __init__(self, *, layout: Layout, st: ParallelState | None, named_params: dict[str, nn.Parameter],
                 step_fn: Any = None, pipeline: Any = None, micro_batch_size: int, seq_len: int | None = None,
                 metric_names: Sequence[str] = (), reference: Callable | None = None,
                 offload_optimizer: bool = False, named_state: dict[str, torch.Tensor] | None = None):
        """`seq_len`: the plan's (global) sequence length; needed when cp > 1: the per-token inputs (dim 1 of
        that length) are cut to this cp rank's tokens. `metric_names`: the entries of the metrics vector
        `step_fn` returns beside the loss (a task's; none: it returns a bare loss). `reference`: DPO's reference
        graph, run on each micro-batch's (input_ids, labels) to give the step its third input
        (graphllm.tasks.reference). `offload_optimizer`: the optimizer's masters and moments live in host memory
        (graphllm.parallel.master_weights). `named_state`: the model's persistent buffers (DeepSeek-V3's routing
        biases), saved and loaded with the parameters but never given to the optimizer (persistent_buffers)."""
        self.layout, self.st = layout, st
        self.named_params = named_params
        self.params = list(named_params.values())
        self.named_state = dict(named_state or {})
        self.step_fn, self.pipeline = step_fn, pipeline
        self.micro_batch_size, self.seq_len = micro_batch_size, seq_len
        self.metric_names, self.reference = tuple(metric_names), reference
        self.offload_optimizer = offload_optimizer
        self.master_weights = any(p.requires_grad and p.dtype != torch.float32 for p in self.params)
        """Trainable parameters are not fp32 (--params-dtype bf16): the optimizer keeps fp32 masters."""
        self.expert_bias: tuple[dict[str, torch.Tensor], float] | None = None
        """(the model's named buffers, rate) under --moe-bias-update-rate: graphllm.train updates the routing biases
        after each optimizer step (graphllm.parallel.expert_bias)."""
        self.metrics: dict[str, float] = {}
        """The last forward_backward / eval_loss's metrics (by name), averaged like the loss."""
        self.token_index: torch.Tensor | None = None
        """This cp rank's global token positions (cp > 1), in the order its graph takes them."""
        if layout.cp > 1:
            if seq_len is None:
                raise GraphllmError(f"an Engine for --cp {layout.cp} needs the plan's seq_len to cut each row's "
                                    "tokens; pass seq_len=")
            cp_rank = st.coords.cp if st is not None else 0
            positions = cp_token_index(seq_len, layout.cp, layout.ulysses_size)[cp_rank]
            self.token_index = torch.tensor(positions, dtype=torch.long)

    def _group(self, kind: str):
        return self.st.group(kind) if self.st is not None and self.layout.group_size(kind) > 1 else None

    def local_rows(self, t: torch.Tensor) -> torch.Tensor:
        """This data-parallel rank's rows of the global batch."""
        rows = self.micro_batch_size * self.layout.micro_batches
        if t.shape[0] != rows * self.layout.dp:
            raise GraphllmError(f"a step's batch has {t.shape[0]} rows but the plan needs micro-batch "
                                f"{self.micro_batch_size} × {self.layout.micro_batches} micro-batches × dp "
                                f"{self.layout.dp} = {rows * self.layout.dp}")
        start = (self.st.coords.dp if self.st is not None else 0) * rows
        return t[start:start + rows]

    def local_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """This context-parallel rank's tokens of a per-token tensor (dim 1 of the plan's seq_len: ids, labels,
        position ids), in the order cp_token_index gives; other tensors (per-row columns) and cp 1: `t` itself."""
        if self.token_index is None or t.dim() < 2 or t.shape[1] != self.seq_len:
            return t
        if self.token_index.device != t.device:
            self.token_index = self.token_index.to(t.device)
        return t.index_select(1, self.token_index)

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's part of a step's batch tensor: its data-parallel rows, its context-parallel tokens."""
        return self.local_tokens(self.local_rows(t))

    def forward_backward(self, input_ids: torch.Tensor, labels: torch.Tensor, *extra: torch.Tensor) -> float:
        """Forward and backward of one step's global batch; gradients left averaged in `.grad`.
        `extra`: further per-row graph inputs (position_ids of packed rows, a task's columns), sliced like
        the rows. Returns the loss; a graph returning (loss, metrics) leaves the metrics, averaged like the
        loss, in `self.metrics`."""
        if self.pipeline is not None:
            ids, lab = self.local(input_ids), self.local(labels)
            totals = self.pipeline.forward_backward(ids, lab).detach().float().reshape(-1)
        else:
            totals = self._micro_batches((input_ids, labels, *extra), backward=True)
        if self.layout.group_size(self.layout.grad_kind) > 1 and not self.layout.grads_reduced_in_graph:
            from graphllm.parallel.optim import reduce_replicas  # else the backward graph reduced them

            reduce_replicas(self.params, self.layout, self._group)
        return self._finish(totals)

    def eval_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, *extra: torch.Tensor) -> float:
        """Mean loss of one global batch without touching gradients (validation); metrics as in
        `forward_backward`. Runs the training graph's forward (grad mode stays on, so no second graph is
        compiled) and drops its result; under pipeline parallelism the schedule runs forward and backward,
        and the gradients are discarded."""
        if self.pipeline is not None:
            loss = self.forward_backward(input_ids, labels, *extra)
            for p in self.params:
                p.grad = None
            return loss
        return self._finish(self._micro_batches((input_ids, labels, *extra), backward=False))

    def _micro_batches(self, batch: tuple[torch.Tensor, ...], *, backward: bool) -> torch.Tensor:
        """Run this rank's rows through the compiled graph, micro-batch by micro-batch (backward: accumulating
        gradients of loss / M); returns [loss, *metrics] averaged over the micro-batches (float32)."""
        m = self.layout.micro_batches
        totals = None
        for mb in zip(*(self.local(t).chunk(m) for t in batch)):
            if self.reference is not None:  # DPO --reference graph: the frozen model's log-probs of these rows
                with torch.no_grad():
                    mb = (*mb[:2], self.reference(mb[0], mb[1]), *mb[2:])
            out = self.step_fn(*mb)
            loss, metrics = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
            if backward:
                (loss / m).backward()
            row = loss.detach().float().reshape(1)  # stays on the device: no sync per micro-batch
            if metrics is not None:
                row = torch.cat((row, metrics.detach().float().reshape(-1)))
            totals = row / m if totals is None else totals + row / m
        return totals

    def _finish(self, totals: torch.Tensor) -> float:
        """Average [loss, *metrics] over the data- (and context-) parallel group; keep the metrics, return the
        loss."""
        kind = self.layout.grad_kind
        replicas = self._group(kind)
        if replicas is not None:
            totals = totals.clone()
            dist.all_reduce(totals, group=replicas)  # on the loss's device (nccl/hccl reduce device tensors)
            totals /= self.layout.group_size(kind)
        self.metrics = dict(zip(self.metric_names, totals[1:].tolist()))
        return float(totals[0])

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip by the global norm of the whole model's gradient (across tensor and pipeline ranks; data- and
        context-parallel replicas hold the same averaged gradient and count once)."""
        if self.layout.world_size == 1 and not self.master_weights:  # torch's norm of bf16 grads sums in bf16
            return float(torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm > 0 else float("inf")))
        from graphllm.parallel.optim import clip_grad_norm

        duplicates = self.pipeline.norm_duplicates() if self.pipeline is not None else frozenset()
        return clip_grad_norm(self.named_params, max_norm, self.st, duplicates)

    def make_optimizer(self, cfg: Any):
        """AdamW over this rank's parameters (decay on matrices only), ZeRO-1 sharded when the plan says so; with
        fp32 master weights for non-fp32 parameters, or offloaded: master_weights.MasterAdamW."""
        if self.master_weights or self.offload_optimizer:
            from graphllm.parallel.master_weights import MasterAdamW

            return MasterAdamW(self.named_params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                               weight_decay=cfg.weight_decay, group=self._group("dp") if self.layout.zero1 else None,
                               offload=self.offload_optimizer)
        if self.layout.zero1:
            from graphllm.parallel.optim import ZeroAdamW

            return ZeroAdamW(self.named_params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, group=self._group("dp"))
        from graphllm.train import decay_groups

        return torch.optim.AdamW(decay_groups(self.params, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                 eps=cfg.eps, fused=True)
