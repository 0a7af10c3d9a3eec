"""`graphllm.compile`: capture → the pipeline's model steps → lowering → backend (partition + train passes)."""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from graphllm.backends import Backend, get_backend
from graphllm.capture import capture
from graphllm.dump import write_graph
from graphllm.errors import GraphllmError
from graphllm.ops.groups import NO_GROUPS, GroupResolver
from graphllm.pass_pipeline import Pipeline, Purpose, build_pipeline
from graphllm.passes import GraphPass, PassContext, PassRecord, run_passes
from graphllm.plan import CompilePlan
from graphllm.planning.layout import Layout
from graphllm.planning.moe_config import MoeConfig
from graphllm.planning.recompute_config import RecomputeConfig
from graphllm.train_stage import TrainStage

logger = logging.getLogger("graphllm")
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def graph_hash(gm: fx.GraphModule) -> str:
    """Identity of a graph's computation (its generated code), used to tell stale artifacts apart."""
    return hashlib.sha256(gm.code.encode()).hexdigest()[:16]


@dataclass(kw_only=True)
class CompileResult:
    """Everything the compile step learned, for the artifact and the report."""

    model_graph: fx.GraphModule
    """The graph after the model-stage passes, before lowering (what TP/user passes see)."""
    lowered_graph: fx.GraphModule
    records: list[PassRecord]
    dumps: list[dict[str, Any]]
    pipeline: Pipeline
    train_stage: Any
    """The TrainStage (a StageSet under pipeline parallelism): train-pass records, graphs, dumps."""
    backend: str
    example_shapes: list[tuple[int, ...]]
    model_graph_hash: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent capturing ("capture") and in the model and lowering steps ("passes")."""


class CompiledModel(nn.Module):
    """The compiled model: call it like the model; its parameters are the model's own."""

    def __init__(self, model: nn.Module, fn, result: CompileResult, amp: str):
        super().__init__()
        self.model = model
        self._fn = fn
        self.result = result
        self.amp = amp

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        shapes = [tuple(t.shape) for t in inputs]
        if shapes != self.result.example_shapes:
            want = " ".join(str(list(s)) for s in self.result.example_shapes)
            got = " ".join(str(list(s)) for s in shapes)
            raise GraphllmError(f"inputs have shapes {got} but this graph was compiled for {want}; "
                                "graphllm graphs are static: recompile for the new shape")
        # the graph is specialised to contiguous inputs (what compiling and warm-up pass): a data feed's labels
        # are a view of [batch, seq + 1] tokens (stride seq + 1), which would make Dynamo compile everything again
        # at the first training step. A copy of a few integer rows costs nothing next to that; values are equal.
        inputs = tuple(t if t.stride() == _dense_strides(t.shape) else torch.empty(t.shape, dtype=t.dtype,
                       device=t.device).copy_(t) for t in inputs)  # (is_contiguous() ignores size-1 dims' strides)
        dtype = AMP_DTYPES[self.amp]
        if dtype is None:
            return self._fn(*inputs)
        with torch.autocast(device_type=inputs[0].device.type, dtype=dtype):
            return self._fn(*inputs)

    @property
    def compile_counts(self) -> dict[str, int]:
        """How many times each aot graph kind was compiled (a static graph compiles once)."""
        return dict(self.result.train_stage.compiles)


def _dense_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major strides of `shape` (what torch.empty gives)."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def compile(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    labels: torch.Tensor | None = None,
    *,
    passes: Sequence[GraphPass] | None = None,
    backend: str = "eager",
    disable: Iterable[str] = (),
    amp: str = "fp32",
    dump_dir: str | Path | None = None,
    layout: Layout | None = None,
    recompute: RecomputeConfig | None = None,
    groups: GroupResolver | None = None,
    rank: int = 0,
    extra_inputs: Sequence[torch.Tensor] = (),
    purpose: Purpose = "train",
) -> CompiledModel:
    """Compile `model` for inputs shaped like `example_inputs`.

    With `labels`, the captured graph is the training step's forward including the loss
    (`model(input_ids, labels) -> loss`), so the backend can fuse the loss with the LM head; without,
    it is `model(input_ids) -> logits`. `extra_inputs` follow the labels (`position_ids` of packed rows:
    `model(input_ids, labels, position_ids) -> loss`). `passes` defaults to `default_passes()`; passes
    in it that graphllm does not define are user passes (`train`-stage ones run on the forward/backward
    graphs). `layout` and `recompute` add the parallel and recomputation steps (graphllm.pass_pipeline);
    under a layout of several ranks, `groups` is this rank's ParallelState. `dump_dir` receives one
    readable dump per pass.
    """
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if labels is not None:
        inputs = inputs + (labels,)
    if extra_inputs:
        if labels is None:
            raise GraphllmError("compile: extra_inputs follow the labels; pass labels too")
        inputs = inputs + tuple(extra_inputs)
    plan = plan_for(model, inputs, backend=backend, amp=amp, disable=disable, layout=layout, recompute=recompute)
    pipeline = build_pipeline(plan, purpose=purpose, passes=passes)
    return compile_pipeline(model, inputs, pipeline, groups=groups, rank=rank, dump_dir=dump_dir)


def plan_for(model: nn.Module, inputs: Sequence[torch.Tensor], *, backend: str, amp: str = "fp32",
             disable: Iterable[str] = (), layout: Layout | None = None,
             recompute: RecomputeConfig | None = None) -> CompilePlan:
    """The CompilePlan of a Python-API compile: shapes and device from the inputs, the rest as given."""
    if amp not in AMP_DTYPES:
        raise GraphllmError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    get_backend(backend)
    ids = inputs[0]
    return CompilePlan(model=getattr(model, "source", type(model).__name__), batch_size=ids.shape[0],
                       seq_len=ids.shape[-1] if ids.dim() > 1 else 1, backend=backend, amp=amp,
                       device=ids.device.type if backend != "npu" else "npu", disable=list(disable),
                       layout=layout or Layout(), recompute=recompute or RecomputeConfig(),
                       moe=MoeConfig(stats="off"))  # the API's contract: model(ids, labels) -> the loss alone


