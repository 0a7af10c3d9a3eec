"""The Ascend backend: torchair compiles graphllm's forward/backward graphs for NPU graph execution.

Imported only when `--backend npu` is chosen and torch_npu is installed: importing torch_npu without
Ascend CANN breaks `import torch` itself, so nothing in the default install imports this module.
"""

from __future__ import annotations

from typing import Callable

import torch.fx as fx

from graphllm.backends import TrainStage


def make_npu_backend(stage: TrainStage):
    """graphllm's aot_autograd wrapper around torchair's FX compiler, so the train passes run here as on
    the other backends (torchair's own backend would partition without them). Written against the
    torch_npu 2.13 API; exercised on Ascend hardware only (the torchair issue checks it by contract)."""
    import torch_npu  # noqa: F401  (registers the NPU device; only reached on Ascend machines)
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import default_partition
    from torch_npu.dynamo import torchair

    npu_compile = torchair.get_compiler(torchair.CompilerConfig())

    def compiler(kind: str):
        def compile_graph(gm: fx.GraphModule, example_inputs: list) -> Callable:
            return npu_compile(stage.run(gm, kind), example_inputs)
        return compile_graph

    return aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"),
                        inference_compiler=compiler("inference"), partition_fn=default_partition)
