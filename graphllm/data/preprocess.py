"""`graphllm preprocess pretrain`: jsonl / text files -> a Megatron indexed dataset (`.bin` + `.idx`).

Each document becomes one sequence: its token ids, then the tokenizer's EOS when `append_eod`.
Inputs are `.jsonl`/`.json` files (one JSON object per line, the text under `json_key`; blank lines
are ignored) or `.txt` files (each blank-line separated paragraph is a document).

Tokenizing runs in a `multiprocessing` pool through an ordered, chunked `imap`, so the output is
byte-identical whatever the worker count. Records are decoded and parsed in the workers too; the
parent only counts, reports and writes. A malformed record (bad UTF-8, invalid JSON, not an object,
missing key, non-string or empty text) is skipped and reported with file:line, or with `strict` stops
the run. The writer is atomic: outputs appear only once complete, and a failed run leaves any earlier
files at the prefix untouched.
"""

from __future__ import annotations

import json
import multiprocessing
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from graphllm.data.indexed import IndexedWriter, best_dtype
from graphllm.errors import GraphllmError

__all__ = ["PretrainConfig", "Summary", "preprocess_pretrain"]

JSON_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt",)
MAX_BAD_LINES = 100  # bad_lines keeps the first this many; `skipped` counts all
CHUNKSIZE = 64  # records per imap task: large enough to amortize pickling, small enough to stream


@dataclass(kw_only=True, slots=True)
class PretrainConfig:
    inputs: list[Path]
    """`.jsonl`/`.json` files (one object per line) or `.txt` files (blank-line separated paragraphs)."""
    tokenizer: str
    """A sentencepiece `.model` file, a local Hugging Face tokenizer directory, or `builtin`."""
    out: Path
    """Output prefix: writes `<out>.bin` and `<out>.idx`; its directory must exist."""
    json_key: str = "text"
    """The field of each JSON object that holds the document text."""
    workers: int = 1
    """Tokenizer processes; the output does not depend on it."""
    append_eod: bool = True
    """Append the tokenizer's EOS id to every document."""
    strict: bool = False
    """Stop at the first malformed record instead of skipping it."""


@dataclass(kw_only=True, slots=True)
class Summary:
    documents: int = 0
    tokens: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    """Malformed records by reason (`invalid_json`, `missing_key`, ...)."""
    bad_lines: list[tuple[str, int, str]] = field(default_factory=list)
    """(file, line number, reason) for the first MAX_BAD_LINES malformed records."""

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


class _Encoder(Protocol):
    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...


class _SentencePiece:
    def __init__(self, path: Path) -> None:
        from graphllm.data.tokenizer import load_tokenizer

        self._tok = load_tokenizer(path)
        self.vocab_size = self._tok.vocab_size
        eos = self._tok.eos_id
        self.eos_id = eos if eos >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)


class _HuggingFace:
    def __init__(self, directory: Path) -> None:
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except Exception as exc:  # transformers raises OSError/ValueError/KeyError... for bad dirs
            raise GraphllmError(f"--tokenizer {directory}: not a loadable Hugging Face tokenizer directory "
                                f"({type(exc).__name__}: {exc}); point to a folder written by save_pretrained") from exc
        self.vocab_size = len(self._tok)
        self.eos_id = self._tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)


def _resolve_tokenizer(spec: str) -> str:
    """A spec workers can load without training anything: `builtin` becomes its cached model path."""
    if spec == "builtin":
        from graphllm.data.tokenizer import builtin_tokenizer

        return str(builtin_tokenizer().path)
    return spec


def _load_encoder(spec: str) -> _Encoder:
    path = Path(spec)
    if path.is_dir():
        return _HuggingFace(path)
    if path.is_file():
        return _SentencePiece(path)
    raise GraphllmError(f"--tokenizer {spec}: no such file or directory; pass a sentencepiece .model file, "
                        "a Hugging Face tokenizer directory, or `builtin`")


# -- reading ----------------------------------------------------------------------------------
# A record is (line number, raw bytes, is_json); workers turn it into ids or a skip reason.
_Record = tuple[int, bytes, bool]


def _check_inputs(inputs: list[Path]) -> None:
    if not inputs:
        raise GraphllmError("no inputs; pass --input FILE [FILE ...]")
    for path in inputs:
        if not Path(path).is_file():
            raise GraphllmError(f"--input {path}: no such file")
        if Path(path).suffix.lower() not in JSON_SUFFIXES + TEXT_SUFFIXES:
            raise GraphllmError(f"--input {path}: unknown file type {Path(path).suffix or '(none)'!r}; "
                                f"use {', '.join(JSON_SUFFIXES + TEXT_SUFFIXES)}")


