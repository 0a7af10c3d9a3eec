"""Megatron-LM's memory-mapped indexed dataset (`<prefix>.bin` + `<prefix>.idx`), byte-compatible.

`.bin` is the bare token stream: every sequence's tokens back to back, in one dtype, no header.
`.idx` is little-endian and laid out as
    magic  b"MMIDIDX\\x00\\x00"                     9 bytes
    version (uint64, always 1)                      8
    dtype code (uint8, see DTYPE_CODES)             1
    sequence count N (uint64)                       8
    document count D (uint64)                       8   D = documents + 1
    sequence lengths   int32[N]                         tokens per sequence
    sequence pointers  int64[N]                         byte offset of each sequence in .bin
    document indices   int64[D]                         0, then the sequence count after each document
    sequence modes     int8[N]  (only in "multimodal" files: a per-sequence tag such as text/image)
A document is one or more consecutive sequences; document k spans sequences
`document_indices[k] : document_indices[k + 1]`.

The writer streams tokens to `.bin` as they arrive and keeps only the per-sequence lengths and the
per-document boundaries, so memory grows with the number of sequences, never with the number of
tokens. Both files are written under temporary names and renamed into place by `finalize()`, so an
interrupted write never leaves a `.idx` that looks complete. `finalize()` is `prepare()` (everything that
needs disk space: flush, fsync, the `.idx` temp file) then `commit()` (renames only), so a caller finishing
several datasets together can prepare them all before moving any into place. A failed write (a full disk:
ENOSPC) or `abort()` always removes the temp files, even when closing the `.bin` cannot flush its buffer.
"""

from __future__ import annotations

import os
import struct
import tempfile
from array import array
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import numpy as np

from graphllm.data.cache import FILE_MODE
from graphllm.errors import GraphllmError

__all__ = ["DTYPE_CODES", "IndexedReader", "IndexedWriter", "best_dtype"]

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# magic(9) + version(8) + dtype code(1) + sequence count(8) + document count(8)
HEADER_BYTES = 34
_HEADER = struct.Struct("<9sQBQQ")
assert _HEADER.size == HEADER_BYTES

# The on-disk dtype code <-> numpy dtype table (Megatron's `DType` enum).
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF = {dtype: code for code, dtype in DTYPE_CODES.items()}

_INT32_MAX = 2**31 - 1


