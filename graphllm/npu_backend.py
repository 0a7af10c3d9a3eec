"""The Ascend backend: torchair compiles graphllm's forward/backward graphs for NPU graph execution.

Importing this module imports no torch_npu (installed without Ascend CANN, torch_npu breaks `import
torch`); only `load_torch_npu` and `make_npu_backend` do, when `--backend npu` is chosen.

graphllm keeps control of autograd: its own aot_autograd wrapper (graphllm.backends.aot_backend)
partitions with the plan's recompute policy (torchair's backend would use default_partition with no
recomputation and skip graphllm's train passes), runs the train passes, then hands each forward/backward
graph to torchair's FX compiler (`torchair.get_compiler(config)`).
The plan's npu options map onto torchair's CompilerConfig through `compiler_config_settings`.
COMPILER_CONFIG_FIELDS and TORCHAIR_FUNCTIONS list everything used of torchair; the contract test checks
them against the torch_npu 2.13.0 wheel's sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Mapping

import torch.fx as fx

from graphllm.options import check_fields, option

if TYPE_CHECKING:
    from graphllm.train_stage import TrainStage

TORCHAIR_FUNCTIONS = ("CompilerConfig", "get_compiler", "get_npu_backend")
COMPILER_CONFIG_FIELDS = (
    "mode",
    "debug.graph_dump.type",
    "debug.graph_dump.path",
    "experimental_config.frozen_parameter",
    "experimental_config.tiling_schedule_optimize",
    "experimental_config.topology_sorting_strategy",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class NpuOptions:
    """The plan's npu section: torchair CompilerConfig settings (`--npu-*` flags)."""

    FLAG_PREFIX: ClassVar[str] = "npu"

    mode: Literal["max-autotune", "reduce-overhead"] = option(
        "max-autotune", help="torchair CompilerConfig.mode: GE graph execution, or ACL graph capture")
    graph_dump: Literal["none", "txt", "pbtxt", "py"] = option(
        "none", help="torchair graph dump format (CompilerConfig.debug.graph_dump), into ARTIFACT/graphs/rank0/npu")
    frozen_parameter: bool = option(False, help="experimental_config.frozen_parameter: fixed parameter addresses "
                                                "(inference only)")
    tiling_schedule_optimize: bool = option(False, help="experimental_config.tiling_schedule_optimize: tiling on "
                                                        "AI CPU (static shapes)")
    topology_sorting: Literal["DFS", "BFS", "RDFS", "StableRDFS"] = option(
        "DFS", help="experimental_config.topology_sorting_strategy: GE's node order")

    def __post_init__(self) -> None:
        check_fields(self)


def compiler_config_settings(options: NpuOptions, dump_dir: Path | None) -> dict[str, Any]:
    """The CompilerConfig attributes (dotted paths) the plan's npu options set."""
    settings: dict[str, Any] = {
        "mode": options.mode,
        "experimental_config.topology_sorting_strategy": options.topology_sorting,
    }
    if options.frozen_parameter:
        settings["experimental_config.frozen_parameter"] = True
    if options.tiling_schedule_optimize:
        settings["experimental_config.tiling_schedule_optimize"] = True
    dump = options.graph_dump
    if dump != "none":
        settings["debug.graph_dump.type"] = dump
        if dump_dir is not None:
            settings["debug.graph_dump.path"] = str(dump_dir)
    unknown = set(settings) - set(COMPILER_CONFIG_FIELDS)
    assert not unknown, f"undeclared CompilerConfig fields {unknown}"  # keeps the contract list complete
    return settings


def apply_settings(config: Any, settings: Mapping[str, Any]) -> Any:
    for path, value in settings.items():
        *parents, leaf = path.split(".")
        target = config
        for p in parents:
            target = getattr(target, p)
        if not hasattr(target, leaf):
            raise AttributeError(f"torchair CompilerConfig has no {path}")
        setattr(target, leaf, value)
    return config


def load_torch_npu() -> None:
    import torch_npu  # noqa: F401  (registers the npu device and torch.ops.npu; Ascend machines only)


def torchair_graph_compiler(stage: "TrainStage") -> Callable[[fx.GraphModule, list], Callable]:
    """torchair's FX compiler for one partitioned graph, configured from the plan's npu options. It runs
    under graphllm's aot_autograd wrapper (graphllm.backends.aot_backend), which partitions with the plan's
    recompute policy and runs the train passes first (torchair's own backend would partition with no
    recomputation and skip them). Each graph is checked against torchair's converters first
    (graphllm.preflight.check.guarded): an op GE cannot build is refused in one line naming it."""
    load_torch_npu()
    from torch_npu.dynamo import torchair

    from graphllm.preflight.check import guarded
    from graphllm.preflight.converters import converter_index
    from graphllm.preflight.wheel import sources_version, torch_npu_sources

    dump_dir = stage.dump_dir.parent / "npu" if stage.dump_dir is not None else None
    settings = compiler_config_settings(stage.plan.npu, dump_dir)
    compiler = torchair.get_compiler(apply_settings(torchair.CompilerConfig(), settings))
    root = torch_npu_sources()  # the installed torch_npu's own sources (read, as on a CPU machine)
    return guarded(compiler, index=converter_index(root), wheel=f"torch_npu {sources_version(root)}",
                   rank=stage.ctx_template.rank, capture=stage.plan.npu.mode == "reduce-overhead",
                   graph_name=lambda: next(reversed(stage.graphs), "graph"))


# -- torch_npu.profiler for `graphllm profile` on an NPU --------------------------------------------
NPU_PROFILER_NAMES = ("profile", "ProfilerActivity", "tensorboard_trace_handler", "_ExperimentalConfig",
                      "ProfilerLevel", "AiCMetrics")
"""What `npu_profile` uses of `torch_npu.profiler` (checked against the wheel by the contract test)."""
NPU_PROFILER_CONFIG_ARGS = ("profiler_level", "aic_metrics", "data_simplification")
"""The `_ExperimentalConfig` arguments `npu_profile` passes."""


def npu_profile(out_dir: Path):
    """A torch_npu.profiler context recording host and device (CANN kernels, HCCL, memory) activity into
    `out_dir` in Ascend's format (MindStudio Insight reads it; `trace_view.json` opens in Perfetto).
    Level1 adds the AI Core pipeline utilisation of each kernel."""
    import torch_npu  # only on an Ascend machine: `graphllm profile` of an npu artifact

    prof = torch_npu.profiler
    config = prof._ExperimentalConfig(profiler_level=prof.ProfilerLevel.Level1,
                                      aic_metrics=prof.AiCMetrics.PipeUtilization, data_simplification=True)
    return prof.profile(activities=[prof.ProfilerActivity.CPU, prof.ProfilerActivity.NPU], profile_memory=True,
                        experimental_config=config, on_trace_ready=prof.tensorboard_trace_handler(str(out_dir)))
