"""Output directories written the way a plain open()/mkdir() would under the user's umask: a hidden temp directory
beside the destination (same filesystem, so the final rename is atomic) and modes fixed after writing (mkstemp,
mkdtemp and safetensors write 0600/0700; copy2 keeps a source file's mode), so another uid can read an export."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    umask = os.umask(0)  # os.umask can only be read by setting it; read per call, the caller may change it
    os.umask(umask)
    return umask


def temp_dir_beside(dest: Path) -> Path:
    """A fresh hidden directory next to `dest` (same filesystem, so renames are atomic), with the
    permissions a plain mkdir would give (mkdtemp's 0700 would otherwise become the output's)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def umask_modes(root: Path) -> None:
    """Give everything under `root` (and `root`) the mode open()/mkdir() would under the umask: safetensors
    writes 0600, mkstemp 0600, copy2 keeps a source file's mode; an export must be readable by others."""
    umask = _umask()
    for path in [root, *root.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
