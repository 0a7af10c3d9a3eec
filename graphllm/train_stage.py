"""The train stage: what happens to each forward/backward graph aot_autograd produces, for every backend.

A TrainStage carries the plan (so a backend reads its partition policy and options from one place),
runs the pipeline's train passes on each partitioned graph, names the graph's inputs after the
parameters they are, stamps recomputed nodes, dumps each graph, and keeps statistics. `StageSet` is
several of them (one per pipeline stage and the loss) seen as one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch.fx as fx

from graphllm.dump import INPUT_META_KEY, write_graph
from graphllm.passes.manager import GraphPass, PassContext, PassRecord, run_passes
from graphllm.planning.recompute_config import RecomputeConfig

if TYPE_CHECKING:
    from graphllm.plan import CompilePlan


@dataclass(kw_only=True)
class TrainStage:
    """Runs the `train` passes on each aot_autograd graph, dumps it, and keeps statistics."""

    plan: CompilePlan
    """The whole plan: backends read their options (recompute policy, npu settings) from it."""
    passes: Sequence[GraphPass]
    """The pipeline's train-stage passes, in order."""
    ctx_template: PassContext
    dump_dir: Path | None = None
    records: list[PassRecord] = field(default_factory=list)
    graphs: dict[str, fx.GraphModule] = field(default_factory=dict)
    compiles: dict[str, int] = field(default_factory=dict)
    dumps: list[dict[str, Any]] = field(default_factory=list)
    libraries: list[str] = field(default_factory=list)
    """Shared libraries the backend's compiled graphs load (inductor's C++ kernels): `graphllm compile` stores
    them in the artifact (graphllm/compile_cache.py)."""
    input_names: list[str] = field(default_factory=list)
    """What each input of the compiled graph is (parameter path or argument name), in order; aot_autograd
    names them primals_1, primals_2, ... in the same order."""

    @property
    def recompute(self) -> RecomputeConfig:
        return self.plan.recompute

    def partition_fn(self) -> Callable:
        """The aot_autograd partition function of the plan's recompute policy (every aot backend uses it)."""
        from graphllm.offload_activations import wrap_partition
        from graphllm.recompute import partition_fn_for

        partition = partition_fn_for(self.plan.recompute)
        if self.plan.lora.qlora:
            from graphllm.passes.quantize_base import recomputing_dequantized

            partition = recomputing_dequantized(partition)  # casts/views of NF4 weights are recomputed with them
        return wrap_partition(partition, self.plan.activation_offload)  # offloads what the policy saves

    def run(self, gm: fx.GraphModule, kind: str) -> fx.GraphModule:
        """The train passes on one partitioned graph (`kind`: forward, backward, inference), with dumps."""
        n = self.compiles.get(kind, 0)
        self.compiles[kind] = n + 1
        ctx = self.ctx_template.for_graph(kind)  # counters: this graph's own
        name = kind if n == 0 else f"{kind}_{n}"
        for node in gm.graph.nodes:
            m = _PRIMAL.fullmatch(node.name) if node.op == "placeholder" else None
            if m and int(m.group(1)) <= len(self.input_names):
                node.meta[INPUT_META_KEY] = self.input_names[int(m.group(1)) - 1]
        if kind == "backward" and self.plan.recompute.enabled:
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

    @property
    def libraries(self) -> list[str]:
        return [lib for s in self.stages.values() for lib in s.libraries]


def _source_name(node: fx.Node) -> str:
    """`L['self']._modules['model']._parameters['weight']` → `model.weight`; `L['input_ids']` → `input_ids`."""
    arg = node.meta.get("grapharg")
    source = getattr(getattr(arg, "source", None), "name", None)
    if not isinstance(source, str):
        return node.name
    parts = [a or b for a, b in _SOURCE_PART.findall(source)]
    return ".".join(p for p in parts if p != "self") or node.name
