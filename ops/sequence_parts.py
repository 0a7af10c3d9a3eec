"""Ops a model emits when each rank holds a part of every sequence (context parallelism, captured for the rank's
own tokens); passes/context_parallel.py rewrites them. On one process they are plain local computations.

- `graphllm::ahead(t, k, fill)`: t [B, S] moved k positions left (position i holds t[:, i + k], the last k
  positions `fill`): the tokens and labels multi-token prediction reads. A rank's last positions need tokens
  another rank holds: the pass all-gathers t over cp and takes each of its positions' token k ahead.
- `graphllm::token_mean(loss, labels)`: `loss`, a mean over the tokens `labels` counts (≠ -100), marked so the
  pass weights it by this rank's share of the counted tokens; the mean over the cp ranks is then the whole
  sequences' mean.
"""

from __future__ import annotations

import torch
from torch import Tensor


def ahead_decomposed(t: Tensor, k: int, fill: int) -> Tensor:
    return torch.cat([t[:, k:], torch.full_like(t[:, :k], fill)], dim=1)


@torch.library.custom_op("graphllm::ahead", mutates_args=())
def ahead(t: Tensor, k: int, fill: int) -> Tensor:
    return ahead_decomposed(t, k, fill)


@ahead.register_fake
def _(t, k, fill):
    return torch.empty_like(t)


def token_mean_decomposed(loss: Tensor, labels: Tensor) -> Tensor:
    return loss


@torch.library.custom_op("graphllm::token_mean", mutates_args=())
def token_mean(loss: Tensor, labels: Tensor) -> Tensor:
    return loss.clone()  # a custom op may not return its input


@token_mean.register_fake
def _(loss, labels):
    return torch.empty_like(loss)


def _no_setup(ctx, inputs, output):
    pass


token_mean.register_autograd(lambda ctx, grad: (grad, None), setup_context=_no_setup)
