"""Deterministic, resumable sample order and Megatron-style blending of several datasets.

The global order of samples is a pure function of (seed, epoch): epoch e is a permutation of
range(num_samples) obtained by sorting splitmix64 hashes of (seed, e, i) — not a stateful RNG and not
numpy's Generator, whose streams may change between numpy versions. Sample positions run on past the
end of an epoch into the next one. Global batch k holds positions [k·G, (k+1)·G), whatever the
data-parallel size: each data-parallel rank then takes its slice of those rows (Engine.local_rows), so
the same seed gives the same training on any layout. The sampler's whole state is the number of
samples consumed; resuming from a checkpoint's count continues exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from graphllm.data.batches import _MASK64, _splitmix64
from graphllm.errors import GraphllmError

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(num_samples) that depends only on (seed, epoch): int64 [num_samples]."""
    return _cached_permutation(num_samples, seed, epoch)


@lru_cache(maxsize=4)  # the current epoch and the next one (a batch can straddle the boundary)
def _cached_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    key = _splitmix64(np.array([(seed * 0x632BE59BD9B4E019) & _MASK64], dtype=np.uint64))
    key = _splitmix64(key ^ np.uint64((epoch * 0xD6E8FEB86659FD93) & _MASK64))
    draws = _splitmix64(key + np.arange(num_samples, dtype=np.uint64) * _GOLDEN)
    order = np.argsort(draws, kind="stable")
    order.setflags(write=False)
    return order


class GlobalSampler:
    """Which dataset samples form each global batch: a function of (seed, consumed samples) only."""

    def __init__(self, num_samples: int, global_batch_size: int, *, seed: int, shuffle: bool = True) -> None:
        if num_samples < 1:
            raise GraphllmError("the training split holds no samples; give a larger dataset, a longer --split train "
                                "share, or a shorter --seq-len")
        if global_batch_size < 1:
            raise GraphllmError(f"global batch size must be ≥ 1, got {global_batch_size}")
        self.num_samples, self.global_batch_size = num_samples, global_batch_size
        self.seed, self.shuffle = seed, shuffle

    def indices(self, consumed: int, count: int | None = None) -> np.ndarray:
        """Dataset indices at global positions consumed .. consumed+count-1 (default one global batch)."""
        count = self.global_batch_size if count is None else count
        pos = np.arange(consumed, consumed + count, dtype=np.int64)
        epoch, within = np.divmod(pos, self.num_samples)
        if not self.shuffle:
            return within
        out = np.empty_like(pos)
        for e in np.unique(epoch):
            sel = epoch == e
            out[sel] = epoch_permutation(self.num_samples, self.seed, int(e))[within[sel]]
        return out

    def batch(self, step: int, *, consumed_at_start: int = 0, start_step: int = 0) -> np.ndarray:
        """Indices of global batch `step` (0-based) for a run that had consumed `consumed_at_start`
        samples at `start_step` (a resumed run; both 0 for a fresh one)."""
        return self.indices(consumed_at_start + (step - start_step) * self.global_batch_size)

    def state(self, consumed: int) -> dict:
        """What a checkpoint stores to resume the order: plain data."""
        return {"consumed_samples": int(consumed), "seed": self.seed, "num_samples": self.num_samples,
                "global_batch_size": self.global_batch_size}

    def check_state(self, state: dict, source: str) -> int:
        """The consumed-sample count from a checkpoint's sampler state, refusing one from other data."""
        if state.get("num_samples") != self.num_samples or state.get("seed") != self.seed:
            raise GraphllmError(f"{source} was trained on data of {state.get('num_samples')} samples with seed "
                                f"{state.get('seed')}, but this run has {self.num_samples} samples and seed {self.seed}; "
                                "resume with the same --data, --split, --seq-len and --seed")
        return int(state["consumed_samples"])


def blend_sources(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's blending: for each of `size` samples, which source it comes from and that source's
    own running sample index, so that every prefix of the sequence uses source d as close to
    weights[d] · prefix as possible (error below one sample at every prefix).

    Source d's k-th sample is due at time (k + ½) / w_d; the samples are merged by due time (ties by
    source order). Returns (source int16 [size], index within source int64 [size])."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or not (w > 0).all() or not np.isfinite(w).all():
        raise GraphllmError(f"--data weights must be positive numbers, got {list(weights)}")
    w = np.round(w / w.sum(), 12)  # rounded: 0.7/0.2/0.1 and 7/2/1 give the same floats, hence the same ties
    times, sources, ranks = [], [], []
    for d, wd in enumerate(w):
        n = int(np.ceil(wd * size)) + 1
        k = np.arange(n, dtype=np.int64)
        times.append((k + 0.5) / wd)
        sources.append(np.full(n, d, dtype=np.int16))
        ranks.append(k)
    t, s, r = np.concatenate(times), np.concatenate(sources), np.concatenate(ranks)
    order = np.lexsort((s, t))[:size]
    return s[order], r[order]
