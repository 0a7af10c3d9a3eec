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
- Pairwise (`PREFIX_{chosen,rejected}_{input_ids,labels}_document`, `graphllm preprocess pairwise`): sample i
  is pair i, two SFT rows (chosen, rejected) made as above; `collate` interleaves them, so a batch of n
  pairs is 2n rows (chosen_0, rejected_0, chosen_1, ...) and slicing rows keeps pairs whole. A side
  longer than seq_len loses its tail, as an SFT row does (preprocess --seq-len avoids it); the pairs
  that do are counted (`DataSplits.overlong`).
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
TRAINABLE_KINDS = ("pretrain", "sft", "prm")  # --task lm; prm rows are SFT rows whose labels sit on the step tags
TASK_KINDS = {"lm": TRAINABLE_KINDS, "dpo": ("pairwise",), "simpo": ("pairwise",), "rm": ("pairwise",),
              "prm": ("prm",)}
"""The dataset kinds each training objective (`--task`, graphllm.planning.task_config) trains on."""
PAIR_SIDES = ("chosen", "rejected")
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


class PairwiseDataset:
    """One sample per pair: arrays [2, seq_len], row 0 the chosen response's SFT row, row 1 the rejected's."""

    def __init__(self, sides: list[tuple[IndexedReader, IndexedReader]], docs: tuple[int, int], seq_len: int, *,
                 pad_id: int = 0) -> None:
        self.sides, self.seq_len, self.pad_id = sides, seq_len, pad_id
        self.lo, self.hi = docs

    def __len__(self) -> int:
        return self.hi - self.lo

    def row(self, i: int) -> Row:
        k = self.lo + i
        rows = [sft_row(ids.document(k), labels.document(k), self.seq_len, self.pad_id)[:3]
                for ids, labels in self.sides]
        return tuple(np.stack([r[j] for r in rows]) for j in range(3))  # type: ignore[return-value]

    def overlong(self) -> int:
        """Pairs with a side longer than seq_len (their tail is cut)."""
        lengths = [ids.sequence_lengths[self.lo:self.hi] for ids, _ in self.sides]  # one sequence per document
        return int(np.count_nonzero(np.maximum(*lengths) > self.seq_len))


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
    """Samples `indices` of `ds` as (input_ids, labels, position_ids), each LongTensor [rows, S]: one row per
    sample, two per pair (interleaved: chosen_0, rejected_0, chosen_1, ...)."""
    rows = [ds.row(int(i)) for i in indices]
    out = (np.stack([r[j] for r in rows]) for j in range(3))
    return tuple(torch.from_numpy(a.reshape(-1, a.shape[-1])) for a in out)  # type: ignore[return-value]


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
    if Path(prefix + "_chosen_input_ids_document.idx").is_file():
        return {"kind": "pairwise", "packed": False, "seq_len": None}
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
    """pretrain, sft, prm or pairwise (every prefix of a blend must agree)."""
    packed: bool
    """Rows hold several samples (position ids restart inside them)."""
    train: Dataset
    valid: Dataset | None
    test: Dataset | None
    overlong: int = 0
    """Pairwise: pairs with a side longer than seq_len (cut to it, as SFT rows are)."""
    reward_ids: tuple[int, int] | None = None
    """prm: the (good, bad) label token ids the meta files record (every prefix must agree)."""


def open_data(values: list[str], *, seq_len: int, split: str = DEFAULT_SPLIT, reset: bool = False,
              vocab_size: int | None = None, task: str = "lm") -> DataSplits:
    """Open `--data` prefixes, split each by documents, blend each split; check them against the model.

    `reset`: EOD-reset for pretrain data (packed SFT always resets). `vocab_size`: refuse data whose
    token ids the model cannot embed. `task`: the artifact's objective, which decides the kinds it trains
    on (TASK_KINDS)."""
    weights, prefixes = parse_data_args(values)
    metas = [read_meta(p) for p in prefixes]
    kind = check_kind(prefixes, metas, task)
    parts: dict[str, list[Dataset]] = {s: [] for s in SPLITS}
    for prefix, meta in zip(prefixes, metas):
        for name, ds in zip(SPLITS, _open_prefix(prefix, meta, kind, seq_len=seq_len, split=split, reset=reset,
                                                 vocab_size=vocab_size)):
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
    overlong = sum(d.overlong() for ds in parts.values() for d in ds if isinstance(d, PairwiseDataset))
    return DataSplits(kind=kind, packed=any(bool(m.get("packed")) for m in metas), train=train, valid=blend("valid"),
                      test=blend("test"), overlong=overlong,
                      reward_ids=_reward_ids(prefixes, metas) if task == "prm" else None)


