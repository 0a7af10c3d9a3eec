"""graphllm::offload_to_host and graphllm::prefetch_to_device — move a saved activation to host memory after
the forward produces it, and back to its device before the backward reads it.

Inserted by graphllm/offload_activations.py after partitioning (never differentiated: no autograd rule). Both
ops are one function, `copy_to`, so CUDA, NPU and CPU run the same code: an asynchronous copy
(`non_blocking=True`) into page-locked host memory where the source device has it (CUDA, NPU), plain host
memory otherwise. Copies are issued on the device's current stream, so stream order makes them safe without
synchronisation: the forward's copy runs before the device buffer is reused, the backward's copy before the
op that reads it. On CPU host and device are the same memory: the ops copy, and save nothing.

They always return a new tensor (a custom op may not return an alias of its input), so a CPU "offload" costs
one memcpy of the value; values are bitwise the same.
"""

from __future__ import annotations

import torch
from torch import Tensor

HOST = "cpu"


def copy_to(x: Tensor, device: str | torch.device) -> Tensor:
    """A copy of `x` on `device`: page-locked when it is the host and `x` lives on an accelerator, and
    asynchronous (non_blocking) whenever one side is an accelerator."""
    device = torch.device(device)
    pin = device.type == HOST and x.device.type != HOST
    out = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=device, pin_memory=pin)
    out.copy_(x, non_blocking=pin or device.type != HOST)
    return out


@torch.library.custom_op("graphllm::offload_to_host", mutates_args=())
def offload_to_host(x: Tensor) -> Tensor:
    return copy_to(x, HOST)


@offload_to_host.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=HOST)


@torch.library.custom_op("graphllm::prefetch_to_device", mutates_args=())
def prefetch_to_device(x: Tensor, device: str) -> Tensor:
    return copy_to(x, device)


@prefetch_to_device.register_fake
def _(x: Tensor, device: str) -> Tensor:
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=device)
