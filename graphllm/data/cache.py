"""Where built-in artifacts (corpus text, tokenizer, token ids) live, and how they are written.

The root is `$GRAPHLLM_CACHE` if set, else `~/.cache/graphllm`. Every artifact is written with
`atomic_write`: the bytes go to a temp file in the destination's folder, are flushed and fsynced, then
`os.replace`d onto the final name. A crash therefore leaves at most a stray `*.tmp-*` file, never a
half-written file under the real name; readers only ever look at real names. Two processes building
the same artifact at once both write complete files and the later `os.replace` wins harmlessly: the
builders are deterministic, so both files hold the same content.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from graphllm.errors import GraphllmError

ENV_VAR = "GRAPHLLM_CACHE"
TMP_MARKER = ".tmp-"  # temp files are named "<final name>.tmp-<random>"; never read as artifacts


def _file_mode() -> int:
    """0o666 less the umask: what open() would give. mkstemp makes 0o600, too strict for a shared cache."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()  # read once at import: os.umask can only be read by setting it


def cache_root() -> Path:
    """`$GRAPHLLM_CACHE` or `~/.cache/graphllm` (not created)."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "graphllm"


def cache_dir(*parts: str) -> Path:
    """`cache_root()/parts...`, created on demand."""
    path = cache_root().joinpath(*parts)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GraphllmError(
            f"cannot create cache folder {path}: {exc}; set ${ENV_VAR} to a writable folder") from exc
    return path


def atomic_write(path: Path | str, content: bytes | Callable[[Path], None]) -> Path:
    """Write `path` so that it either does not exist or is complete.

    `content` is the bytes to write, or a callback that writes the file at the temp path it is given
    (for writers that want a filename, such as `np.save` or sentencepiece). Returns `path`.
    """
    path = Path(path)
    tmp = write_temp(path, content)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_temp(path: Path | str, content: bytes | Callable[[Path], None]) -> Path:
    """`atomic_write`'s first half: `content` complete and fsynced in a temp file beside `path` (with
    the umask's mode), returned for the caller to `os.replace` onto `path`; on failure nothing is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + TMP_MARKER, dir=path.parent)
    tmp = Path(tmp_name)
    try:
        if isinstance(content, (bytes, bytearray, memoryview)):
            with os.fdopen(fd, "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
        else:
            os.close(fd)
            content(tmp)
            with open(tmp, "rb+") as f:  # fsync what the callback wrote before it becomes visible
                os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp
