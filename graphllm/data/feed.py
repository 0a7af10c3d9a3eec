"""What `graphllm run` draws from: train batches by step, fixed validation batches, the sampler position.

Two sources: indexed datasets (`--data`, graphllm.data.datasets) ordered by a GlobalSampler, or the
built-in corpus (TokenBatches, whose batch for step k is a function of (seed, k)). Either way a batch
is (input_ids, labels) — plus position_ids when the compiled graph takes them (plan.eod_reset) —
each LongTensor [global batch, seq_len], the same on every rank.
"""

from __future__ import annotations

import numpy as np
import torch

from graphllm.data.datasets import DataSplits, collate
from graphllm.data.samplers import GlobalSampler
from graphllm.errors import GraphllmError


class DatasetFeed:
    """Batches from `--data`: global batch k = sampler positions [consumed_at_start + (k - start)·G, ...)."""

    def __init__(self, splits: DataSplits, *, global_batch_size: int, seed: int, with_positions: bool) -> None:
        self.splits, self.with_positions = splits, with_positions
        self.global_batch_size = global_batch_size
        self.sampler = GlobalSampler(len(splits.train), global_batch_size, seed=seed)
        self.start_step, self.consumed_at_start = 0, 0

    def _rows(self, ds, indices: np.ndarray) -> tuple[torch.Tensor, ...]:
        ids, labels, pos = collate(ds, indices)
        return (ids, labels, pos) if self.with_positions else (ids, labels)

    def train_batch(self, step: int) -> tuple[torch.Tensor, ...]:
        """Global batch of 0-based `step`."""
        return self._rows(self.splits.train, self.sampler.batch(step, consumed_at_start=self.consumed_at_start,
                                                                start_step=self.start_step))

    def consumed(self, steps_done: int) -> int:
        """Samples consumed once `steps_done` optimizer steps are complete."""
        return self.consumed_at_start + (steps_done - self.start_step) * self.global_batch_size

    def state(self, steps_done: int) -> dict:
        return {"sampler": self.sampler.state(self.consumed(steps_done))}

    def resume(self, extra: dict, step: int, source: str) -> None:
        """Continue after `step` from a checkpoint's extra state (older checkpoints: step × batch)."""
        self.start_step = step
        state = extra.get("sampler")
        self.consumed_at_start = (self.sampler.check_state(state, source) if isinstance(state, dict)
                                  else step * self.global_batch_size)

    def valid_batches(self, iters: int) -> list[tuple[torch.Tensor, ...]]:
        """The first `iters` global batches of the valid split, in file order (wrapping when it is short):
        the same rows at every evaluation, so validation losses compare across steps and runs."""
        valid = self.splits.valid
        if valid is None:
            raise GraphllmError("--eval-interval needs a valid split, but --split gives it no samples; use e.g. "
                                "--split 949,50,1 and enough documents")
        g = self.global_batch_size
        return [self._rows(valid, np.arange(i * g, (i + 1) * g) % len(valid)) for i in range(iters)]


class BuiltinFeed:
    """Batches from the built-in corpus (graphllm.data.batches.TokenBatches), by step."""

    def __init__(self, batches, *, with_positions: bool) -> None:
        self.batches, self.with_positions = batches, with_positions

    def _add_positions(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if not self.with_positions:
            return batch
        B, S = batch[0].shape
        return (*batch, torch.arange(S).expand(B, S).contiguous())

    def train_batch(self, step: int) -> tuple[torch.Tensor, ...]:
        return self._add_positions(self.batches.train_batch(step))

    def state(self, steps_done: int) -> dict:
        return {}  # the position is the step itself

    def resume(self, extra: dict, step: int, source: str) -> None:
        pass

    def valid_batches(self, iters: int) -> list[tuple[torch.Tensor, ...]]:
        return [self._add_positions(b) for b in self.batches.valid_batches(iters)]
