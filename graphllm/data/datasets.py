"""Training datasets over Megatron indexed files: pretrain windows, SFT rows, splits, blends.

Every dataset yields rows of three int64 arrays [seq_len]: input_ids, labels (the next token, -100
where no loss) and position_ids (0..S-1, or restarting at each sample boundary under EOD-reset).

- Pretrain (`PREFIX.bin/.idx`, EOD already at each document's end): the split's documents are
  concatenated in file order and cut into windows of seq_len + 1 tokens that step by seq_len
  (Megatron's GPTDataset: consecutive windows share one token); sample i is window i. With `reset`,
  positions restart after each document boundary inside a window.
- SFT (`PREFIX_input_ids_document` + `PREFIX_labels_document`, labels aligned with the inputs): each
  Megatron document is one row — one sample, or several packed samples — shifted per sample, padded or
  truncated to seq_len (graphllm.data.packing.sft_row). Packed rows always restart positions per sample.
- Split (`--split 949,50,1`): Megatron's get_train_valid_test_split_ over each prefix's documents.
- Blend (`--data 0.7 A 0.3 B`): each split of each prefix, mixed by graphllm.data.samplers.blend_sources.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from graphllm.data.indexed import IndexedReader
from graphllm.data.packing import positions_from_starts, sft_row
from graphllm.data.samplers import blend_sources
from graphllm.errors import GraphllmError

SPLITS = ("train", "valid", "test")
DEFAULT_SPLIT = "969,30,1"  # Megatron's default --split
TRAINABLE_KINDS = ("pretrain", "sft", "prm")  # prm rows are SFT rows whose labels sit on the step tags
Row = tuple[np.ndarray, np.ndarray, np.ndarray]


class Dataset(Protocol):
    def __len__(self) -> int: ...
    def row(self, i: int) -> Row: ...


def split_ranges(spec: str, size: int) -> list[tuple[int, int]]:
    """Megatron's train/valid/test split of `size` documents by weights like "949,50,1" (or "98/2/0")."""
    try:
        weights = [float(s) for s in spec.replace("/", ",").split(",") if s.strip()]
    except ValueError:
        raise GraphllmError(f"--split {spec!r}: expected up to three comma-separated weights, e.g. 949,50,1") from None
    if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise GraphllmError(f"--split {spec!r}: expected up to three non-negative weights with a positive sum, "
                            "e.g. 949,50,1")
    weights = (weights + [0.0, 0.0])[:3]
    total = sum(weights)
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + round(w / total * float(size)))
    diff = bounds[-1] - size  # rounding excess comes off every split end (Megatron does the same)
    bounds = [bounds[0]] + [b - diff for b in bounds[1:]]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