def _records(path: Path) -> Iterator[_Record]:
    try:
        with open(path, "rb") as f:
            if path.suffix.lower() in JSON_SUFFIXES:
                for no, line in enumerate(f, 1):
                    if line.strip():
                        yield no, line, True
                return
            start, para = 0, []
            for no, line in enumerate(f, 1):
                if line.strip():
                    start = start if para else no
                    para.append(line)
                elif para:
                    yield start, b"".join(para).rstrip(b"\r\n"), False
                    para = []
            if para:
                yield start, b"".join(para).rstrip(b"\r\n"), False
    except OSError as exc:
        raise GraphllmError(f"--input {path}: cannot read ({exc})") from exc


# -- workers ----------------------------------------------------------------------------------
_ENCODER: _Encoder | None = None
_KEY = "text"
_EOD: int | None = None


def _init_worker(spec: str, key: str, eod: int | None) -> None:
    global _ENCODER, _KEY, _EOD
    _ENCODER, _KEY, _EOD = _load_encoder(spec), key, eod


def _text_of(raw: bytes, is_json: bool) -> str | tuple[str, str]:
    """The document text, or (reason, detail) when the record is malformed."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return "invalid_utf8", f"invalid UTF-8 ({exc.reason} at byte {exc.start})"
    if is_json:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            return "invalid_json", f"invalid JSON ({exc.msg} at column {exc.colno})"
        if not isinstance(obj, dict):
            return "not_object", f"not a JSON object (got {type(obj).__name__})"
        if _KEY not in obj:
            return "missing_key", f"missing key {_KEY!r}"
        text = obj[_KEY]
        if not isinstance(text, str):
            return "not_string", f"{_KEY!r} is {type(text).__name__}, not a string"
    if not text.strip():
        return "empty_text", "empty text"
    return text


def _encode(record: _Record) -> tuple[int, list[int] | tuple[str, str]]:
    no, raw, is_json = record
    text = _text_of(raw, is_json)
    if isinstance(text, tuple):
        return no, text
    ids = _ENCODER.encode(text)
    if _EOD is not None:
        ids.append(_EOD)
    return no, ids


# -- driver -----------------------------------------------------------------------------------
def preprocess_pretrain(cfg: PretrainConfig, progress: Callable[[int], None] | None = None) -> Summary:
    """Tokenize `cfg.inputs` into `<cfg.out>.bin/.idx`; `progress(n)` is called as n more records finish."""
    if cfg.workers < 1:
        raise GraphllmError(f"--workers must be at least 1, got {cfg.workers}")
    inputs = [Path(p) for p in cfg.inputs]
    _check_inputs(inputs)
    spec = _resolve_tokenizer(cfg.tokenizer)
    encoder = _load_encoder(spec)  # fail here, in the parent, with a clear message
    eod = None
    if cfg.append_eod:
        if encoder.eos_id is None:
            raise GraphllmError(f"--tokenizer {cfg.tokenizer} has no EOS token to append; pass --no-eod")
        eod = encoder.eos_id

    summary = Summary()
    skipped: Counter[str] = Counter()
    pool = None
    if cfg.workers > 1:
        pool = multiprocessing.get_context().Pool(cfg.workers, initializer=_init_worker,
                                                  initargs=(spec, cfg.json_key, eod))
    else:
        _init_worker(spec, cfg.json_key, eod)
    try:
        with IndexedWriter(cfg.out, best_dtype(encoder.vocab_size)) as writer:
            for path in inputs:
                results = (pool.imap(_encode, _records(path), chunksize=CHUNKSIZE) if pool
                           else map(_encode, _records(path)))
                for no, out in results:
                    if isinstance(out, tuple):
                        reason, detail = out
                        if cfg.strict:
                            raise GraphllmError(f"{path}:{no}: {detail} (--strict stops at the first malformed record)")
                        skipped[reason] += 1
                        if len(summary.bad_lines) < MAX_BAD_LINES:
                            summary.bad_lines.append((str(path), no, detail))
                    else:
                        writer.add_document(out)
                        summary.documents += 1
                        summary.tokens += len(out)
                    if progress is not None:
                        progress(1)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    summary.skipped = dict(skipped)
    return summary
