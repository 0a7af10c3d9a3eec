"""The `npu-emulated` backend's runtime: torch_npu's kernels registered on CPU from the wheel's schemas.

`graphllm compile --backend npu --dry-run` (and `--backend npu-emulated`) lower graphllm's ops to the same
`torch.ops.npu.*` calls as on an Ascend machine; here those kernels are graphllm.preflight.npu_kernels'
CPU emulations, defined with the exact schemas of the torch_npu wheel graphllm.preflight.wheel finds, and
the MC2 kernels take c10d group names where HCCL takes communicator names.
"""

from __future__ import annotations


def load_emulated_kernels() -> None:
    """Register the emulated kernels (once per process); refused where the real torch_npu is loaded."""
    from graphllm.ops.lowering_npu_mc2 import emulate_hcom
    from graphllm.preflight.npu_kernels import register_npu_kernels
    from graphllm.preflight.wheel import npu_schemas, torch_npu_sources

    register_npu_kernels(npu_schemas(torch_npu_sources()))
    emulate_hcom()
