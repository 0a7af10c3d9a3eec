"""Reading raw records from input files and mapping a job over them in worker processes, in order.

Input formats, chosen by suffix:
- `.jsonl`: one JSON object per line (blank lines ignored); parsed in the workers.
- `.json`: a JSON array of objects (Alpaca's own format), or, when the file does not start with `[`,
  one object per line like `.jsonl`. An array is read whole and split in the parent; each element
  keeps the line it starts on. A syntax error inside an array is fatal (nothing after it can be
  located reliably), with file:line and the advice to convert to `.jsonl`.
- `.txt`: blank-line separated paragraphs (pretrain only).
- `.parquet`: one record per row, columns as keys, when pyarrow is installed; rows are numbered
  from 1 and reported in the line position.

A job maps one record to a result or raises `Malformed(reason, detail)`; `map_records` turns those
into `Skip`s, counts them by reason, remembers the first MAX_BAD_LINES with file:line, or under
`strict` stops at the first with a GraphllmError. `Pool.imap` keeps input order, so the output does
not depend on the worker count.
"""

from __future__ import annotations

import json
import multiprocessing
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from graphllm.errors import GraphllmError

__all__ = ["InputProgress", "Malformed", "Record", "Skip", "SkipLog", "check_inputs", "map_records", "record_object",
           "record_text"]

JSON_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt",)
PARQUET_SUFFIXES = (".parquet",)
MAX_BAD_LINES = 100  # SkipLog.bad_lines keeps the first this many; `skipped` counts all
CHUNKSIZE = 64  # records per imap task: large enough to amortize pickling, small enough to stream
PARQUET_BATCH_ROWS = 1024
UTF8_BOM = b"\xef\xbb\xbf"

# (line number, kind, payload): kind "line" -> payload is the raw bytes of one JSON line; "text" -> the
# raw bytes of a paragraph; "object" -> an already parsed value; "skip" -> a Skip found while reading.
Record = tuple[int, str, Any]


