"""The compiled kernels an artifact carries, so `graphllm run` starts without generating or compiling code.

`graphllm compile` (inductor) keeps, per rank, in compile_cache/rank<r>.bin:

- torch's portable compile cache (`torch.compiler.save_cache_artifacts`): inductor's FX graph cache entries,
  one per compiled forward/backward graph (its generated code and metadata). graphllm turns AOTAutograd's
  cache off (graphllm/backends.py), and inductor's autotune cache is for Triton only, so on CPU these are
  all torch records;
- the shared libraries that code loads: each graph's C++ kernels, and inductor's ISA probe libraries
  (`__avx_chk_kernel` and friends, built once per cache directory to pick the vector ISA: ~2 s each).

`graphllm run` puts them into this machine's inductor cache (`TORCHINDUCTOR_CACHE_DIR`) before compiling,
so inductor finds every graph in its cache and loads the kernels instead of generating and compiling C++.
The code is the code inductor compiled at `graphllm compile`, so the losses are bitwise the same.

A blob is valid for one graph, one torch and one CPU instruction set: its key holds the rank's model graph
hash, torch's version and the machine's ISA (torch's CPU capability and the CPU flags inductor's codegen
looks at). Any difference, or a blob that is truncated or altered (its sha256 no longer matches), gives one
line naming what differed and a normal compile. Nothing reaches the local cache before the checksum passed;
files go in under a temporary name and are renamed, and files already there are left alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import platform
import re
import tempfile
import types
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch

logger = logging.getLogger("graphllm")

CACHE_DIR = "compile_cache"
"""The artifact's folder of compile caches, one file per rank."""
MAGIC = b"graphllm-compile-cache 1\n"
TORCH_CACHE = "torch_cache.bin"
"""The zip member holding torch.compiler.save_cache_artifacts()'s bytes; kernels are under `libs/`."""
DISABLE_ENV = "GRAPHLLM_NO_COMPILE_CACHE"
"""Set to 1 to compile as if the artifact held no cache (what `graphllm run --no-compile-cache` sets)."""
ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "avx_vnni", "asimd", "sve")
"""CPU flags inductor's C++ codegen can use (vector ISA, bf16/fp16 conversions, AMX), from /proc/cpuinfo."""
_LIB_NAME = re.compile(r"[a-z0-9_]{2}/[A-Za-z0-9_.]+\.so")
"""Where inductor keeps a compiled library, relative to its cache dir: <2 chars of the key>/<key>[.main].so."""


def rank_file(root: Path, rank: int) -> Path:
    return root / CACHE_DIR / f"rank{rank}.bin"


