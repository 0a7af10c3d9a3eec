"""Backends: how a post-pass model graph becomes a callable training step.

Each backend is a Dynamo backend built around aot_autograd, so the model graph is split into forward
and backward ATen graphs; graphllm's `train`-stage passes run on those graphs (`TrainStage.run`),
then the backend compiles them. Register a new one with `register_backend`.

- eager: aot_autograd with the default partitioner and no compiler: the graphs run op by op. graphllm
  ops are kept, so their reference kernels and autograd rules run. For debugging and fast tests.
- inductor: `compile_fx` with graphllm's hook in its inner compiler (after partitioning, before
  inductor's own lowering); graphllm ops are lowered to their fusable decompositions first.
- npu: torchair's FX compiler under graphllm's aot_autograd wrapper (graphllm/npu_backend.py); needs
  torch_npu and Ascend CANN.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from graphllm.dump import INPUT_META_KEY, write_graph
from graphllm.errors import GraphllmError
from graphllm.passes.manager import GraphPass, PassContext, PassRecord, run_passes


@dataclass(kw_only=True)
class TrainStage:
    """Runs the `train` passes on each aot_autograd graph, dumps it, and keeps statistics."""

    passes: Sequence[GraphPass]
    ctx_template: PassContext
    dump_dir: Path | None = None
    records: list[PassRecord] = field(default_factory=list)
    graphs: dict[str, fx.GraphModule] = field(default_factory=dict)
    compiles: dict[str, int] = field(default_factory=dict)
    dumps: list[dict[str, Any]] = field(default_factory=list)
    recompute: str = "none"
    """Activation recomputation policy (graphllm.recompute.RECOMPUTE_POLICIES); picks the partition function."""
    recompute_options: dict[str, Any] = field(default_factory=dict)
    """The policy's options (graphllm.recompute.check_options)."""
    input_names: list[str] = field(default_factory=list)
    """What each input of the compiled graph is (parameter path or argument name), in order; aot_autograd
    names them primals_1, primals_2, ... in the same order."""

    def run(self, gm: fx.GraphModule, kind: str) -> fx.GraphModule:
        n = self.compiles.get(kind, 0)
        self.compiles[kind] = n + 1
        t = self.ctx_template
        ctx = PassContext(plan=t.plan, rank=t.rank, world_size=t.world_size, config=t.config, logger=t.logger,
                          stage="train", graph_kind=kind)  # counters: this graph's own
        name = kind if n == 0 else f"{kind}_{n}"
        for node in gm.graph.nodes:
            m = _PRIMAL.fullmatch(node.name) if node.op == "placeholder" else None
            if m and int(m.group(1)) <= len(self.input_names):
                node.meta[INPUT_META_KEY] = self.input_names[int(m.group(1)) - 1]
        if kind == "backward" and self.recompute != "none":
            from graphllm.recompute import mark_recomputed

            mark_recomputed(gm)  # stamp recomputed forward ops so dumps and `graphllm inspect` show them
        dump = None
        if self.dump_dir is not None:
            def dump(g: fx.GraphModule, pass_name: str) -> None:
                self.dumps.append(write_graph(g, self.dump_dir / f"{name}.after_{pass_name}", title=f"{name} after {pass_name}"))
        gm, records = run_passes(gm, self.passes, ctx, dump=dump)
        self.records.extend(records)
        self.graphs[name] = gm
        if self.dump_dir is not None:
            self.dumps.append(write_graph(gm, self.dump_dir / name, title=f"{name} graph after partitioning",
                                          default_pass="aot_autograd"))
        return gm

    def wrap(self, dynamo_backend: Callable) -> Callable:
        """Record the Dynamo graph's input names before handing it to the backend."""
        def backend(gm: fx.GraphModule, example_inputs: list):
            self.input_names = [_source_name(n) for n in gm.graph.nodes if n.op == "placeholder"]
            return dynamo_backend(gm, example_inputs)
        return backend


_PRIMAL = re.compile(r"primals_(\d+)")
_SOURCE_PART = re.compile(r"_(?:modules|parameters|buffers)\['([^']+)'\]|L\['([^']+)'\]")


class StageSet:
    """Several TrainStages (one per pipeline stage and the loss) seen as one: the report and the
    artifact read `records`, `graphs`, `dumps` and `compiles` from either."""

    def __init__(self) -> None:
        self.stages: dict[str, TrainStage] = {}

    def add(self, name: str, stage: TrainStage) -> TrainStage:
        self.stages[name] = stage
        return stage

    @property
    def records(self) -> list[PassRecord]:
        return [r for s in self.stages.values() for r in s.records]

    @property
    def graphs(self) -> dict[str, fx.GraphModule]:
        return {f"{name}/{k}": g for name, s in self.stages.items() for k, g in s.graphs.items()}

    @property
    def dumps(self) -> list[dict[str, Any]]:
        return [d for s in self.stages.values() for d in s.dumps]

    @property
    def compiles(self) -> dict[str, int]:
        return {f"{name}/{k}": n for name, s in self.stages.items() for k, n in s.compiles.items()}


