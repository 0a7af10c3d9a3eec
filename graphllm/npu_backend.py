"""The Ascend backend: torchair compiles graphllm's forward/backward graphs for NPU graph execution.

Importing this module imports no torch_npu (installed without Ascend CANN, torch_npu breaks `import
torch`); only `load_torch_npu` and `make_npu_backend` do, when `--backend npu` is chosen.

graphllm keeps control of autograd: its own aot_autograd wrapper partitions (torchair's backend would
use default_partition with no recomputation and skip graphllm's train passes), runs the train passes,
then hands each forward/backward graph to torchair's FX compiler (`torchair.get_compiler(config)`).
The plan's npu options map onto torchair's CompilerConfig through `compiler_config_settings`.
COMPILER_CONFIG_FIELDS and TORCHAIR_FUNCTIONS list everything used of torchair; the contract test checks
them against the torch_npu 2.13.0 wheel's sources.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch.fx as fx

from graphllm.backends import TrainStage

TORCHAIR_FUNCTIONS = ("CompilerConfig", "get_compiler", "get_npu_backend")
COMPILER_CONFIG_FIELDS = (
    "mode",
    "debug.graph_dump.type",
    "debug.graph_dump.path",
    "experimental_config.frozen_parameter",
    "experimental_config.tiling_schedule_optimize",
    "experimental_config.topology_sorting_strategy",
)


def compiler_config_settings(plan: Mapping[str, Any], dump_dir: Path | None) -> dict[str, Any]:
    """The CompilerConfig attributes (dotted paths) the plan's npu options set."""
    settings: dict[str, Any] = {
        "mode": plan.get("npu_mode", "max-autotune"),
        "experimental_config.topology_sorting_strategy": plan.get("npu_topology_sorting", "DFS"),
    }
    if plan.get("npu_frozen_parameter"):
        settings["experimental_config.frozen_parameter"] = True
    if plan.get("npu_tiling_schedule_optimize"):
        settings["experimental_config.tiling_schedule_optimize"] = True
    dump = plan.get("npu_graph_dump", "none")
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


def make_npu_backend(stage: TrainStage):
    """graphllm's aot_autograd wrapper around torchair's FX compiler (see the module docstring)."""
    load_torch_npu()
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import default_partition
    from torch_npu.dynamo import torchair

    dump_dir = stage.dump_dir.parent / "npu" if stage.dump_dir is not None else None
    settings = compiler_config_settings(stage.ctx_template.plan, dump_dir)
    npu_compile = torchair.get_compiler(apply_settings(torchair.CompilerConfig(), settings))

    def compiler(kind: str):
        def compile_graph(gm: fx.GraphModule, example_inputs: list) -> Callable:
            return npu_compile(stage.run(gm, kind), example_inputs)
        return compile_graph

    return aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"),
                        inference_compiler=compiler("inference"), partition_fn=default_partition)


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