def best_dtype(vocab_size: int | None) -> np.dtype:
    """The token dtype Megatron's preprocessing picks: uint16 for vocabularies under 65500, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def _paths(prefix: str | os.PathLike) -> tuple[Path, Path]:
    prefix = os.fspath(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


def _token_dtype(dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise GraphllmError(f"IndexedWriter: dtype {dtype!r} is not a numpy dtype; use one of "
                            f"{sorted(d.name for d in _CODE_OF)}") from e
    if dt.byteorder == ">":
        raise GraphllmError(f"IndexedWriter: dtype {dt} is big-endian; the format is little-endian, use {dt.newbyteorder('<')}")
    if dt not in _CODE_OF:
        raise GraphllmError(f"IndexedWriter: dtype {dt} has no code in the .idx format; use one of "
                            f"{sorted(d.name for d in _CODE_OF)}")
    return dt


class IndexedWriter:
    """Streams documents into `<prefix>.bin` and writes `<prefix>.idx` on `finalize()`.

    `with IndexedWriter(prefix, np.uint16) as w: w.add_document(tokens)` finalizes on a clean exit and
    discards the temporary files (leaving any earlier files at `prefix` untouched) on an exception.
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.int32) -> None:
        self.dtype = _token_dtype(dtype)
        self.bin_path, self.idx_path = _paths(prefix)
        directory = self.bin_path.parent
        if not directory.is_dir():
            raise GraphllmError(f"IndexedWriter: directory {directory} for {self.bin_path} does not exist; create it first")
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=self.bin_path.name + ".", suffix=".tmp")
        self._bin_tmp = Path(tmp)
        self._bin = os.fdopen(fd, "wb")
        self._idx_tmp: Path | None = None
        # The only state that grows: one int32 per sequence and one int64 per document.
        self._lengths = array("i")
        self._doc_ends = array("q", [0])
        self._bin_bytes = 0
        self._closed = False
        self._prepared = False

    # -- writing ------------------------------------------------------------------------------
    def add_document(self, tokens: Sequence[int] | np.ndarray, lengths: Sequence[int] | None = None) -> None:
        """Append one document: `tokens` split into sequences of `lengths` (default: one sequence)."""
        if self._closed:
            raise GraphllmError(f"IndexedWriter: {self.idx_path} is already finalized or aborted; open a new writer")
        arr = self._as_tokens(tokens)
        if lengths is None:
            lengths = [arr.size]
        lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if lens.size == 0:
            raise GraphllmError(f"IndexedWriter: a document needs at least one sequence ({self.bin_path}); "
                                "pass lengths=None for a single sequence")
        if (lens < 0).any() or (lens > _INT32_MAX).any():
            raise GraphllmError(f"IndexedWriter: sequence lengths must be in [0, 2**31), got {lens.tolist()} ({self.bin_path})")
        if int(lens.sum()) != arr.size:
            raise GraphllmError(f"IndexedWriter: lengths sum to {int(lens.sum())} but the document has {arr.size} "
                                f"tokens ({self.bin_path}); make sum(lengths) == len(tokens)")
        self._bin_bytes += arr.nbytes  # counted before the write: what a full disk refused counts too
        self._bin.write(arr.tobytes(order="C"))
        self._lengths.extend(lens.astype(np.int32).tolist())
        self._doc_ends.append(len(self._lengths))

    def _as_tokens(self, tokens) -> np.ndarray:
        src = np.asarray(tokens)
        if src.ndim != 1:
            src = src.reshape(-1)
        if src.size == 0:
            return src.astype(self.dtype)
        if self.dtype.kind in "iu":
            if src.dtype.kind not in "iub":
                raise GraphllmError(f"IndexedWriter: tokens must be integers for dtype {self.dtype}, got {src.dtype} "
                                    f"({self.bin_path})")
            info = np.iinfo(self.dtype)
            lo, hi = int(src.min()), int(src.max())
            if lo < info.min or hi > info.max:
                raise GraphllmError(f"IndexedWriter: token ids [{lo}, {hi}] do not fit {self.dtype} ({self.bin_path}); "
                                    "use a wider dtype, e.g. best_dtype(vocab_size)")
        return np.ascontiguousarray(src, dtype=self.dtype.newbyteorder("<"))

    @property
    def num_sequences(self) -> int:
        return len(self._lengths)

    @property
    def num_documents(self) -> int:
        return len(self._doc_ends) - 1

    @property
    def nbytes(self) -> int:
        """Bytes of `.bin` and `.idx` once finalized, for what was added so far."""
        return self._bin_bytes + HEADER_BYTES + 12 * len(self._lengths) + 8 * len(self._doc_ends)

    # -- finishing ----------------------------------------------------------------------------
    def finalize(self) -> None:
        """Flush `.bin`, write `.idx`, and move both into place (the `.idx` last)."""
        self.prepare()
        self.commit()

    def prepare(self) -> None:
        """Everything of `finalize` that writes: `.bin` flushed and fsynced, `.idx` complete under its temp
        name. Nothing at the prefix changes yet; on failure the temp files are removed."""
        if self._closed:
            raise GraphllmError(f"IndexedWriter: {self.idx_path} is already finalized or aborted; open a new writer")
        self._closed = True
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            lengths = np.frombuffer(self._lengths, dtype=np.int32) if len(self._lengths) else np.zeros(0, np.int32)
            pointers = np.zeros(lengths.size, dtype=np.int64)
            if lengths.size > 1:
                np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
            doc_ends = np.frombuffer(self._doc_ends, dtype=np.int64)
            fd, tmp = tempfile.mkstemp(dir=self.idx_path.parent, prefix=self.idx_path.name + ".", suffix=".tmp")
            self._idx_tmp = Path(tmp)
            with os.fdopen(fd, "wb") as f:
                f.write(_HEADER.pack(MAGIC, VERSION, _CODE_OF[self.dtype], lengths.size, doc_ends.size))
                f.write(lengths.astype("<i4").tobytes())
                f.write(pointers.astype("<i8").tobytes())
                f.write(doc_ends.astype("<i8").tobytes())
                f.flush()
                os.fsync(f.fileno())
            for tmp in (self._bin_tmp, self._idx_tmp):
                os.chmod(tmp, FILE_MODE)  # mkstemp's 0o600 would hide a dataset from other users
        except BaseException:
            self._discard()
            raise
        self._prepared = True

    def commit(self) -> None:
        """Move the prepared files into place (renames only, no new data), the `.idx` last."""
        if not self._prepared:
            raise GraphllmError(f"IndexedWriter: {self.idx_path} is not prepared (or already committed); "
                                "call prepare()")
        self._prepared = False
        try:
            # Drop any old .idx first so that no moment pairs an old .idx with the new .bin.
            self.idx_path.unlink(missing_ok=True)
            os.replace(self._bin_tmp, self.bin_path)
            os.replace(self._idx_tmp, self.idx_path)
        except BaseException:
            self._discard()
            raise

    def abort(self) -> None:
        """Discard the temporary files (also after `prepare`); files already at the prefix are left as they were."""
        if not self._closed or self._prepared:
            self._closed, self._prepared = True, False
            self._discard()

    def _discard(self) -> None:
        try:
            if not self._bin.closed:
                self._bin.close()  # flushes the buffer: on a full disk that raises again (the fd is closed anyway)
        except OSError:
            pass  # the temp file is removed below; the error that led here is the one to report
        finally:
            for tmp in (self._bin_tmp, self._idx_tmp):
                if tmp is not None:
                    tmp.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.finalize()

    def __del__(self) -> None:
        # An unfinalized (or prepared, uncommitted) writer that is garbage-collected leaves no temp files behind.
        if not getattr(self, "_closed", True) or getattr(self, "_prepared", False):
            self.abort()


