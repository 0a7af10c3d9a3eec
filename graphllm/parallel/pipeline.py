"""Run a pipeline split (passes/pipeline_split.py) with torch.distributed.pipelining.

Each pipeline rank builds only its own stages (`layout.stages_of(pp_rank)`): a module around the
compiled stage graph, a `PipelineStage` on the pp group with example inputs/outputs taken from the
graphs' recorded shapes (static metadata, so pipelining never runs a stage to infer shapes), and
`Schedule1F1B` (vpp = 1) or `ScheduleInterleaved1F1B` (vpp > 1). The rank holding the last stage
also runs the compiled loss graph on each micro-batch's last-stage outputs and labels.

Gradient scale: each micro-batch's loss is divided by the number of micro-batches before its backward
(schedules get `scale_grads=False`), so `.grad` accumulates the gradient of the mean micro-batch
loss. That equals pipelining's `scale_grads=True`, which instead divides all of `.grad` after the
step, including gradients already there from before it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

from graphllm.errors import GraphllmError
from graphllm.parallel.groups import ParallelState
from graphllm.planning.layout import Layout

if TYPE_CHECKING:
    from graphllm.passes.pipeline_split import PipelineSplit


class StageModule(nn.Module):
    """One stage: its graph (so `.parameters()` are the stage's, plus the loss graph's on the last stage)
    and the compiled callable that runs it."""

    def __init__(self, gm: fx.GraphModule, fn: Callable, loss: fx.GraphModule | None = None):
        super().__init__()
        self.stage = gm
        if loss is not None:
            self.loss = loss
        # kept outside the module tree: a torch.compile wrapper is a module holding the same parameters
        object.__setattr__(self, "_fn", fn)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # P2P sends and the receivers' buffers are contiguous; compiled graphs may return other strides
        return tuple(t.contiguous() for t in self._fn(*args))


def _examples(nodes: Sequence[fx.Node], device: torch.device, grad: bool) -> tuple[torch.Tensor, ...]:
    """Empty tensors shaped like the nodes' recorded values; floating ones require grad when `grad`.

    Requiring grad on every floating activation is safe: a gradient that backward leaves as None is
    sent as zeros by pipelining, while a missing one would leave the receiver waiting."""
    out = []
    for n in nodes:
        v = n.meta["val"]
        t = torch.empty(tuple(v.shape), dtype=v.dtype, device=device)
        out.append(t.requires_grad_(grad and v.is_floating_point()))
    return tuple(out)


def _io(gm: fx.GraphModule) -> tuple[list[fx.Node], list[fx.Node]]:
    nodes = list(gm.graph.nodes)
    out = next(n for n in nodes if n.op == "output").args[0]
    return [n for n in nodes if n.op == "placeholder"], list(out)


class PipelineRunner:
    """This pipeline rank's stages and schedule; `forward_backward` runs one step of micro-batches."""

    def __init__(self, split: PipelineSplit, layout: Layout, st: ParallelState, *,
                 compile_stage: Callable[[fx.GraphModule, str], Callable], micro_batch_size: int, seq_len: int,
                 device: str | torch.device = "cpu", num_metrics: int = 0,
                 model_names: dict[int, str] | None = None):
        """`num_metrics`: the length of the metrics vector the loss graph returns beside the loss (0: a bare loss).
        `model_names`: id(parameter) → its name in the model (a tied LM head is the model's embedding, whatever
        name the captured graph reads it by); without it, the graphs' names."""
        layout.check_options()
        if layout.pp < 2:
            raise GraphllmError(f"a pipeline needs --pp ≥ 2, got --pp {layout.pp}")
        if len(split.stages) != layout.num_stages:
            raise GraphllmError(f"the split has {len(split.stages)} stages but pp×vpp = {layout.num_stages}; "
                                "split the graph with this layout")
        ids = _io(split.stages[0])[0][0].meta["val"]
        if tuple(ids.shape) != (micro_batch_size, seq_len):
            raise GraphllmError(f"the graph was captured for input_ids {list(ids.shape)} but a micro-batch is "
                                f"[{micro_batch_size}, {seq_len}]; capture with one micro-batch's shape")
        self.layout, self.micro_batch_size, self.seq_len = layout, micro_batch_size, seq_len
        self.num_metrics = num_metrics
        self._model_names = dict(model_names or {})
        self.shared: dict[str, tuple[nn.Parameter | torch.Tensor, tuple[int, ...]]] = {}
        """Parameters several stages read, by their first stage's name: (the parameter where this rank holds one
        of those stages, else a meta tensor of its shape and dtype: the rank keeps no copy; the stages)."""
        for name, ks in sorted(split.shared.items()):
            p = split.stages[ks[0]].get_parameter(name)
            held = any(k in layout.stages_of(st.coords.pp) for k in ks)
            self.shared[name] = (p if held else torch.empty(p.shape, dtype=p.dtype, device="meta"), ks)
        self._metrics: list[torch.Tensor] = []
        self.device = torch.device(device)
        self.group = st.group("pp")
        self._shared_groups = self._holder_groups(layout, st)
        last = layout.num_stages - 1
        self.stage_indices = layout.stages_of(st.coords.pp)
        self.pp_rank = st.coords.pp
        self.last_pp_rank = last % layout.pp
        self.holds_first, self.holds_last = 0 in self.stage_indices, last in self.stage_indices
        self.modules: list[StageModule] = []
        self.stages: list[PipelineStage] = []
        for i in self.stage_indices:
            gm = split.stages[i]
            mod = StageModule(gm, compile_stage(gm, f"stage{i}"), split.loss if i == last else None)
            ins, outs = _io(gm)
            self.modules.append(mod)
            self.stages.append(PipelineStage(
                mod, i, layout.num_stages, self.device, input_args=_examples(ins, self.device, grad=i > 0),
                output_args=_examples(outs, self.device, grad=True), group=self.group))
        self._loss = compile_stage(split.loss, "loss") if self.holds_last else None
        m = layout.micro_batches
        if layout.vpp == 1:
            self.schedule = Schedule1F1B(self.stages[0], m, loss_fn=self._micro_batch_loss, scale_grads=False)
        else:
            self.schedule = ScheduleInterleaved1F1B(self.stages, m, loss_fn=self._micro_batch_loss, scale_grads=False)

    def _micro_batch_loss(self, outputs, labels: torch.Tensor) -> torch.Tensor:
        """The loss graph on one micro-batch: its loss / M, keeping a (loss, metrics) graph's metrics aside."""
        outs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        result = self._loss(*outs, labels)
        if isinstance(result, (tuple, list)):
            self._metrics.append(result[1].detach().float().reshape(-1))
            result = result[0]
        return result / self.layout.micro_batches

    def forward_backward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Forward and backward of this data-parallel rank's batch [micro_batches * micro_batch_size, seq_len]
        (seq_len: the tokens of each row this rank holds, the plan's seq_len / cp).

        Gradients of the mean micro-batch loss accumulate into this rank's parameters' `.grad`; returns
        [that mean loss, the loss graph's metrics averaged over the micro-batches] (fp32, `num_metrics` of them:
        passes/moe_stats.py's), the same on every pipeline rank."""
        rows = self.layout.micro_batches * self.micro_batch_size
        for name, t in (("input_ids", input_ids), ("labels", labels)):
            if tuple(t.shape) != (rows, self.seq_len):
                raise GraphllmError(f"{name} is {list(t.shape)} but a pipeline step takes [micro_batches "
                                    f"{self.layout.micro_batches} × micro-batch {self.micro_batch_size}, "
                                    f"seq {self.seq_len}] = [{rows}, {self.seq_len}]")
        args = (input_ids.to(self.device),) if self.holds_first else ()
        target = labels.to(self.device) if self.holds_last else None
        losses: list[torch.Tensor] = []
        self._metrics = []
        before = self._shared_grads()
        self.schedule.step(*args, target=target, losses=losses if self.holds_last else None, return_outputs=False)
        self._sum_shared_grads(before)
        totals = torch.zeros(1 + self.num_metrics, dtype=torch.float32, device=self.device)
        if self.holds_last:
            totals[0] = torch.stack([x.detach().float() for x in losses]).sum()
            if self.num_metrics:
                totals[1:] = torch.stack(self._metrics).mean(dim=0)
        dist.broadcast(totals, group=self.group, group_src=self.last_pp_rank)
        return totals

    def _holds(self, stages: tuple[int, ...]) -> bool:
        return any(k in self.stage_indices for k in stages)

    def _shared_grads(self) -> dict[str, torch.Tensor]:
        """The gradients the shared parameters held before a step (what an earlier step left to accumulate on)."""
        return {name: p.grad.clone() for name, (p, stages) in self.shared.items()
                if self._holds(stages) and p.grad is not None}

    def _holder_groups(self, layout: Layout, st: ParallelState) -> dict[str, dist.ProcessGroup | None]:
        """Per shared parameter, the group of the pipeline ranks holding one of its stages (Megatron's embedding
        group: the first and last stages of a tied model), None on the ranks holding none. Every rank creates
        every such group, in the same order (torch.distributed.new_group's rule)."""
        made: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
        out = {}
        for name, (_, stages) in self.shared.items():  # sorted by name on every rank
            holders = tuple(sorted({k % layout.pp for k in stages}))
            if holders not in made:
                made[holders] = self.group if len(holders) == layout.pp else None
                if made[holders] is None:
                    for ranks in layout.group_ranks("pp"):  # one group per pipeline: each rank's pp group in turn
                        g = dist.new_group([ranks[h] for h in holders])
                        if st.rank in ranks:
                            made[holders] = g
            out[name] = made[holders] if st.coords.pp in holders else None
        return out

    def _sum_shared_grads(self, before: dict[str, torch.Tensor]) -> None:
        """Each parameter several stages read gets the sum of this step's gradients from all of them on every rank
        holding one (over the holders' group only), as Megatron's embedding group does for a tied embedding and LM
        head; `before`: what each held before the step, which is not summed again."""
        for name, (p, stages) in self.shared.items():  # the same order on every pipeline rank
            group = self._shared_groups[name]
            if group is None:
                continue
            g = torch.zeros(p.shape, dtype=p.dtype, device=self.device)
            if p.grad is not None:
                g += p.grad - before[name] if name in before else p.grad
            dist.all_reduce(g, group=group)
            p.grad = g + before[name] if name in before else g

    def norm_duplicates(self) -> frozenset[str]:
        """Names of this rank's shared parameters that a lower pipeline rank holds too: the gradient norm counts
        each parameter once."""
        pp = self.layout.pp
        return frozenset(self._model_names.get(id(p), name) for name, (p, stages) in self.shared.items()
                         if self._holds(stages) and self.pp_rank != min(k % pp for k in stages))

    def send_bytes_per_micro_batch(self) -> int:
        """Bytes this rank's stages send per micro-batch: activations forward (all but the last stage)
        and the gradients of their floating-point inputs backward (all but the first)."""
        last = self.layout.num_stages - 1
        total = 0
        for i, mod in zip(self.stage_indices, self.modules):
            ins, outs = _io(mod.stage)
            sent = (outs if i != last else []) + ([n for n in ins if n.meta["val"].is_floating_point()] if i else [])
            total += sum(n.meta["val"].numel() * n.meta["val"].element_size() for n in sent)
        return total

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """This rank's parameters under their full-model names (only its own stages' and the loss graph's)."""
        out: dict[str, nn.Parameter] = {}
        for mod in self.modules:
            named = list(mod.stage.named_parameters()) + (list(mod.loss.named_parameters()) if hasattr(mod, "loss") else [])
            out.update((self._model_names.get(id(p), name), p) for name, p in named)
        return out