def compile_pipeline(model: nn.Module, inputs: tuple[torch.Tensor, ...], pipeline: Pipeline, *,
                     groups: GroupResolver | None = None, rank: int = 0,
                     dump_dir: str | Path | None = None) -> CompiledModel:
    """Run `pipeline` on `model(*inputs)` and compile the result (one graph; see graphllm.job for pp > 1)."""
    prepared = prepare_graph(model, inputs, pipeline, groups=groups, rank=rank, dump_dir=dump_dir)
    stage = prepared.train_stage("")
    fn = compile_graph(prepared.gm, prepared.backend, stage)
    result = CompileResult(
        model_graph=prepared.model_graph, lowered_graph=prepared.gm, records=prepared.records, dumps=prepared.dumps,
        pipeline=pipeline, train_stage=stage, backend=pipeline.plan.backend,
        example_shapes=[tuple(t.shape) for t in inputs], model_graph_hash=prepared.model_hash,
        timings=prepared.timings,
    )
    return CompiledModel(model, fn, result, pipeline.plan.amp)


@dataclass(kw_only=True)
class PreparedGraph:
    """A model captured, passed and lowered for one backend on one rank, not yet compiled."""

    gm: fx.GraphModule
    model_graph: fx.GraphModule
    model_hash: str
    records: list[PassRecord]
    dumps: list[dict[str, Any]]
    pipeline: Pipeline
    ctx: PassContext
    dump_root: Path | None
    backend: Backend
    timings: dict[str, float] = field(default_factory=dict)

    def train_stage(self, name: str) -> TrainStage:
        """A TrainStage for one compiled graph; `name` ("" for the whole model, "stage1" ...) prefixes its dumps."""
        dump_dir = None
        if self.dump_root is not None:
            dump_dir = self.dump_root / "train" / name if name else self.dump_root / "train"
        return TrainStage(plan=self.pipeline.plan, passes=self.pipeline.train_passes, ctx_template=self.ctx,
                          dump_dir=dump_dir)


def prepare_graph(model: nn.Module, inputs: tuple[torch.Tensor, ...], pipeline: Pipeline, *,
                  groups: GroupResolver | None = None, rank: int = 0,
                  dump_dir: str | Path | None = None) -> PreparedGraph:
    """Capture `model(*inputs)`, run the pipeline's model steps, adopt parameters the passes replaced
    (sharding) into `model`, and run its lowering step."""
    plan = pipeline.plan
    be = get_backend(plan.backend)
    dump_root = Path(dump_dir) if dump_dir is not None else None
    model_dumps = dump_root / "model" if dump_root else None
    dumps: list[dict[str, Any]] = []
    counter = itertools.count()

    def dump(gm: fx.GraphModule, name: str) -> None:
        if model_dumps is not None:
            dumps.append(write_graph(gm, model_dumps / f"{next(counter):02d}_{name}", title=f"model graph after {name}"))

    t0 = time.perf_counter()
    gm = capture(model, inputs)
    t1 = time.perf_counter()
    dump(gm, "capture")
    ctx = PassContext(layout=plan.layout, rank=rank, config=getattr(model, "config", None),
                      groups=groups if groups is not None else NO_GROUPS, recompute=plan.recompute,
                      backend=plan.backend, amp=plan.amp)
    gm, records = run_passes(gm, pipeline.model_passes, ctx, dump=dump)
    adopt_parameters(model, gm)
    if plan.lora.qlora:
        from graphllm.passes.quantize_base import release_quantized_base

        release_quantized_base(model, gm)  # QLoRA: the model drops the fp32 base the graph no longer reads
    model_hash = graph_hash(gm)
    model_graph = fx.GraphModule(gm, gm.graph.__deepcopy__())  # keep the pre-lowering view
    if be.prepare is not None:
        be.prepare()
    gm, lower_records = run_passes(gm, pipeline.lowering, ctx, dump=dump)
    timings = {"capture": t1 - t0, "passes": time.perf_counter() - t1}
    return PreparedGraph(gm=gm, model_graph=model_graph, model_hash=model_hash, records=records + lower_records,
                         dumps=dumps, pipeline=pipeline, ctx=ctx, dump_root=dump_root, backend=be, timings=timings)


def compile_graph(gm: fx.GraphModule, be: Backend, stage: TrainStage):
    """torch.compile one prepared graph through a backend, with `stage` running the train passes."""
    return torch.compile(gm, backend=be.dynamo_backend(stage), fullgraph=True, dynamic=False)


def adopt_parameters(model: nn.Module, gm: fx.GraphModule) -> None:
    """Make `model` hold the parameters the graph uses, where a pass replaced one (e.g. by its shard),
    so the optimizer, checkpoints and `model.parameters()` see what the graph trains."""
    for name, p in gm.named_parameters(remove_duplicate=False):
        owner_name, _, attr = name.rpartition(".")
        try:
            owner = model.get_submodule(owner_name) if owner_name else model
        except AttributeError:
            continue
        current = getattr(owner, attr, None)
        if current is not p and (isinstance(current, nn.Parameter) or not hasattr(owner, attr)):
            setattr(owner, attr, p)  # a replaced parameter (a shard), or a new one (LoRA's lora_A / lora_B)
