"""The torch_npu 2.13.0 sources as data: found or fetched, never imported.

The Ascend pre-flight reads torch_npu's `.py` and `.yaml` files (torchair's GE converters, the kernel
schema yaml) with `ast` and plain text parsing. torch_npu itself must never be imported here: without
Ascend CANN, importing it breaks `import torch`. `torch_npu_sources()` finds a folder holding
`torch_npu/`, in this order:

1. the `wheel` argument (what `--torch-npu-wheel` gives): a `.whl` file, a folder that holds
   `torch_npu/`, or the `torch_npu` package folder itself;
2. `$GRAPHLLM_TORCH_NPU_WHEEL`, in the same forms;
3. an installed torch_npu, located with `importlib.util.find_spec` (for a top-level package that only
   searches `sys.path`; it runs none of the package's code);
4. torch_npu 2.13.0 fetched once with `pip download` (which never installs) into graphllm's cache.

A wheel is unpacked (its `.py` and `.yaml` members only) into `$GRAPHLLM_CACHE/npu-wheel/`: the
downloaded one into `torch_npu-2.13.0/`, a given one into `sources-<sha256 prefix>/`. Each tree is
built in a temp folder and `os.replace`d into place, so a crash never leaves half a tree under the real
name and two processes building it at once both end with the same complete tree. Every failure is a
`GraphllmError` whose one line names the input and the fix.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from graphllm.data.cache import TMP_MARKER, cache_dir
from graphllm.errors import GraphllmError

TORCH_NPU_VERSION = "2.13.0"
WHEEL_ENV = "GRAPHLLM_TORCH_NPU_WHEEL"
SCHEMA_YAML = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"
TORCHAIR_DIR = "torch_npu/dynamo/torchair"
VERSION_PY = "torch_npu/version.py"
# The x86_64 CPython 3.11 wheel, whatever machine runs this: the yaml and torchair sources are the
# same in every build, and pinning the platform makes every run parse the same files.
_PIP_PLATFORM = ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                 "--implementation", "cp", "--abi", "cp311")
_EXTRACT_SUFFIXES = (".py", ".yaml")
_MARKER = TORCHAIR_DIR + "/__init__.py"  # what makes a tree (or a wheel) torch_npu's sources
_FIX = "give the torch_npu 2.13.0 wheel file or its unpacked folder"


def torch_npu_sources(wheel: str | Path | None = None, *, flag: str = "--torch-npu-wheel") -> Path:
    """A folder that holds `torch_npu/` (its .py and .yaml files), found as the module docstring says.

    `flag` names the `wheel` argument in error lines (the CLI option it came from)."""
    if wheel is not None and str(wheel) != "":
        return _given_sources(Path(wheel), flag)
    env = os.environ.get(WHEEL_ENV)
    if env:
        return _given_sources(Path(env), f"${WHEEL_ENV}")
    installed = _installed_sources()
    if installed is not None:
        return installed
    return _downloaded_sources()


def _given_sources(path: Path, label: str) -> Path:
    """The sources a user pointed at: a wheel file (unpacked into the cache) or a folder."""
    path = path.expanduser()
    where = f"{label} {path}"
    if path.is_dir():
        if (path / _MARKER).is_file():
            return path.resolve()
        if path.name == "torch_npu" and (path.parent / _MARKER).is_file():  # the package folder itself
            return path.parent.resolve()
        raise GraphllmError(f"{where}: no {_MARKER} under this folder; {_FIX}")
    if not path.exists():
        raise GraphllmError(f"{where}: no such file or folder; {_FIX}")
    if not zipfile.is_zipfile(path):
        raise GraphllmError(f"{where}: not a wheel (not a zip file); {_FIX}")
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
    except (zipfile.BadZipFile, OSError) as exc:
        raise GraphllmError(f"{where}: cannot read it as a wheel ({exc}); {_FIX}") from exc
    if _MARKER not in names:
        raise GraphllmError(f"{where}: not a torch_npu wheel (no {TORCHAIR_DIR} in it); {_FIX}")
    stat = path.stat()
    final = cache_dir("npu-wheel") / f"sources-{_sha256(path.resolve(), stat.st_size, stat.st_mtime_ns)[:16]}"
    return _build_tree(final, lambda tmp: _extract_sources(path, tmp, where))


@functools.cache
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    """The file's sha256 (size and mtime are only part of the memo key: a rewritten file is hashed again)."""
    del size, mtime_ns
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _installed_sources() -> Path | None:
    """The installed torch_npu's folder parent, located without importing it; None if not installed."""
    try:
        spec = importlib.util.find_spec("torch_npu")  # top-level: searches sys.path, runs nothing
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(Path(spec.origin).parent)]
    for location in locations:
        parent = Path(location).parent
        if (parent / _MARKER).is_file():
            return parent.resolve()
    return None  # a torch_npu without torchair's sources: use the pinned download instead


def _downloaded_sources() -> Path:
    """torch_npu 2.13.0 from PyPI, unpacked once into `cache/npu-wheel/torch_npu-2.13.0/`."""
    base = cache_dir("npu-wheel")
    final = base / f"torch_npu-{TORCH_NPU_VERSION}"
    if (final / SCHEMA_YAML).is_file():
        return final
    wheel = _download_wheel(base / "wheels")
    return _build_tree(final, lambda tmp: _extract_sources(wheel, tmp, f"downloaded {wheel.name}"))


