"""Host ↔ device copies for an offloaded optimizer: the one code path CPU, CUDA and NPU share.

An offloaded optimizer keeps its fp32 master weights and AdamW moments in host memory between steps and streams
them through the device for the step, a chunk at a time (graphllm.parallel.master_weights). Every copy goes
through `to_device` / `to_host` with the device as an argument, so the CUDA and NPU paths are this same code:
host buffers are pinned where the device has pinned memory (any device but the CPU), copies are non-blocking,
and `wait` makes the host buffers complete before anything on the host reads them.

On a CPU "device", host and device are the same memory: the copies still happen (so the streaming logic is what
runs and is tested here), and they save nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

HOST = torch.device("cpu")


def pinned(device: torch.device) -> bool:
    """Whether host buffers for `device` are page-locked: on accelerators (CUDA, NPU) a non-blocking copy needs a
    pinned host buffer to run asynchronously; the CPU has no such thing."""
    return torch.device(device).type != "cpu"


def host_zeros(numel: int, device: torch.device) -> torch.Tensor:
    """An fp32 host buffer of `numel` zeros to stream to `device` (pinned when `pinned(device)`)."""
    return torch.zeros(numel, dtype=torch.float32, device=HOST, pin_memory=pinned(device))


def host_copy(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` (any device, any float dtype) as a new fp32 host buffer made for streaming to `device`."""
    out = host_zeros(t.numel(), device)
    out.copy_(t.reshape(-1))
    return out


def to_device(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Device copies of host buffers, issued without waiting (a copy even when `device` is the CPU: the step then
    updates the copies and `to_host` writes them back, the same order of work as on an accelerator)."""
    return [t.to(device, non_blocking=True, copy=True) for t in tensors]


def to_host(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    """Write device tensors back into their host buffers, without waiting (see `wait`)."""
    for d, s in zip(dst, src):
        d.copy_(s, non_blocking=True)


def wait(device: torch.device) -> None:
    """Block until the copies issued for `device` are done (nothing to wait for on the CPU)."""
    device = torch.device(device)
    if device.type != "cpu":
        torch.accelerator.synchronize(device)
