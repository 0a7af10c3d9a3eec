"""Backends: how a post-pass model graph becomes a callable training step.

Every backend is a Dynamo backend built around aot_autograd: the model graph is split into forward and
backward ATen graphs by the plan's partition policy (recompute), graphllm's train passes run on each
(`TrainStage.run`), then the backend compiles them. The seam is typed so that it cannot be half-wired:

- an *aot* backend gives only `graph_compiler(stage) -> (gm, example_inputs) -> callable` for one
  partitioned graph; graphllm's own aot_autograd wrapper (`aot_backend`) does the partitioning with
  `stage.partition_fn()` and runs the train passes, identically for every such backend;
- a backend that partitions the joint graph itself (inductor) gives `dynamo(stage)` and must apply the
  stage's policy through its own hooks (`_inductor`: inductor's config patches).

- eager: the partitioned graphs run op by op; graphllm ops keep their kernels and autograd rules.
- inductor: `compile_fx`, graphllm's hook in its inner compiler (after partitioning, before inductor's
  own lowering); graphllm ops are lowered to their fusable decompositions first.
- npu: torchair's FX compiler per partitioned graph (graphllm/npu_backend.py); needs torch_npu + CANN.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from graphllm.errors import GraphllmError
from graphllm.train_stage import TrainStage

GraphCompiler = Callable[[fx.GraphModule, list], Callable]
"""Compiles one partitioned forward/backward graph (after the train passes) into a boxed callable."""
DynamoBackend = Callable[[fx.GraphModule, list], Callable]


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    lowering: str
    """Key of this backend's table in graphllm.ops.lowering.LOWERINGS."""
    description: str
    graph_compiler: Callable[[TrainStage], GraphCompiler] | None = None
    """An aot backend: the stage → a compiler for one partitioned graph (see the module docstring)."""
    dynamo: Callable[[TrainStage], DynamoBackend] | None = None
    """A backend that partitions itself: the stage → a Dynamo backend honouring `stage.plan.recompute`."""
    prepare: Callable[[], None] | None = None
    """Run before lowering (e.g. load the device runtime whose kernels the lowering table checks)."""

    def __post_init__(self) -> None:
        if (self.graph_compiler is None) == (self.dynamo is None):
            raise GraphllmError(f"backend {self.name!r}: give exactly one of graph_compiler (an aot backend) or "
                                "dynamo (a backend that partitions the joint graph itself)")

    def dynamo_backend(self, stage: TrainStage) -> DynamoBackend:
        """The Dynamo backend compiling one captured graph under `stage`."""
        inner = self.dynamo(stage) if self.dynamo is not None else aot_backend(stage, self.graph_compiler(stage))
        return stage.wrap(inner)


def aot_backend(stage: TrainStage, compile_graph: GraphCompiler) -> DynamoBackend:
    """graphllm's aot_autograd wrapper: partition with the stage's policy, run the train passes on each
    graph, then `compile_graph` it."""
    from torch._dynamo.backends.common import aot_autograd

    def compiler(kind: str):
        def compile_one(gm: fx.GraphModule, example_inputs: list) -> Callable:
            return compile_graph(stage.run(gm, kind), example_inputs)
        return compile_one

    return aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"),
                        inference_compiler=compiler("inference"), partition_fn=stage.partition_fn())


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def unregister_backend(name: str) -> None:
    """Remove a backend registered with `register_backend` (tests, plugins that unload)."""
    _BACKENDS.pop(name, None)


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def lookup_backend(name: str) -> Backend:
    """The registered backend `name` (without checking that its device runtime is installed)."""
    if name not in _BACKENDS:
        raise GraphllmError(f"unknown backend {name!r}; choose one of: {', '.join(backend_names())}")
    return _BACKENDS[name]


def get_backend(name: str) -> Backend:
    """The registered backend `name`, refused with one line when its device runtime is missing."""
    be = lookup_backend(name)
    if name == "npu":
        _check_npu_available()
    return be


def eager_graph_compiler(stage: TrainStage) -> GraphCompiler:
    """Run each partitioned graph op by op (graphllm ops keep their kernels and autograd rules)."""
    from functorch.compile import make_boxed_func

    return lambda gm, example_inputs: make_boxed_func(gm.forward)


def _inductor(stage: TrainStage) -> DynamoBackend:
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    from graphllm.compile_cache import library_paths
    from graphllm.recompute import inductor_config_patches

    def inner(gm: fx.GraphModule, example_inputs: list, **kwargs: Any):
        kind = "backward" if kwargs.get("is_backward") else "inference" if kwargs.get("is_inference") else "forward"
        compiled = compile_fx_inner(stage.run(gm, kind), example_inputs, **kwargs)
        stage.libraries.extend(library_paths(compiled))  # what `graphllm compile` stores in the artifact
        return compiled

    def backend(gm: fx.GraphModule, example_inputs: list):
        # AOTAutograd's cache would serve compiled graphs without calling `inner`, skipping graphllm's
        # train passes and dumps (and its key does not cover them). Inductor's own FX graph cache stays
        # on: it keys on the graph after graphllm's passes (and an artifact carries its entries:
        # graphllm/compile_cache.py).
        # Recompute policies reach inductor's own min-cut partitioner through config: the tags as a
        # joint-graph pass (it runs before partitioning), the budget as activation_memory_budget.
        functorch_patches, inductor_patches = inductor_config_patches(stage.plan.recompute)
        if stage.plan.activation_offload.enabled:  # the offload rewrite after inductor's own partitioner
            from graphllm.offload_activations import InductorOffloadPartitioner

            inductor_patches["custom_partitioner_fn"] = InductorOffloadPartitioner(stage.plan.activation_offload)
        with torch._functorch.config.patch(enable_autograd_cache=False, **functorch_patches):
            return compile_fx(gm, example_inputs, inner_compile=inner, config_patches=inductor_patches or None)

    return backend


def _check_npu_available() -> None:
    # find_spec only: importing torch_npu without CANN breaks `import torch` in this process
    if importlib.util.find_spec("torch_npu") is None:
        raise GraphllmError("backend 'npu' needs torch_npu and Ascend CANN: install them (pip install "
                            "'graphllm[npu]' on an Ascend machine) or choose --backend inductor or eager")


def _npu_graph_compiler(stage: TrainStage) -> GraphCompiler:
    from graphllm.npu_backend import torchair_graph_compiler  # torch_npu lives behind this import only

    return torchair_graph_compiler(stage)


def _load_torch_npu() -> None:
    from graphllm.npu_backend import load_torch_npu

    load_torch_npu()


def _load_npu_emulation() -> None:
    from graphllm.preflight.emulation import load_emulated_kernels  # the wheel's schemas, CPU kernels

    load_emulated_kernels()


register_backend(Backend(name="eager", lowering="eager", graph_compiler=eager_graph_compiler,
                         description="aot_autograd graphs run op by op (debugging, fast tests)"))
register_backend(Backend(name="inductor", lowering="decompose", dynamo=_inductor,
                         description="torch inductor (CPU C++/OpenMP, CUDA Triton)"))
register_backend(Backend(name="npu", lowering="npu", graph_compiler=_npu_graph_compiler, prepare=_load_torch_npu,
                         description="torchair to Ascend graph execution (needs torch_npu + CANN)"))
register_backend(Backend(name="npu-emulated", lowering="npu", graph_compiler=eager_graph_compiler,
                         prepare=_load_npu_emulation,
                         description="the npu lowering on CPU, torch_npu's kernels emulated with their exact schemas "
                                     "(what `graphllm compile --backend npu --dry-run` checks)"))
