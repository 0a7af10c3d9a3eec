"""The output side of preprocessing: a set of indexed datasets finished together, then `PREFIX_meta.json`.

`Outputs` opens one `IndexedWriter` per dataset. On success it removes any old meta file, finalizes
every dataset (each atomically, `.idx` last) and writes `PREFIX_meta.json` last, atomically: a prefix
whose meta file exists is complete, and a meta file never describes other data than the files
beside it. On failure every writer is aborted and files already at the prefix stay as they were.

`SampleSink` writes (input_ids, labels) samples into a pair of datasets with the same layout:
one document per sample, or, with `pack_len`, samples packed next-fit in input order into documents
of at most `pack_len` tokens, each sample its own sequence inside the document (so a trainer can
reset positions and attention at sample boundaries). Next-fit keeps one open document and streams;
first-fit would fill documents a little better but must hold every open document in memory.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import numpy as np

from graphllm.version import __version__
from graphllm.data.cache import atomic_write
from graphllm.data.indexed import IndexedWriter
from graphllm.errors import GraphllmError

__all__ = ["Outputs", "SampleSink", "Summary", "fit_sample", "meta_path", "sample_arrays"]

LABEL_DTYPE = np.dtype(np.int32)


@dataclass(kw_only=True, slots=True)
class Summary:
    documents: int = 0
    samples: int = 0
    tokens: int = 0
    """Tokens written (for pairwise data: chosen and rejected together)."""
    trained_tokens: int = 0
    """Tokens whose label is not IGNORE_INDEX (pretrain: every token)."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Malformed records by reason (`invalid_json`, `missing_key`, ...)."""
    bad_lines: list[tuple[str, int, str]] = field(default_factory=list)
    """(file, line number, reason) for the first malformed records."""
    overlong: int = 0
    """Samples longer than --seq-len: skipped or truncated, per `overlong_policy`."""
    overlong_policy: str | None = None
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    """Files written, the meta file last."""

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def meta_path(prefix: Path | str) -> Path:
    return Path(f"{os.fspath(prefix)}_meta.json")


class Outputs:
    """Named indexed datasets under one prefix, finished together, then the meta file."""

    def __init__(self, prefix: Path | str, datasets: dict[str, tuple[Path | str, np.dtype]]) -> None:
        self.meta = meta_path(prefix)
        self.writers: dict[str, IndexedWriter] = {}
        try:
            for name, (path, dtype) in datasets.items():
                self.writers[name] = IndexedWriter(path, dtype)
        except BaseException:
            self.abort()
            raise
        self._started = time.perf_counter()

    def __getitem__(self, name: str) -> IndexedWriter:
        return self.writers[name]

    def finalize(self, summary: Summary, meta: dict) -> None:
        summary.seconds = time.perf_counter() - self._started
        self.meta.unlink(missing_ok=True)  # no moment pairs an old meta file with new data
        pending = list(self.writers.values())
        try:
            while pending:
                pending[0].finalize()
                summary.outputs += [str(pending[0].bin_path), str(pending[0].idx_path)]
                pending.pop(0)
        except BaseException:
            for w in pending:
                w.abort()
            raise
        body = {**meta, "documents": summary.documents, "samples": summary.samples, "tokens": summary.tokens,
                "trained_tokens": summary.trained_tokens, "graphllm": __version__}
        atomic_write(self.meta, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())
        summary.outputs.append(str(self.meta))

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()


def sample_arrays(ids: list[int], labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """A sample as int32 arrays: what workers send back (an array pickles as one buffer, a list per item)."""
    return np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=LABEL_DTYPE)


def fit_sample(ids: np.ndarray, labels: np.ndarray, seq_len: int | None,
               policy: Literal["skip", "truncate"], ignore_index: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The sample cut to `seq_len` tokens (policy "truncate"), or None when it is longer and the policy
    is "skip" or truncation leaves no trained token."""
    if seq_len is None or len(ids) <= seq_len:
        return ids, labels
    if policy == "skip":
        return None
    labels = labels[:seq_len]
    if not (labels != ignore_index).any():
        return None
    return ids[:seq_len], labels


class SampleSink:
    """Writes (input_ids, labels) samples to two writers with identical document/sequence layouts."""

    def __init__(self, ids: IndexedWriter, labels: IndexedWriter, summary: Summary, *,
                 pack_len: int | None, ignore_index: int) -> None:
        if pack_len is not None and pack_len < 1:
            raise GraphllmError(f"--seq-len must be positive, got {pack_len}")
        self._ids, self._labels, self._summary = ids, labels, summary
        self._pack_len, self._ignore = pack_len, ignore_index
        self._open: list[tuple[np.ndarray, np.ndarray]] = []  # the samples of the open packed document
        self._open_len = 0

    def add(self, ids: np.ndarray, labels: np.ndarray) -> None:
        assert len(ids) == len(labels), (len(ids), len(labels))
        s = self._summary
        s.samples += 1
        s.tokens += len(ids)
        s.trained_tokens += int(np.count_nonzero(labels != self._ignore))
        if self._pack_len is None:
            self._write(ids, labels, [len(ids)])
            return
        assert len(ids) <= self._pack_len, "fit_sample runs before packing"
        if self._open and self._open_len + len(ids) > self._pack_len:
            self.flush()
        self._open.append((ids, labels))
        self._open_len += len(ids)

    def flush(self) -> None:
        """Close the open packed document (call once after the last sample)."""
        if self._open:
            self._write(np.concatenate([i for i, _ in self._open]), np.concatenate([lab for _, lab in self._open]),
                        [len(i) for i, _ in self._open])
            self._open, self._open_len = [], 0

    def _write(self, ids: np.ndarray, labels: np.ndarray, lengths: list[int]) -> None:
        self._ids.add_document(ids, lengths)
        self._labels.add_document(labels, lengths)
        self._summary.documents += 1
