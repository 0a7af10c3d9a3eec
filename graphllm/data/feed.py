"""What `graphllm run` draws from: train batches by step, fixed validation batches, the sampler position.

Two sources: indexed datasets (`--data`, graphllm.data.datasets) ordered by a GlobalSampler, or the
built-in corpus (TokenBatches, whose batch for step k is a function of (seed, k)). Either way a batch
is (input_ids, labels) — then the task's columns (graphllm.tasks: DPO's precomputed reference
log-probs [rows] float32, PRM's reward token ids [rows, 2]), then position_ids when the compiled graph
takes them (plan.eod_reset) — each with [global batch] rows, the same on every rank.

Pairwise data: the sampler orders pairs, a global batch of G rows holds G/2 pairs, interleaved
(chosen_0, rejected_0, chosen_1, ...), and the sampler state counts pairs.
"""

from __future__ import annotations

import numpy as np
import torch

from graphllm.data.datasets import DataSplits, collate
from graphllm.data.samplers import GlobalSampler
from graphllm.errors import GraphllmError


class DatasetFeed:
    """Batches from `--data`: global batch k = sampler positions [consumed_at_start + (k - start)·n, ...) for n
    samples a batch (its G rows, or G/2 pairs)."""

    def __init__(self, splits: DataSplits, *, global_batch_size: int, seed: int, with_positions: bool,
                 reward_ids: tuple[int, int] | None = None) -> None:
        """`global_batch_size`: rows per step. `reward_ids`: --task prm, the (good, bad) token ids every row
        carries as a column."""
        self.splits, self.with_positions, self.reward_ids = splits, with_positions, reward_ids
        self.global_batch_size = global_batch_size
        rows_per_sample = 2 if splits.kind == "pairwise" else 1
        if global_batch_size % rows_per_sample:
            raise GraphllmError(f"pairwise data needs an even global batch, got {global_batch_size} rows; recompile "
                                "with an even --batch-size")
        self.samples_per_batch = global_batch_size // rows_per_sample
        self.sampler = GlobalSampler(len(splits.train), self.samples_per_batch, seed=seed)
        self.start_step, self.consumed_at_start = 0, 0
        self.references: dict[str, np.ndarray] = {}
        """DPO --reference precompute: per split ("train", "valid"), the reference log-probs [pairs, 2]."""

    def datasets(self) -> dict[str, object]:
        """The splits a run reads: train, and valid when there is one."""
        return {name: ds for name, ds in (("train", self.splits.train), ("valid", self.splits.valid))
                if ds is not None}

    def _rows(self, split: str, indices: np.ndarray) -> tuple[torch.Tensor, ...]:
        ds = self.splits.train if split == "train" else self.splits.valid
        ids, labels, pos = collate(ds, indices)
        out: tuple[torch.Tensor, ...] = (ids, labels)
        if split in self.references:  # [pairs, 2] -> [rows], interleaved like the rows
            out += (torch.from_numpy(np.ascontiguousarray(self.references[split][indices].reshape(-1))),)
        if self.reward_ids is not None:
            out += (torch.tensor(self.reward_ids, dtype=torch.long).expand(ids.shape[0], 2).contiguous(),)
        return out + (pos,) if self.with_positions else out

    def train_batch(self, step: int) -> tuple[torch.Tensor, ...]:
        """Global batch of 0-based `step`."""
        return self._rows("train", self.sampler.batch(step, consumed_at_start=self.consumed_at_start,
                                                      start_step=self.start_step))

    def consumed(self, steps_done: int) -> int:
        """Samples (pairs, for pairwise data) consumed once `steps_done` optimizer steps are complete."""
        return self.consumed_at_start + (steps_done - self.start_step) * self.samples_per_batch

    def state(self, steps_done: int) -> dict:
        return {"sampler": self.sampler.state(self.consumed(steps_done))}

    def resume(self, extra: dict, step: int, source: str) -> None:
        """Continue after `step` from a checkpoint's extra state (older checkpoints: step × batch)."""
        self.start_step = step
        state = extra.get("sampler")
        self.consumed_at_start = (self.sampler.check_state(state, source) if isinstance(state, dict)
                                  else step * self.samples_per_batch)

    def valid_batches(self, iters: int) -> list[tuple[torch.Tensor, ...]]:
        """The first `iters` global batches of the valid split, in file order (wrapping when it is short):
        the same rows at every evaluation, so validation losses compare across steps and runs."""
        valid = self.splits.valid
        if valid is None:
            raise GraphllmError("--eval-interval needs a valid split, but --split gives it no samples; use e.g. "
                                "--split 949,50,1 and enough documents")
        g = self.samples_per_batch
        return [self._rows("valid", np.arange(i * g, (i + 1) * g) % len(valid)) for i in range(iters)]


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


def to_device(batch, device: str) -> tuple[torch.Tensor, ...]:
    """A batch's tensors on `device`; to an accelerator through pinned memory, asynchronously (the copy overlaps
    the host's work until the graph reads it)."""
    if torch.device(device).type == "cpu":
        return tuple(t.to(device) for t in batch)
    return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)
