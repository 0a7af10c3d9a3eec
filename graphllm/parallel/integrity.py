"""Checksums of a checkpoint's files: written into its marker when saved, verified before it is loaded.

Every file DCP wrote (the `.distcp` shards, `.metadata`) is recorded with its size and BLAKE2b digest;
`verify` names the first damage it finds: a missing file (a lost rank file, no `.metadata`), a short one
(a truncated shard), or different bytes (a flipped bit in a tensor). A checkpoint written before
checksums existed has no record and is accepted unverified.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

DIGEST = "blake2b"
CHUNK = 1 << 20


def digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, DIGEST).hexdigest()


def file_records(directory: Path, *, skip: tuple[str, ...] = ()) -> dict[str, dict[str, object]]:
    """{relative path: {"bytes": size, DIGEST: hex}} of every regular file under `directory`."""
    out = {}
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel in skip:
            continue
        out[rel] = {"bytes": path.stat().st_size, DIGEST: digest(path)}
    return out


def verify(directory: Path, records: dict | None) -> str | None:
    """What is wrong with the files of `directory` against `records`, or None (None also when there is no
    record to check against)."""
    if not records:
        return None
    for rel, want in records.items():
        path = Path(directory) / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != want["bytes"]:
            return f"{rel} is {size} bytes but was saved with {want['bytes']} (truncated or overwritten)"
        if digest(path) != want[DIGEST]:
            return f"{rel} does not match its {DIGEST} checksum (its bytes changed after the save)"
    return None