def machine_isa() -> str:
    """`x86_64 AVX512 avx avx2 avx512f ...`: the architecture, torch's CPU capability and the ISA_FLAGS present."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = set(line.partition(":")[2].split())
                break
    return " ".join([platform.machine(), torch.backends.cpu.get_cpu_capability(),
                     *[f for f in ISA_FLAGS if f in flags]])


def cache_key(graph_hash: str) -> dict[str, str]:
    """What a stored cache is valid for: the rank's model graph, this torch, this CPU's instruction set."""
    return {"graph": graph_hash, "torch": torch.__version__, "isa": machine_isa()}


def inductor_cache_dir() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


@contextlib.contextmanager
def recording() -> Iterator[None]:
    """Collect, from here on, the cache entries torch's compiles create or hit (torch's mega-cache), apart
    from whatever this process compiled before."""
    from torch.compiler._cache import CacheArtifactManager

    with CacheArtifactManager.with_fresh_cache():
        yield


def library_paths(compiled: Any) -> list[str]:
    """The shared libraries a graph compiled by inductor (compile_fx_inner's result) calls: its C++ kernels,
    found as the extension modules of the functions in its generated module."""
    call = getattr(compiled, "current_callable", None)
    names = getattr(call, "__globals__", None) or {}
    paths = []
    for value in names.values():
        module = getattr(value, "__self__", None)
        path = getattr(module, "__file__", None) if isinstance(module, types.ModuleType) else None
        if isinstance(path, str) and path.endswith(".so"):
            paths.append(path)
    return paths


def _isa_probes(cache: Path) -> list[Path]:
    """Inductor's ISA probe libraries in `cache` (their sources define `__<isa>_chk_kernel`)."""
    probes = []
    for so in cache.glob("*/*.so"):
        cpp = so.with_suffix(".cpp")
        with contextlib.suppress(OSError):  # a probe's source is a few hundred bytes; kernels' are far longer
            if cpp.stat().st_size < 4096 and "_chk_kernel" in cpp.read_text(errors="replace"):
                probes.append(so)
    return probes


def store(path: Path, key: dict[str, str], libraries: list[str]) -> dict[str, int] | None:
    """Write what this process compiled since `recording()` began, and `libraries` with the ISA probes, to
    `path` (atomically). Returns counts and bytes, or None when torch recorded nothing (e.g. its FX graph
    cache is off)."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return None
    cache = inductor_cache_dir().resolve()
    libs = {}
    for lib in [*map(Path, libraries), *_isa_probes(cache)]:
        with contextlib.suppress(ValueError):
            rel = lib.resolve().relative_to(cache).as_posix()
            if _LIB_NAME.fullmatch(rel) and lib.is_file():
                libs[rel] = lib
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        z.writestr(TORCH_CACHE, saved[0])
        for rel, lib in sorted(libs.items()):
            z.write(lib, f"libs/{rel}")
    payload = buf.getvalue()
    header = {"key": key, "sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload),
              "graphs": len(saved[1].inductor_artifacts), "libraries": len(libs)}
    _write_atomic(path, MAGIC + json.dumps(header).encode() + b"\n" + payload)
    return {"graphs": header["graphs"], "libraries": len(libs), "bytes": path.stat().st_size}


def disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "") not in ("", "0")


def load(path: Path, key: dict[str, str], *, what: str) -> str | None:
    """Put the cache stored at `path` into this machine's inductor cache when its key equals `key`.
    Returns None when loaded, else the one line saying why this run compiles instead (`what` names the blob,
    e.g. "rank0"). Never raises for a missing, foreign or damaged blob."""
    try:
        blob = path.read_bytes()
    except OSError as e:
        return f"{what}: no compile cache in the artifact ({e.__class__.__name__}); compiling"
    try:
        header, payload = _parse(blob)
    except ValueError as e:
        return f"{what}: compile cache {path} is damaged ({e}); compiling"
    stored = header.get("key") or {}
    for name in key:
        if stored.get(name) != key[name]:
            return (f"{what}: compile cache is for another {name} (stored {stored.get(name)!r}, this run "
                    f"{key[name]!r}); compiling")
    from torch.compiler._cache import CacheArtifactManager

    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as z:
            files = {n: z.read(n) for n in z.namelist()}
        entries = CacheArtifactManager.deserialize(files.pop(TORCH_CACHE, b""))
        if not entries:
            raise ValueError("torch could not read its cache entries")
    except (zipfile.BadZipFile, ValueError, EOFError) as e:
        return f"{what}: compile cache {path} is damaged ({e}); compiling"
    cache = inductor_cache_dir()
    try:
        CacheArtifactManager.populate_caches(entries)  # inductor's FX graph cache entries
        for name, data in files.items():
            rel = name.removeprefix("libs/")
            if name.startswith("libs/") and _LIB_NAME.fullmatch(rel) and not (cache / rel).exists():
                _write_atomic(cache / rel, data)
    except OSError as e:  # what went in is whole (written then renamed); what did not, inductor compiles
        return f"{what}: could not write the compile cache into {cache} ({e}); compiling"
    return None


def _parse(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, payload) of a blob, checked: magic, header, length and sha256."""
    if not blob.startswith(MAGIC):
        raise ValueError("not a graphllm compile cache")
    line, sep, payload = blob[len(MAGIC):].partition(b"\n")
    try:
        header = json.loads(line) if sep else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise ValueError("unreadable header")
    if len(payload) != header.get("bytes") or hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise ValueError(f"{len(payload)} bytes whose sha256 does not match the header's")
    return header, payload


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o755 if path.suffix == ".so" else 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