class IndexedReader:
    """Memory-mapped reader for `<prefix>.bin` + `<prefix>.idx`; `reader[i]` is a view of sequence i."""

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.bin_path, self.idx_path = _paths(prefix)
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise GraphllmError(f"indexed dataset file {path} is missing; write it with IndexedWriter "
                                    "or check the prefix (given without .bin/.idx)")
        idx_size = self.idx_path.stat().st_size
        if idx_size < HEADER_BYTES:
            raise GraphllmError(f"{self.idx_path} is {idx_size} bytes, shorter than the {HEADER_BYTES}-byte header; "
                                "the file is truncated, rewrite it")
        with open(self.idx_path, "rb") as f:
            magic, version, code, n_seq, n_doc = _HEADER.unpack(f.read(HEADER_BYTES))
        if magic != MAGIC:
            raise GraphllmError(f"{self.idx_path} has magic {magic!r}, not {MAGIC!r}; it is not a Megatron "
                                "MMapIndexedDataset index (or is the legacy format), rebuild it")
        if version != VERSION:
            raise GraphllmError(f"{self.idx_path} has index version {version}; only version {VERSION} is supported, rebuild it")
        if code not in DTYPE_CODES:
            raise GraphllmError(f"{self.idx_path} has unknown dtype code {code}; known codes are "
                                f"{sorted(DTYPE_CODES)}, the file is corrupt")
        self.dtype: np.dtype = DTYPE_CODES[code]
        body = 4 * n_seq + 8 * n_seq + 8 * n_doc
        if idx_size == HEADER_BYTES + body:
            has_modes = False
        elif idx_size == HEADER_BYTES + body + n_seq:
            has_modes = True
        else:
            raise GraphllmError(f"{self.idx_path} is {idx_size} bytes but its header ({n_seq} sequences, {n_doc} "
                                f"document indices) needs {HEADER_BYTES + body}; the file is truncated or corrupt, rewrite it")

        self._idx = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        off = HEADER_BYTES
        self.sequence_lengths: np.ndarray = np.frombuffer(self._idx, dtype="<i4", count=n_seq, offset=off)
        off += 4 * n_seq
        self.sequence_pointers: np.ndarray = np.frombuffer(self._idx, dtype="<i8", count=n_seq, offset=off)
        off += 8 * n_seq
        self.document_indices: np.ndarray = np.frombuffer(self._idx, dtype="<i8", count=n_doc, offset=off)
        off += 8 * n_doc
        # Per-sequence tags of Megatron's "multimodal" files; None for plain token files.
        self.sequence_modes: np.ndarray | None = (
            np.frombuffer(self._idx, dtype=np.int8, count=n_seq, offset=off) if has_modes else None)
        self._check_index()

        bin_size = self.bin_path.stat().st_size
        self._check_bin(bin_size)
        # np.memmap refuses empty files; an empty dataset reads from an empty array instead.
        self._bin = (np.memmap(self.bin_path, dtype=np.uint8, mode="r") if bin_size
                     else np.zeros(0, dtype=np.uint8))

    def _check_index(self) -> None:
        lengths, docs = self.sequence_lengths, self.document_indices
        n = lengths.size
        if (lengths < 0).any():
            raise GraphllmError(f"{self.idx_path} has negative sequence lengths; the file is corrupt, rewrite it")
        if docs.size == 0 or docs[0] != 0 or docs[-1] != n or (np.diff(docs) < 0).any():
            raise GraphllmError(f"{self.idx_path} document indices must rise from 0 to the sequence count {n}; "
                                "the file is corrupt, rewrite it")

    def _check_bin(self, bin_size: int) -> None:
        if self.sequence_lengths.size == 0:
            return
        item = self.dtype.itemsize
        ptrs = self.sequence_pointers
        ends = ptrs + self.sequence_lengths.astype(np.int64) * item
        if (ptrs < 0).any() or (ptrs % item).any():
            raise GraphllmError(f"{self.idx_path} has sequence pointers that are negative or not multiples of "
                                f"{item} bytes; the file is corrupt, rewrite it")
        need = int(ends.max())
        if need > bin_size:
            raise GraphllmError(f"{self.bin_path} is {bin_size} bytes but {self.idx_path} points up to byte {need}; "
                                ".bin is truncated or belongs to another index, rewrite both")

    # -- access -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.sequence_lengths.size)

    def _index(self, i: int) -> int:
        n = len(self)
        j = int(i)
        if j < 0:
            j += n
        if not 0 <= j < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences in {self.bin_path}")
        return j

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `offset : offset + length` of sequence `i`, as a read-only view into the mapped `.bin`."""
        j = self._index(i)
        seq_len = int(self.sequence_lengths[j])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence {i} of length {seq_len}")
        item = self.dtype.itemsize
        start = int(self.sequence_pointers[j]) + offset * item
        return self._bin[start:start + length * item].view(dtype=self.dtype, type=np.ndarray)

    def __iter__(self):
        for i in range(len(self)):
            yield self.get(i)

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    @property
    def num_documents(self) -> int:
        return int(self.document_indices.size - 1)

    def document(self, k: int) -> list[np.ndarray]:
        """The sequences of document `k`."""
        if not 0 <= k < self.num_documents:
            raise IndexError(f"document {k} out of range for {self.num_documents} documents in {self.bin_path}")
        lo, hi = int(self.document_indices[k]), int(self.document_indices[k + 1])
        return [self.get(i) for i in range(lo, hi)]