class PretrainDataset:
    """Windows of seq_len + 1 tokens over documents [lo, hi) of one indexed file."""

    def __init__(self, reader: IndexedReader, docs: tuple[int, int], seq_len: int, *, reset: bool) -> None:
        self.reader, self.seq_len, self.reset = reader, seq_len, reset
        lo, hi = docs
        doc_idx = reader.document_indices
        self._seq_lo, seq_hi = int(doc_idx[lo]), int(doc_idx[hi])
        lens = reader.sequence_lengths[self._seq_lo:seq_hi].astype(np.int64)
        self._seq_starts = np.concatenate(([0], np.cumsum(lens)))  # token offset of each sequence, and the end
        self._doc_starts = self._seq_starts[doc_idx[lo:hi] - self._seq_lo]
        self.num_tokens = int(self._seq_starts[-1])
        self._len = max(0, (self.num_tokens - 1) // seq_len)

    def __len__(self) -> int:
        return self._len

    def _tokens(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of the split's concatenated stream."""
        out = np.empty(n, dtype=np.int64)
        j = int(np.searchsorted(self._seq_starts, start, side="right")) - 1
        done = 0
        while done < n:
            offset = start + done - int(self._seq_starts[j])
            take = min(n - done, int(self._seq_starts[j + 1]) - start - done)
            out[done:done + take] = self.reader.get(self._seq_lo + j, offset, take)
            done += take
            j += 1
        return out

    def row(self, i: int) -> Row:
        start = i * self.seq_len
        w = self._tokens(start, self.seq_len + 1)
        if self.reset:
            lo, hi = np.searchsorted(self._doc_starts, [start + 1, start + self.seq_len])
            pos = positions_from_starts(self._doc_starts[lo:hi] - start, self.seq_len)
        else:
            pos = np.arange(self.seq_len, dtype=np.int64)
        return w[:-1], w[1:], pos


class SFTDataset:
    """One row per Megatron document of an SFT pair of files: one sample, or several packed ones."""

    def __init__(self, ids: IndexedReader, labels: IndexedReader, docs: tuple[int, int], seq_len: int, *,
                 pad_id: int = 0) -> None:
        self.ids, self.labels, self.seq_len, self.pad_id = ids, labels, seq_len, pad_id
        self.lo, self.hi = docs

    def __len__(self) -> int:
        return self.hi - self.lo

    def row(self, i: int) -> Row:
        k = self.lo + i
        ids, lab, pos, _ = sft_row(self.ids.document(k), self.labels.document(k), self.seq_len, self.pad_id)
        return ids, lab, pos  # a row longer than seq_len loses its tail (preprocess --seq-len avoids that)


class BlendedDataset:
    """Several datasets mixed by weight; sample i is source[i]'s sample index[i] (wrapping around)."""

    def __init__(self, parts: list[Dataset], weights: list[float]) -> None:
        self.parts = parts
        self._len = sum(len(p) for p in parts)
        self.source, self.index = blend_sources(weights, self._len)

    def __len__(self) -> int:
        return self._len

    def row(self, i: int) -> Row:
        part = self.parts[int(self.source[i])]
        return part.row(int(self.index[i]) % len(part))


def collate(ds: Dataset, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows `indices` of `ds` as (input_ids, labels, position_ids), each LongTensor [len(indices), S]."""
    rows = [ds.row(int(i)) for i in indices]
    return tuple(torch.from_numpy(np.stack([r[j] for r in rows])) for j in range(3))  # type: ignore[return-value]


# -- opening ------------------------------------------------------------------------------------------


def parse_data_args(values: list[str]) -> tuple[list[float], list[str]]:
    """`--data A` or `--data W1 A W2 B ...` → (weights, prefixes)."""
    if len(values) == 1:
        return [1.0], values
    if len(values) % 2:
        raise GraphllmError(f"--data {' '.join(values)}: give one prefix, or weight/prefix pairs (--data 0.7 A 0.3 B)")
    try:
        weights = [float(w) for w in values[0::2]]
    except ValueError:
        raise GraphllmError(f"--data {' '.join(values)}: weights must be numbers (--data 0.7 A 0.3 B)") from None
    return weights, values[1::2]


def read_meta(prefix: str) -> dict:
    """The prefix's `_meta.json`, or the kind its files imply (pretrain data may lack one)."""
    meta_path = Path(prefix + "_meta.json")
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise GraphllmError(f"--data {prefix}: cannot read {meta_path} ({e}); rerun graphllm preprocess") from None
        if not isinstance(meta, dict) or "kind" not in meta:
            raise GraphllmError(f"--data {prefix}: {meta_path} has no \"kind\"; rerun graphllm preprocess")
        return meta
    if Path(prefix + "_input_ids_document.idx").is_file():
        return {"kind": "sft", "packed": False, "seq_len": None}
    if Path(prefix + ".idx").is_file():
        return {"kind": "pretrain", "packed": False, "seq_len": None}
    raise GraphllmError(f"--data {prefix}: no {prefix}.idx, {prefix}_input_ids_document.idx or {prefix}_meta.json; "
                        "give the prefix graphllm preprocess wrote (without .bin/.idx)")


def _max_token(reader: IndexedReader) -> int:
    if reader.num_tokens == 0:
        return -1
    return int(np.memmap(reader.bin_path, dtype=reader.dtype, mode="r").max())


@dataclass(kw_only=True)
class DataSplits:
    kind: str
    """pretrain, sft or prm (every prefix of a blend must agree)."""
    packed: bool
    """Rows hold several samples (position ids restart inside them)."""
    train: Dataset
    valid: Dataset | None
    test: Dataset | None


def open_data(values: list[str], *, seq_len: int, split: str = DEFAULT_SPLIT, reset: bool = False,
              vocab_size: int | None = None) -> DataSplits:
    """Open `--data` prefixes, split each by documents, blend each split; check them against the model.

    `reset`: EOD-reset for pretrain data (packed SFT always resets). `vocab_size`: refuse data whose
    token ids the model cannot embed."""
    weights, prefixes = parse_data_args(values)
    metas = [read_meta(p) for p in prefixes]
    kinds = {m["kind"] for m in metas}
    if len(kinds) > 1:
        raise GraphllmError(f"--data mixes dataset kinds {sorted(kinds)}; blend datasets of one kind")
    kind = kinds.pop()
    if kind not in TRAINABLE_KINDS:
        raise GraphllmError(f"--data {prefixes[0]} is {kind} data; graphllm run trains on pretrain, sft and prm "
                            "data (preference training is not implemented)")
    packed = any(bool(m.get("packed")) for m in metas)
    parts: dict[str, list[Dataset]] = {s: [] for s in SPLITS}
    for prefix, meta in zip(prefixes, metas):
        if kind == "pretrain":
            readers = [IndexedReader(prefix)]
        else:
            readers = [IndexedReader(prefix + "_input_ids_document"), IndexedReader(prefix + "_labels_document")]
            _check_sft_pair(prefix, *readers)
            if meta.get("packed") and meta.get("seq_len") not in (None, seq_len):
                raise GraphllmError(f"--data {prefix} was packed for seq_len {meta['seq_len']} but the artifact was "
                                    f"compiled for --seq-len {seq_len}; repack with --seq-len {seq_len} or recompile")
        if vocab_size is not None:
            top = _max_token(readers[0])
            if top >= vocab_size:
                raise GraphllmError(f"--data {prefix} holds token id {top} but the model's vocabulary has {vocab_size} "
                                    "entries; preprocess with the model's tokenizer or use a model with a larger vocab")
        for name, docs in zip(SPLITS, split_ranges(split, readers[0].num_documents)):
            if kind == "pretrain":
                ds: Dataset = PretrainDataset(readers[0], docs, seq_len, reset=reset)
            else:
                ds = SFTDataset(readers[0], readers[1], docs, seq_len, pad_id=int(meta.get("pad_id", 0)))
            parts[name].append(ds)

    def blend(name: str) -> Dataset | None:
        usable = [(w, d) for w, d in zip(weights, parts[name]) if len(d) > 0]
        if not usable:
            return None
        if len(usable) == 1:
            return usable[0][1]
        return BlendedDataset([d for _, d in usable], [w for w, _ in usable])

    train = blend("train")
    if train is None:
        raise GraphllmError(f"--data {' '.join(values)} gives no training samples of seq_len {seq_len} with --split "
                            f"{split}; use more data, a larger train share or a shorter --seq-len")
    return DataSplits(kind=kind, packed=packed, train=train, valid=blend("valid"), test=blend("test"))


def _check_sft_pair(prefix: str, ids: IndexedReader, labels: IndexedReader) -> None:
    if (ids.sequence_lengths.shape != labels.sequence_lengths.shape
            or not np.array_equal(ids.sequence_lengths, labels.sequence_lengths)
            or not np.array_equal(ids.document_indices, labels.document_indices)):
        raise GraphllmError(f"--data {prefix}: the input_ids and labels files differ in sequence lengths or "
                            "documents; they come from different runs, rerun graphllm preprocess")