def _download_wheel(wheels: Path) -> Path:
    """The torch_npu wheel in `wheels`, fetched with `pip download` if not already there. Never installed."""
    pattern = f"torch_npu-{TORCH_NPU_VERSION}-*.whl"
    found = sorted(wheels.glob(pattern))
    if found:
        return found[-1]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *_PIP_PLATFORM,
           "--no-cache-dir", "--disable-pip-version-check", f"torch_npu=={TORCH_NPU_VERSION}", "-d", str(wheels)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        reason = next((line.strip() for line in reversed((proc.stderr or proc.stdout or "").splitlines())
                       if line.strip()), f"exit code {proc.returncode}")
        ok = proc.returncode == 0
    except OSError as exc:
        reason, ok = str(exc), False
    found = sorted(wheels.glob(pattern))
    if not ok or not found:
        raise GraphllmError(
            f"cannot read torch_npu {TORCH_NPU_VERSION}'s sources: `pip download torch_npu=={TORCH_NPU_VERSION}` "
            f"failed ({reason}); download the wheel where the network reaches PyPI and pass "
            f"--torch-npu-wheel PATH (or set ${WHEEL_ENV})")
    return found[-1]


def _extract_sources(wheel: Path, dest: Path, where: str) -> None:
    """Unzip only the `*.py` and `*.yaml` members of `wheel` into `dest` (no binaries: nothing here runs)."""
    root = dest.resolve()
    try:
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                if info.is_dir() or not info.filename.endswith(_EXTRACT_SUFFIXES):
                    continue
                target = (root / info.filename).resolve()
                if not target.is_relative_to(root):  # a hostile member name such as "../x.py"
                    raise GraphllmError(f"{where}: member {info.filename!r} escapes the unpack folder; {_FIX}")
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except zipfile.BadZipFile as exc:
        raise GraphllmError(f"{where}: cannot unpack it ({exc}); {_FIX}") from exc
    except OSError as exc:  # a full or read-only cache: say where, the wheel is fine
        raise GraphllmError(f"{where}: cannot unpack it into {dest.parent} ({exc.strerror}); free space there, "
                            f"set $GRAPHLLM_CACHE elsewhere, or pass the wheel's unpacked folder") from exc
    if not (root / _MARKER).is_file():
        raise GraphllmError(f"{where}: not a torch_npu wheel (no {TORCHAIR_DIR} in it); {_FIX}")


def _build_tree(final: Path, fill) -> Path:
    """`final`, built by `fill(tmp)` in a temp folder beside it and renamed into place, unless it exists."""
    if (final / _MARKER).is_file():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=final.name + TMP_MARKER, dir=final.parent))
    try:
        fill(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / _MARKER).is_file():  # not a concurrent builder that got there first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already if os.replace moved it
    return final


def sources_version(root: Path) -> str:
    """torch_npu's `__version__` from `torch_npu/version.py` (parsed, not imported); "unknown" if absent."""
    path = Path(root) / VERSION_PY
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return "unknown"
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__version__"
                                                 for t in node.targets)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            return node.value.value
    return "unknown"


@functools.cache
def sources_fingerprint(root: Path) -> str:
    """16 hex digits identifying the sources the pre-flight reads: a sha256 over the relative path and
    bytes of every torchair `.py` file and of the kernel schema yaml, in sorted order."""
    root = Path(root)
    files = sorted(p for p in (root / TORCHAIR_DIR).rglob("*.py") if p.is_file())
    if (root / SCHEMA_YAML).is_file():
        files.append(root / SCHEMA_YAML)
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root).as_posix().encode()
        data = path.read_bytes()
        digest.update(b"%d:%s%d:" % (len(rel), rel, len(data)))
        digest.update(data)
    return digest.hexdigest()[:16]


# --- op schemas -------------------------------------------------------------------------------------

_FUNC_LINE = re.compile(r"^(?:- |\s+)func:\s*(\S.*?)\s*$")  # "- func: ..." or "  func: ..."


def npu_schemas(root: Path | None = None) -> dict[str, str]:
    """Op name (overloads keep their full name, e.g. `npu_grouped_matmul.List`) -> schema string,
    e.g. `npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)`,
    from the schema yaml of `root` (default: `torch_npu_sources()`). Do not mutate the result."""
    return _schemas(Path(root) if root is not None else torch_npu_sources())


@functools.cache
def _schemas(root: Path) -> dict[str, str]:
    path = root / SCHEMA_YAML
    try:
        text = path.read_text()
    except OSError as exc:
        raise GraphllmError(f"{root}: cannot read {SCHEMA_YAML} ({exc.strerror}); {_FIX}") from exc
    schemas: dict[str, str] = {}
    for line in text.splitlines():
        m = _FUNC_LINE.match(line)
        if not m or "(" not in m.group(1):  # "- func: clone" style entries name an op, give no schema
            continue
        schema = m.group(1)
        name = schema.split("(", 1)[0].strip()
        if schemas.setdefault(name, schema) != schema:
            raise ValueError(f"{SCHEMA_YAML}: two schemas for {name}:\n{schemas[name]}\n{schema}")
    return schemas


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets and quotes (`int[2] k=[1, 1]`, `str mode="a,b"`)."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def schema_arg_names(schema: str) -> list[str]:
    """Argument names of `schema` in order, keyword-only ones (after `*`) included."""
    open_at = schema.index("(")
    depth = 0
    for close_at in range(open_at, len(schema)):
        depth += {"(": 1, ")": -1}.get(schema[close_at], 0)
        if depth == 0:
            break
    else:
        raise ValueError(f"unbalanced parentheses in schema {schema!r}")
    names = []
    for arg in _split_top_level(schema[open_at + 1:close_at]):
        if arg == "*":
            continue
        names.append(arg.split("=", 1)[0].split()[-1])  # "Tensor? pse=None" -> "pse"
    return names