class Malformed(Exception):
    """Raised by record handlers: the record is skipped under `reason`, `detail` says why (one line)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(slots=True)
class Skip:
    reason: str
    detail: str


@dataclass(kw_only=True, slots=True)
class SkipLog:
    strict: bool = False
    skipped: Counter = field(default_factory=Counter)
    """Malformed records by reason (`invalid_json`, `missing_key`, ...)."""
    bad_lines: list[tuple[str, int, str]] = field(default_factory=list)
    """(file, line number, detail) for the first MAX_BAD_LINES malformed records."""

    def add(self, path: Path, no: int, skip: Skip) -> None:
        if self.strict:
            raise GraphllmError(f"{path}:{no}: {skip.detail} (--strict stops at the first malformed record)")
        self.skipped[skip.reason] += 1
        if len(self.bad_lines) < MAX_BAD_LINES:
            self.bad_lines.append((str(path), no, skip.detail))


@dataclass(kw_only=True, slots=True)
class InputProgress:
    """How much of the input `map_records` has turned into results, for estimates (the disk space a run
    needs). Lines and paragraphs count as they finish; JSON arrays and parquet files only when whole."""

    total: int = 0
    """Bytes of all input files."""
    done: int = 0
    """Bytes of the records whose results were yielded (whole files once finished)."""

    @property
    def fraction(self) -> float | None:
        """Share of the input done; None before anything measurable is done."""
        return min(1.0, self.done / self.total) if self.total > 0 and self.done > 0 else None


def check_inputs(inputs: list[Path], *, allow_text: bool) -> None:
    if not inputs:
        raise GraphllmError("no inputs; pass --input FILE [FILE ...]")
    suffixes = JSON_SUFFIXES + (TEXT_SUFFIXES if allow_text else ()) + PARQUET_SUFFIXES
    for path in inputs:
        if not Path(path).is_file():
            raise GraphllmError(f"--input {path}: no such file")
        if Path(path).suffix.lower() not in suffixes:
            raise GraphllmError(f"--input {path}: unknown file type {Path(path).suffix or '(none)'!r}; "
                                f"use {', '.join(suffixes)}")


# -- readers ----------------------------------------------------------------------------------
def read_records(path: Path) -> Iterator[Record]:
    suffix = path.suffix.lower()
    try:
        if suffix in PARQUET_SUFFIXES:
            yield from _parquet_rows(path)
            return
        with open(path, "rb") as f:
            if suffix in TEXT_SUFFIXES:
                yield from _paragraphs(f)
                return
            bom = f.read(len(UTF8_BOM)) == UTF8_BOM  # editors on Windows start files with one
            f.seek(len(UTF8_BOM) if bom else 0)
            head = f.read(4096).lstrip()
            f.seek(len(UTF8_BOM) if bom else 0)
            if suffix == ".json" and head.startswith(b"["):
                yield from _json_array(path, f.read())
                return
            for no, line in enumerate(f, 1):
                if line.strip():
                    yield no, "line", line
    except OSError as exc:
        raise GraphllmError(f"--input {path}: cannot read ({exc})") from exc


def _paragraphs(f) -> Iterator[Record]:
    start, para = 0, []
    for no, line in enumerate(f, 1):
        if line.strip():
            start = start if para else no
            para.append(line)
        elif para:
            yield start, "text", b"".join(para).rstrip(b"\r\n")
            para = []
    if para:
        yield start, "text", b"".join(para).rstrip(b"\r\n")


_WS = re.compile(r"[ \t\r\n]*")


def _json_array(path: Path, data: bytes) -> Iterator[Record]:
    # surrogateescape keeps undecodable bytes as lone surrogates, so one bad element is found and
    # skipped instead of the whole file failing to decode.
    text = data.decode("utf-8", "surrogateescape")
    decoder = json.JSONDecoder()
    line, counted = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    pos = _WS.match(text, 0).end() + 1  # past "["
    first = True
    while True:
        pos = _WS.match(text, pos).end()
        if text.startswith("]", pos):
            return
        if not first:
            if not text.startswith(",", pos):
                raise GraphllmError(f"{path}:{line_at(pos)}: invalid JSON array (expected ',' or ']'); "
                                    "fix the file, or convert it to .jsonl so a bad record is skipped instead")
            pos = _WS.match(text, pos + 1).end()
        first = False
        start = pos
        no = line_at(start)
        try:
            obj, pos = decoder.raw_decode(text, start)
        except json.JSONDecodeError as exc:
            raise GraphllmError(f"{path}:{line_at(exc.pos)}: invalid JSON array ({exc.msg}); fix the file, or "
                                "convert it to .jsonl so a bad record is skipped instead") from exc
        try:
            text[start:pos].encode("utf-8")
        except UnicodeEncodeError as exc:
            yield no, "skip", Skip("invalid_utf8", f"invalid UTF-8 (at character {exc.start} of the record)")
            continue
        yield no, "object", obj


def _parquet_rows(path: Path) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise GraphllmError(f"--input {path}: reading .parquet needs pyarrow; `pip install pyarrow`, "
                            "or convert the file to .jsonl") from exc
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for files that are not parquet
        raise GraphllmError(f"--input {path}: not a readable parquet file ({exc})") from exc
    no = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for row in batch.to_pylist():
            no += 1
            yield no, "object", row


# -- parsing helpers used by the jobs -----------------------------------------------------------
def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Malformed("invalid_utf8", f"invalid UTF-8 ({exc.reason} at byte {exc.start})") from None


def record_object(kind: str, payload: Any) -> dict:
    """The record as a JSON object, or Malformed."""
    if kind == "skip":
        raise Malformed(payload.reason, payload.detail)
    if kind == "line":
        try:
            payload = json.loads(_decode(payload))
        except json.JSONDecodeError as exc:
            raise Malformed("invalid_json", f"invalid JSON ({exc.msg} at column {exc.colno})") from None
    elif kind != "object":
        raise Malformed("not_object", f"a {kind} record where a JSON object is needed")
    if not isinstance(payload, dict):
        raise Malformed("not_object", f"not a JSON object (got {type(payload).__name__})")
    return payload


def record_text(kind: str, payload: Any, key: str) -> str:
    """The text of a pretrain record (a paragraph, or the `key` field of an object), or Malformed."""
    if kind == "text":
        text = _decode(payload)
    else:
        obj = record_object(kind, payload)
        if key not in obj:
            raise Malformed("missing_key", f"missing key {key!r}")
        text = obj[key]
        if not isinstance(text, str):
            raise Malformed("not_string", f"{key!r} is {type(text).__name__}, not a string")
    if not text.strip():
        raise Malformed("empty_text", "empty text")
    return text


# -- the worker pool --------------------------------------------------------------------------
class Job(Protocol):
    """Picklable; `setup()` runs once per process (load the tokenizer), then `run` once per record."""

    def setup(self) -> None: ...

    def run(self, kind: str, payload: Any) -> Any: ...


_JOB: Job | None = None


def _init_worker(job: Job) -> None:
    global _JOB
    _JOB = job
    job.setup()


def _init_pool_worker(job: Job) -> None:
    """A forked worker inherits the parent's Python-level SIGTERM/SIGINT handlers (the CLI's StopAtOnce). Run
    only between bytecodes, such a handler can miss `Pool.terminate()`'s SIGTERM when it lands just before the
    worker blocks on the task queue's lock, and the parent then waits in join() forever. Workers die on
    SIGTERM as processes do, and leave SIGINT (Ctrl-C reaches the whole process group) to the parent, which
    stops the pool."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(job)


def _apply(record: Record) -> tuple[int, Any, int]:
    no, kind, payload = record
    size = len(payload) if isinstance(payload, bytes) else 0  # parsed objects: counted when their file ends
    try:
        return no, _JOB.run(kind, payload), size
    except Malformed as m:
        return no, Skip(m.reason, m.detail), size


def map_records(job: Job, inputs: list[Path], *, workers: int, log: SkipLog,
                progress: Callable[[int], None] | None = None, read: InputProgress | None = None) -> Iterator[Any]:
    """Yield `job.run`'s result for every good record of `inputs`, in order; malformed ones go to `log`;
    `read` (optional) is kept current with the input bytes behind what was yielded.

    An input file without a single record raises GraphllmError (an empty file is a mistake, not data).
    """
    read = read if read is not None else InputProgress()
    sizes = [Path(p).stat().st_size if Path(p).is_file() else 0 for p in inputs]
    read.total, read.done = sum(sizes), 0
    if workers < 1:
        raise GraphllmError(f"--workers must be at least 1, got {workers}")
    pool = None
    if workers > 1:
        pool = multiprocessing.get_context().Pool(workers, initializer=_init_pool_worker, initargs=(job,))
    else:
        _init_worker(job)
    try:
        for i, path in enumerate(map(Path, inputs)):
            results = (pool.imap(_apply, read_records(path), chunksize=CHUNKSIZE) if pool
                       else map(_apply, read_records(path)))
            seen = 0
            for no, out, size in results:
                seen += 1
                read.done += size
                if isinstance(out, Skip):
                    log.add(path, no, out)
                else:
                    yield out
                if progress is not None:
                    progress(1)
            if not seen:
                raise GraphllmError(f"--input {path}: the file holds no records (it is empty); remove it from --input")
            read.done = sum(sizes[:i + 1])
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
