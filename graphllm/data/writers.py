"""The output side of preprocessing: a set of indexed datasets finished together, then `PREFIX_meta.json`.

`Outputs` opens one `IndexedWriter` per dataset. On success it first writes everything that needs disk
space (every dataset's `.bin`/`.idx` and the meta file, under temp names), then removes any old meta
file, moves the datasets into place (each `.idx` last) and `PREFIX_meta.json` last: a prefix whose meta
file exists is complete, and a meta file never describes other data than the files beside it. On
failure every writer is aborted (temp files removed) and files already at the prefix stay as they
were. A full disk (ENOSPC) becomes one GraphllmError naming the directory and the space the whole run
needs, estimated from the bytes written and the share of the input read (`out.read`, kept current by
`map_records`).

`SampleSink` writes (input_ids, labels) samples into a pair of datasets with the same layout:
one document per sample, or, with `pack_len`, samples packed next-fit in input order into documents
of at most `pack_len` tokens, each sample its own sequence inside the document (so a trainer can
reset positions and attention at sample boundaries). Next-fit keeps one open document and streams;
first-fit would fill documents a little better but must hold every open document in memory.
"""

from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import numpy as np

from graphllm.version import __version__
from graphllm.data.cache import write_temp
from graphllm.data.indexed import IndexedWriter
from graphllm.data.records import InputProgress
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
    tokenizer_fingerprint: str | None = None
    """The fingerprint recorded in the meta file (graphllm.data.encoders)."""

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
        self.prefix = Path(prefix)
        self.meta = meta_path(prefix)
        self.read = InputProgress()
        """Pass to `map_records(read=...)`: the input share behind what was written, for the ENOSPC estimate."""
        self.writers: dict[str, IndexedWriter] = {}
        try:
            for name, (path, dtype) in datasets.items():
                self.writers[name] = IndexedWriter(path, dtype)
        except BaseException as exc:
            self.abort()
            if _no_space(exc):
                raise self.no_space_error() from exc
            raise
        self._started = time.perf_counter()

    def __getitem__(self, name: str) -> IndexedWriter:
        return self.writers[name]

    def finalize(self, summary: Summary, meta: dict) -> None:
        summary.seconds = time.perf_counter() - self._started
        body = {**meta, "documents": summary.documents, "samples": summary.samples, "tokens": summary.tokens,
                "trained_tokens": summary.trained_tokens, "graphllm": __version__}
        meta_tmp = None
        try:  # first everything that needs disk space, so a full disk changes nothing at the prefix
            for w in self.writers.values():
                w.prepare()
            meta_tmp = write_temp(self.meta, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())
            self.meta.unlink(missing_ok=True)  # no moment pairs an old meta file with new data
            for w in self.writers.values():
                w.commit()
                summary.outputs += [str(w.bin_path), str(w.idx_path)]
            os.replace(meta_tmp, self.meta)
        except BaseException:
            self.abort()
            if meta_tmp is not None:
                meta_tmp.unlink(missing_ok=True)
            raise
        summary.outputs.append(str(self.meta))
        summary.tokenizer_fingerprint = meta.get("tokenizer_fingerprint")

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()

    def no_space_error(self) -> GraphllmError:
        """The one line for a full disk: where, and about how much the whole run needs there."""
        written = sum(w.nbytes for w in self.writers.values())
        share = self.read.fraction
        need = f"about {_size(written / share)}" if share and written else f"at least {_size(written)}"
        return GraphllmError(f"no space left on device at {self.prefix.parent.absolute()} (needed {need}); "
                             "free space there or pass another --out")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
            if _no_space(exc):
                raise self.no_space_error() from exc


def _no_space(exc: BaseException | None) -> bool:
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


def _size(nbytes: float) -> str:
    """Bytes as `df -H` counts free space: GB from 0.1 GB up, else MB to two significant digits."""
    if nbytes >= 1e8:
        return f"{nbytes / 1e9:.1f} GB"
    return f"{nbytes / 1e6:.2g} MB"


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
