"""Bytes a rank holds for its trainable parameters, their gradients and AdamW: one rule for the report and the planner.

Per trainable element (Megatron's distributed-optimizer accounting, Rajbhandari et al. 2020 §3):

| params | parameter | gradient | fp32 master | exp_avg + exp_avg_sq |
|---|---|---|---|---|
| fp32 | 4 | 4 | 0 (the parameter is the master) | 8 |
| bf16 (`--params-dtype bf16`, O2) | 2 | 2 | 4 | 8 |

ZeRO-1 (`--zero1`) keeps the masters and moments of 1/dp of the elements on each rank: the flat range of
ceil(numel / dp) elements graphllm.parallel.master_weights / optim.ZeroAdamW cut (the last range padded).
Optimizer offload (`--offload-optimizer`) keeps masters and moments in host memory between steps; the device
then holds one streamed chunk of them during the step (`optimizer_step_bytes`).
"""

from __future__ import annotations

PARAM_ITEMSIZE = {"fp32": 4, "bf16": 2}
"""Bytes of one parameter (and one gradient: autograd makes gradients in the parameter's dtype)."""
MASTER_ITEMSIZE = 4
"""fp32 master weight, kept when the parameters are not fp32."""
MOMENTS_ITEMSIZE = 8
"""AdamW's exp_avg and exp_avg_sq, fp32 each."""
GRAD_REDUCE_ITEMSIZE = 4
"""Gradients are averaged over data-parallel ranks in fp32, bf16 ones too (graphllm.parallel.optim.wire_dtype)."""
OFFLOAD_CHUNK_NUMEL = 2**24
"""Elements streamed to the device at a time by an offloaded optimizer step (16 Mi: 256 MiB of master, moments and
gradient on the device; large enough that a copy runs near the link's bandwidth, small next to any device)."""


def optimizer_bytes(numel: int, params_dtype: str = "fp32", *, zero1: bool = False, dp: int = 1,
                    offload: bool = False, chunk_numel: int | None = None) -> dict[str, int]:
    """Bytes for `numel` trainable elements on one rank.

    Keys: parameter_bytes, gradient_bytes (device); gradient_reduce_bytes (what one data-parallel gradient average
    moves: fp32 whatever the params dtype), parameter_gather_bytes (ZeRO-1's all-gather of the updated parameters,
    in their dtype; 0 without ZeRO-1); master_bytes, moment_bytes (this rank's share: 1/dp of the
    elements under ZeRO-1); optimizer_bytes (master + moments, wherever they live); optimizer_device_bytes and
    optimizer_host_bytes (where they live between steps: all on the host with `offload`); optimizer_step_bytes (what
    the step adds on the device for one chunk of `chunk_numel` elements, None: OFFLOAD_CHUNK_NUMEL: the gradient
    widened to fp32 for bf16 parameters, and with `offload` the chunk's streamed master and moments)."""
    if params_dtype not in PARAM_ITEMSIZE:
        raise ValueError(f"params_dtype must be one of {', '.join(PARAM_ITEMSIZE)}, got {params_dtype!r}")
    if numel < 0 or dp < 1:
        raise ValueError(f"optimizer_bytes needs numel ≥ 0 and dp ≥ 1, got numel={numel}, dp={dp}")
    item = PARAM_ITEMSIZE[params_dtype]
    held = -(-numel // dp) if zero1 else numel  # elements whose optimizer state this rank keeps
    master = held * MASTER_ITEMSIZE if params_dtype != "fp32" else 0
    moments = held * MOMENTS_ITEMSIZE
    out = {"parameter_bytes": numel * item, "gradient_bytes": numel * item, "master_bytes": master,
           "moment_bytes": moments, "optimizer_bytes": master + moments,
           "optimizer_device_bytes": master + moments, "optimizer_host_bytes": 0,
           "gradient_reduce_bytes": numel * GRAD_REDUCE_ITEMSIZE, "parameter_gather_bytes": numel * item if zero1 else 0}
    chunk = min(held, OFFLOAD_CHUNK_NUMEL if chunk_numel is None else chunk_numel)
    widened = MASTER_ITEMSIZE if params_dtype != "fp32" else 0  # an fp32 gradient is used as it is
    out["optimizer_step_bytes"] = chunk * widened
    if offload:
        out["optimizer_device_bytes"], out["optimizer_host_bytes"] = 0, master + moments
        out["optimizer_step_bytes"] += chunk * (MOMENTS_ITEMSIZE + (MASTER_ITEMSIZE if master else 0))
    return out