def check_kind(prefixes: list[str], metas: list[dict], task: str) -> str:
    """The blend's one dataset kind, refused (one line naming it) when `--task task` does not train on it."""
    kinds = {m["kind"] for m in metas}
    if len(kinds) > 1:
        raise GraphllmError(f"--data mixes dataset kinds {sorted(kinds)}; blend datasets of one kind")
    kind = kinds.pop()
    accepted = TASK_KINDS.get(task, TRAINABLE_KINDS)
    if kind not in accepted:
        if kind == "pairwise":
            fix = "compile the artifact with --task dpo, simpo or rm to train on pairs"
        elif accepted == ("pairwise",):
            fix = "give pairs from `graphllm preprocess pairwise`"
        elif accepted == ("prm",):
            fix = "give step-labelled data from `graphllm preprocess prm`"
        else:
            fix = "give pretrain, sft or prm data"
        takes = " or ".join(filter(None, (", ".join(accepted[:-1]), accepted[-1])))
        raise GraphllmError(f"--data {prefixes[0]} is {kind} data, which --task {task} does not train on "
                            f"(it takes {takes} data); {fix}")
    return kind


def _open_prefix(prefix: str, meta: dict, kind: str, *, seq_len: int, split: str, reset: bool,
                 vocab_size: int | None) -> list[Dataset]:
    """One prefix's train, valid and test datasets."""
    if kind == "pretrain":
        readers = [IndexedReader(prefix)]
    elif kind == "pairwise":
        readers = [IndexedReader(f"{prefix}_{side}_{what}_document") for side in PAIR_SIDES
                   for what in ("input_ids", "labels")]
        _check_sft_pair(prefix, *readers[:2])
        _check_sft_pair(prefix, *readers[2:])
        if readers[0].num_documents != readers[2].num_documents:
            raise GraphllmError(f"--data {prefix}: {readers[0].num_documents} chosen but {readers[2].num_documents} "
                                "rejected samples; the pairs are not aligned, rerun graphllm preprocess pairwise")
    else:
        readers = [IndexedReader(prefix + "_input_ids_document"), IndexedReader(prefix + "_labels_document")]
        _check_sft_pair(prefix, *readers)
        if meta.get("packed") and meta.get("seq_len") not in (None, seq_len):
            raise GraphllmError(f"--data {prefix} was packed for seq_len {meta['seq_len']} but the artifact was "
                                f"compiled for --seq-len {seq_len}; repack with --seq-len {seq_len} or recompile")
    if vocab_size is not None:
        top = max(_max_token(r) for r in readers[::2])  # the input_ids files (pairwise: both sides)
        if top >= vocab_size:
            raise GraphllmError(f"--data {prefix} holds token id {top} but the model's vocabulary has {vocab_size} "
                                "entries; preprocess with the model's tokenizer or use a model with a larger vocab")
    pad_id = int(meta.get("pad_id", 0))
    out: list[Dataset] = []
    for docs in split_ranges(split, readers[0].num_documents):
        if kind == "pretrain":
            out.append(PretrainDataset(readers[0], docs, seq_len, reset=reset))
        elif kind == "pairwise":
            out.append(PairwiseDataset([(readers[0], readers[1]), (readers[2], readers[3])], docs, seq_len,
                                       pad_id=pad_id))
        else:
            out.append(SFTDataset(readers[0], readers[1], docs, seq_len, pad_id=pad_id))
    return out


def _reward_ids(prefixes: list[str], metas: list[dict]) -> tuple[int, int]:
    """The (good, bad) token ids of prm data, from each prefix's meta "prm" entry (all must agree)."""
    found = set()
    for prefix, meta in zip(prefixes, metas):
        prm = meta.get("prm")
        if not isinstance(prm, dict) or not {"good_id", "bad_id"} <= prm.keys():
            raise GraphllmError(f"--data {prefix}: its meta file records no prm good/bad token ids, which --task prm "
                                "needs; rerun graphllm preprocess prm")
        found.add((int(prm["good_id"]), int(prm["bad_id"])))
    if len(found) > 1:
        raise GraphllmError(f"--data blends prm datasets with different good/bad tokens {sorted(found)}; "
                            "preprocess them with the same --good-token and --bad-token")
    return found.pop()


def _check_sft_pair(prefix: str, ids: IndexedReader, labels: IndexedReader) -> None:
    if (ids.sequence_lengths.shape != labels.sequence_lengths.shape
            or not np.array_equal(ids.sequence_lengths, labels.sequence_lengths)
            or not np.array_equal(ids.document_indices, labels.document_indices)):
        raise GraphllmError(f"--data {prefix}: the input_ids and labels files differ in sequence lengths or "
                            "documents; they come from different runs, rerun graphllm preprocess")
