"""Rows with sample boundaries: position ids that restart at each sample, SFT rows padded to seq_len.

A packed row holds several samples back to back. EOD-reset (Megatron's --reset-position-ids with
--reset-attention-mask) gives each sample positions 0, 1, ... and keeps attention inside it; the model
reads the boundaries from the position ids alone (a sample starts where the position is 0), so the
row's only extra input is `position_ids` [S].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IGNORE_INDEX = -100  # label of a token that contributes no loss (prompt, padding, sample end)


def positions_from_starts(starts: np.ndarray, length: int) -> np.ndarray:
    """Position ids [length] restarting at each offset in `starts` (sorted; 0 is implied)."""
    t = np.arange(length, dtype=np.int64)
    starts = np.asarray(starts, dtype=np.int64)
    starts = np.concatenate(([0], starts[(starts > 0) & (starts < length)]))
    last = starts[np.searchsorted(starts, t, side="right") - 1]  # the latest start at or before t
    return t - last


def sft_row(ids_seqs: Sequence[np.ndarray], label_seqs: Sequence[np.ndarray], seq_len: int,
            pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """One SFT row from one or more samples (a packed document): (input_ids, labels, position_ids, truncated).

    `label_seqs[j]` is aligned with `ids_seqs[j]` (labels[t] = ids[t] where trained, -100 where masked);
    here they are shifted for next-token prediction inside each sample: input t predicts label t+1, and
    a sample's last token predicts nothing (it must not learn the next sample's first token). The row is
    truncated or padded to `seq_len`; padding has label -100 and positions of its own, restarting at 0,
    so under EOD-reset it is a separate (ignored) segment.
    """
    ids_parts, lab_parts, pos_parts = [], [], []
    for ids, lab in zip(ids_seqs, label_seqs):
        n = len(ids)
        if n == 0:
            continue
        ids_parts.append(np.asarray(ids, dtype=np.int64))
        shifted = np.empty(n, dtype=np.int64)
        shifted[:-1] = lab[1:]
        shifted[-1] = IGNORE_INDEX
        lab_parts.append(shifted)
        pos_parts.append(np.arange(n, dtype=np.int64))
    total = sum(len(p) for p in ids_parts)
    truncated = total > seq_len
    pad = max(0, seq_len - total)
    ids_parts.append(np.full(pad, pad_id, dtype=np.int64))
    lab_parts.append(np.full(pad, IGNORE_INDEX, dtype=np.int64))
    pos_parts.append(np.arange(pad, dtype=np.int64))
    return (np.concatenate(ids_parts)[:seq_len], np.concatenate(lab_parts)[:seq_len],
            np.concatenate(pos_parts)[:seq_len], truncated)


def segment_ids(position_ids: np.ndarray) -> np.ndarray:
    """Which sample each token belongs to (0, 1, ...), from position ids restarting at 0: [..., S]."""
    return np.cumsum(np.asarray(position_ids) == 0, axis=-1) - 1