def _source_name(node: fx.Node) -> str:
    """`L['self']._modules['model']._parameters['weight']` → `model.weight`; `L['input_ids']` → `input_ids`."""
    arg = node.meta.get("grapharg")
    source = getattr(getattr(arg, "source", None), "name", None)
    if not isinstance(source, str):
        return node.name
    parts = [a or b for a, b in _SOURCE_PART.findall(source)]
    return ".".join(p for p in parts if p != "self") or node.name


BackendFactory = Callable[[TrainStage], Callable[[fx.GraphModule, list], Callable]]


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    lowering: str
    """Key of this backend's table in graphllm.ops.lowering.LOWERINGS."""
    make: BackendFactory
    """TrainStage -> a Dynamo backend (gm, example_inputs) -> callable."""
    description: str
    prepare: Callable[[], None] | None = None
    """Run before lowering (e.g. load the device runtime whose kernels the lowering table checks)."""


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS:
        raise GraphllmError(f"unknown backend {name!r}; choose one of: {', '.join(backend_names())}")
    if name == "npu":
        _check_npu_available()
    return _BACKENDS[name]


def _eager(stage: TrainStage):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from graphllm.recompute import partition_fn_for

    def compiler(kind: str):
        def compile_graph(gm: fx.GraphModule, example_inputs: list) -> Callable:
            return make_boxed_func(stage.run(gm, kind).forward)
        return compile_graph

    return aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"),
                        inference_compiler=compiler("inference"),
                        partition_fn=partition_fn_for(stage.recompute, stage.recompute_options))


def _inductor(stage: TrainStage):
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    from graphllm.recompute import inductor_config_patches

    def inner(gm: fx.GraphModule, example_inputs: list, **kwargs: Any):
        kind = "backward" if kwargs.get("is_backward") else "inference" if kwargs.get("is_inference") else "forward"
        return compile_fx_inner(stage.run(gm, kind), example_inputs, **kwargs)

    def backend(gm: fx.GraphModule, example_inputs: list):
        # AOTAutograd's cache would serve compiled graphs without calling `inner`, skipping graphllm's
        # train passes and dumps (and its key does not cover them). Inductor's own FX graph cache stays
        # on: it keys on the graph after graphllm's passes.
        # Recompute policies reach inductor's own min-cut partitioner through config: the tags as a
        # joint-graph pass (it runs before partitioning), the budget as activation_memory_budget.
        functorch_patches, inductor_patches = inductor_config_patches(stage.recompute, stage.recompute_options)
        with torch._functorch.config.patch(enable_autograd_cache=False, **functorch_patches):
            return compile_fx(gm, example_inputs, inner_compile=inner, config_patches=inductor_patches or None)

    return backend


def _check_npu_available() -> None:
    # find_spec only: importing torch_npu without CANN breaks `import torch` in this process
    if importlib.util.find_spec("torch_npu") is None:
        raise GraphllmError("backend 'npu' needs torch_npu and Ascend CANN: install them (pip install "
                            "'graphllm[npu]' on an Ascend machine) or choose --backend inductor or eager")


register_backend(Backend(name="eager", lowering="eager", make=_eager,
                         description="aot_autograd graphs run op by op (debugging, fast tests)"))
register_backend(Backend(name="inductor", lowering="decompose", make=_inductor,
                         description="torch inductor (CPU C++/OpenMP, CUDA Triton)"))


def _npu(stage: TrainStage):
    from graphllm.npu_backend import make_npu_backend  # torch_npu lives behind this import only

    return make_npu_backend(stage)


def _load_torch_npu() -> None:
    from graphllm.npu_backend import load_torch_npu

    load_torch_npu()


register_backend(Backend(name="npu", lowering="npu", make=_npu, prepare=_load_torch_npu,
                         description="torchair to Ascend graph execution (needs torch_npu + CANN)"))


def saved_activation_bytes(backward: fx.GraphModule) -> int:
    """Bytes the forward saves for the backward, parameters and inputs excluded.

    The partitioned backward graph's placeholders are the saved values plus `tangents_*` (incoming
    gradients); saved values named `primals_*` are the step's inputs and parameters themselves.
    """
    total = 0
    for node in backward.graph.nodes:
        if node.op != "placeholder" or node.name.startswith(("tangents", "primals")):
            continue
        v = node.meta.get("val")
        if isinstance(v, torch.Tensor):
            total += _hint(v.numel()) * v.element_size()
    return total


def _hint(n) -> int:
    """An element count that may be symbolic (inductor saves the CPU RNG state, a tensor of symbolic
    size, to recompute random-capable ops such as SDPA): its size hint."""
    try:
        return int(n)
    except (TypeError, RuntimeError):
        hint = getattr(getattr(n, "node", None), "hint", None)
        return int(hint) if hint is not None else 0
