"""Readers for the files benchmarks are published in: csv (with or without header), jsonl(.gz), json.

Every reader names the file and the line (or key) of a malformed record in a `GraphllmError`, so a
wrong `--data` directory or a truncated download is one actionable line, never a traceback.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Any, Sequence

from graphllm.errors import GraphllmError


def read_csv(path: Path, *, columns: Sequence[str], header: bool) -> list[dict[str, str]]:
    """Rows of a csv file as dicts keyed by `columns`.

    `header=False` (MMLU): every row is data and must have exactly len(columns) fields.
    `header=True` (CEval): the first row names the columns; all of `columns` must be among them
    (extra columns such as CEval's `explanation` are kept).
    """
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as e:
        raise GraphllmError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); is this the benchmark's csv?") from None
    except csv.Error as e:
        raise GraphllmError(f"{path}: malformed csv ({e})") from None
    if header:
        if not rows:
            raise GraphllmError(f"{path}: empty file; expected a header row {','.join(columns)}")
        names = [c.strip() for c in rows[0]]
        missing = [c for c in columns if c not in names]
        if missing:
            raise GraphllmError(f"{path}: header {','.join(names)} lacks column(s) {','.join(missing)}; "
                                f"expected {','.join(columns)}")
        out = []
        for line, row in enumerate(rows[1:], start=2):
            if len(row) != len(names):
                raise GraphllmError(f"{path}:{line}: {len(row)} fields, the header has {len(names)}")
            out.append(dict(zip(names, row)))
        return out
    out = []
    for line, row in enumerate(rows, start=1):
        if len(row) != len(columns):
            raise GraphllmError(f"{path}:{line}: {len(row)} fields, expected {len(columns)} "
                                f"({','.join(columns)}, no header row)")
        out.append(dict(zip(columns, row)))
    return out


def read_jsonl(path: Path, *, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Records of a JSON-lines file (gzip-compressed when the name ends in .gz); blank lines skipped.

    Each record must be an object with every key in `required`.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    records = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise GraphllmError(f"{path}:{line_no}: not a JSON line ({e.msg})") from None
                check_keys(rec, required, f"{path}:{line_no}")
                records.append(rec)
    except (OSError, EOFError, UnicodeDecodeError) as e:  # gzip.BadGzipFile is an OSError
        raise GraphllmError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    return records


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise GraphllmError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GraphllmError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def check_keys(rec: Any, required: Sequence[str], where: str) -> None:
    if not isinstance(rec, dict):
        raise GraphllmError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in required if k not in rec]
    if missing:
        raise GraphllmError(f"{where}: record lacks key(s) {', '.join(missing)} (has {', '.join(rec) or 'none'})")


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise GraphllmError(f"--data {path}: no such directory; point it at the {what}")
    return path
