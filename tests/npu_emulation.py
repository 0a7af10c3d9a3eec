"""Test-only entry to the CPU emulation of the torch_npu kernels graphllm lowers to
(graphllm/preflight/npu_kernels.py): importing this module registers `torch.ops.npu.*` with the exact
schemas of the torch_npu 2.13.0 wheel (tests/npu_wheel.py reads them from the wheel's schema file).
Never import it where torch_npu is loaded.
"""

from __future__ import annotations

from npu_wheel import npu_schemas

from graphllm.preflight.npu_kernels import (
    CAUSAL_MASK_SIZE,
    EMULATED,
    KERNELS,
    MC2_DTYPES,
    MC2_K,
    MC2_WORLD_SIZES,
    NPU_AUTOGRAD,
    register_npu_kernels,
)

__all__ = ["CAUSAL_MASK_SIZE", "EMULATED", "KERNELS", "MC2_DTYPES", "MC2_K", "MC2_WORLD_SIZES", "NPU_AUTOGRAD"]

register_npu_kernels(npu_schemas())
