"""Autocast policy for graphllm ops (graphllm's amp mode is bf16 autocast).

Without a policy Dynamo cannot treat an op as opaque under autocast and fails tracing its kernel.
Norms compute in fp32 (as autocast's own fp32 list does for layer_norm); the rest run in bf16 like
the matmuls around them. The fused LM-head loss (linear_cross_entropy and its parts) takes bf16 hidden and weight,
as the linear it replaces, and computes its log-sum-exp and softmax in fp32 itself (as `.float()` did).
"""

import torch

AUTOCAST_DEVICES = ("cpu", "cuda")


def register_autocast_policy(qualname: str, cast_to: torch.dtype) -> None:
    for device in AUTOCAST_DEVICES:
        torch.library.register_autocast(qualname, device, cast_to)
