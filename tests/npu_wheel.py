"""The torch_npu 2.13.0 wheel as data: its op schemas and its torchair API, read without importing it.

graphllm's Ascend backend lowers ops to torch_npu kernels and configures torchair, but no NPU exists
in CI and torch_npu must never be imported or installed there (installed without Ascend CANN it breaks
`import torch`). So the contract tests download the wheel once with pip (`pip download` only fetches
the file), unzip just its `*.py` and `*.yaml` files into the graphllm cache, and parse them:

- `npu_schemas()`: kernel name -> schema, from `torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml`;
- `schema_arg_names(schema)`: the argument names of one schema, keyword-only ones included;
- `compiler_config_fields()`: every dotted attribute path on `torchair.CompilerConfig()`, from an `ast`
  walk of `torch_npu/dynamo/torchair/configs/*.py`;
- `torchair_exports()`: the names `torch_npu/dynamo/torchair/__init__.py` defines or imports.

The extracted tree is `$GRAPHLLM_CACHE/npu-wheel/torch_npu-2.13.0/` (default cache `~/.cache/graphllm`).
It is built in a temp folder beside it and `os.replace`d into place, so a crash never leaves a half
tree under the real name, and two processes building it at once both end with the same complete tree.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from graphllm.data.cache import TMP_MARKER, cache_dir

TORCH_NPU_VERSION = "2.13.0"
# The x86_64 CPython 3.11 wheel, whatever machine runs the tests: the yaml and torchair sources are
# the same in every build, and pinning the platform makes every run parse the same files.
_PIP_PLATFORM = ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                 "--implementation", "cp", "--abi", "cp311")
_EXTRACT_SUFFIXES = (".py", ".yaml")
SCHEMA_YAML = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"
TORCHAIR_DIR = "torch_npu/dynamo/torchair"
_TORCHAIR_PACKAGE = "torchair"  # torchair's sources import themselves as `torchair.*`


def _download_wheel(wheels: Path) -> Path:
    """The torch_npu wheel in `wheels`, fetched with `pip download` if not already there. Never installed."""
    pattern = f"torch_npu-{TORCH_NPU_VERSION}-*.whl"
    found = sorted(wheels.glob(pattern))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               *_PIP_PLATFORM, "--no-cache-dir", "--disable-pip-version-check",
               f"torch_npu=={TORCH_NPU_VERSION}", "-d", str(wheels)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        found = sorted(wheels.glob(pattern))
        if proc.returncode != 0 or not found:
            raise RuntimeError(f"could not download torch_npu=={TORCH_NPU_VERSION} "
                               f"(exit {proc.returncode}): {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    return found[-1]


def _extract_sources(wheel: Path, dest: Path) -> None:
    """Unzip only the `*.py` and `*.yaml` members of `wheel` into `dest` (no binaries: nothing here runs)."""
    root = dest.resolve()
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.is_dir() or not info.filename.endswith(_EXTRACT_SUFFIXES):
                continue
            target = (root / info.filename).resolve()
            if not target.is_relative_to(root):  # a hostile member name such as "../x.py"
                raise RuntimeError(f"{wheel.name}: member {info.filename!r} escapes the extract folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)


@functools.cache
def npu_wheel_root() -> Path:
    """The folder holding the extracted wheel's `torch_npu/` (only its .py and .yaml files)."""
    base = cache_dir("npu-wheel")
    final = base / f"torch_npu-{TORCH_NPU_VERSION}"
    if (final / SCHEMA_YAML).is_file():
        return final
    wheel = _download_wheel(base / "wheels")
    tmp = Path(tempfile.mkdtemp(prefix=final.name + TMP_MARKER, dir=base))
    try:
        _extract_sources(wheel, tmp)
        if not (tmp / SCHEMA_YAML).is_file():
            raise RuntimeError(f"{wheel.name} has no {SCHEMA_YAML}")
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / SCHEMA_YAML).is_file():  # not a concurrent builder that got there first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already if os.replace moved it
    return final


# --- op schemas -------------------------------------------------------------------------------------

_FUNC_LINE = re.compile(r"^(?:- |\s+)func:\s*(\S.*?)\s*$")  # "- func: ..." or "  func: ..."


@functools.cache
def npu_schemas() -> dict[str, str]:
    """Op name (overloads keep their full name, e.g. `npu_grouped_matmul.List`) -> schema string,
    e.g. `npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)`."""
    schemas: dict[str, str] = {}
    for line in (npu_wheel_root() / SCHEMA_YAML).read_text().splitlines():
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


# --- torchair ---------------------------------------------------------------------------------------

def _configs_modules() -> dict[str, ast.Module]:
    """`torchair.configs.<stem>` -> parsed source, for every file in torchair/configs/."""
    folder = npu_wheel_root() / TORCHAIR_DIR / "configs"
    return {f"{_TORCHAIR_PACKAGE}.configs.{p.stem}": ast.parse(p.read_text(), filename=str(p))
            for p in sorted(folder.glob("*.py")) if p.stem != "__init__"}


def _absolute_module(current: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = current.rsplit(".", node.level)[0]
    return f"{package}.{node.module}" if node.module else package


class _ConfigClasses:
    """The classes of torchair/configs/*.py, resolved by (module, name): two files both define a
    `_ExperimentalConfig` (the experimental options and `export.experimental`), so names alone are ambiguous."""

    def __init__(self, modules: dict[str, ast.Module]):
        self.classes: dict[tuple[str, str], ast.ClassDef] = {}
        self.scopes: dict[str, dict[str, tuple[str, str]]] = {}  # module -> name -> class key
        for mod, tree in modules.items():
            scope = self.scopes.setdefault(mod, {})
            for node in tree.body:
                if isinstance(node, ast.ClassDef):
                    self.classes[(mod, node.name)] = node
                    scope[node.name] = (mod, node.name)
                elif isinstance(node, ast.ImportFrom):
                    source = _absolute_module(mod, node)
                    for alias in node.names:
                        scope[alias.asname or alias.name] = (source, alias.name)

    def resolve(self, mod: str, expr: ast.expr) -> tuple[str, str] | None:
        """The class key a `Name` in module `mod` refers to, if it is a class of the configs package."""
        if not isinstance(expr, ast.Name):
            return None
        key = self.scopes.get(mod, {}).get(expr.id)
        return key if key in self.classes else None

    def bases(self, key: tuple[str, str]) -> list[tuple[str, str]]:
        found = (self.resolve(key[0], b) for b in self.classes[key].bases)
        return [b for b in found if b is not None]

    def is_option_value(self, key: tuple[str, str]) -> bool:
        """OptionValue and its subclasses are leaves (`mode`), not nested config objects."""
        return key[1] == "OptionValue" or any(self.is_option_value(b) for b in self.bases(key))

    def members(self, key: tuple[str, str]) -> dict[str, ast.expr | None]:
        """Attribute name -> assigned value (None for properties) on an instance of the class: base
        classes' members first, then class-level variables, properties and `self.x = ...` in `__init__`."""
        members: dict[str, ast.expr | None] = {}
        for base in self.bases(key):
            members.update(self.members(base))
        for node in self.classes[key].body:
            if isinstance(node, ast.Assign):
                members.update({t.id: node.value for t in node.targets if isinstance(t, ast.Name)})
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                members[node.target.id] = node.value
            elif isinstance(node, ast.FunctionDef):
                if any(isinstance(d, ast.Name) and d.id == "property" for d in node.decorator_list):
                    members[node.name] = None
                elif node.name == "__init__":
                    for stmt in ast.walk(node):
                        targets = (stmt.targets if isinstance(stmt, ast.Assign)
                                   else [stmt.target] if isinstance(stmt, ast.AnnAssign) else [])
                        for t in targets:
                            if (isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                                    and t.value.id == "self"):
                                members[t.attr] = stmt.value
        return members

    def paths(self, key: tuple[str, str], prefix: str = "", seen: frozenset = frozenset()) -> set[str]:
        out: set[str] = set()
        for name, value in self.members(key).items():
            path = prefix + name
            out.add(path)
            child = self.resolve(key[0], value.func) if isinstance(value, ast.Call) else None
            if child is not None and not self.is_option_value(child) and child not in seen:
                out |= self.paths(child, path + ".", seen | {key})
        return out


@functools.cache
def compiler_config_fields() -> frozenset[str]:
    """Every dotted attribute path on `torchair.CompilerConfig()`, e.g. `mode`, `debug.graph_dump.type`,
    `experimental_config.frozen_parameter`: nested config objects are followed, option values
    (`OptionValue` and subclasses) are leaves."""
    classes = _ConfigClasses(_configs_modules())
    key = (f"{_TORCHAIR_PACKAGE}.configs.compiler_config", "CompilerConfig")
    if key not in classes.classes:
        raise ValueError(f"no class CompilerConfig in {TORCHAIR_DIR}/configs/compiler_config.py")
    return frozenset(classes.paths(key))


def _bound_names(body: list[ast.stmt], package: str) -> set[str]:
    """Names a module body binds at import time (descending into if/try/with, not into defs)."""
    names: set[str] = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                names.add(alias.asname or alias.name.split(".")[0])
                parts = alias.name.split(".")
                if parts[0] == package and len(parts) > 1:  # `import torchair.ops` sets attribute `ops`
                    names.add(parts[1])
        elif isinstance(node, ast.ImportFrom):
            names.update(alias.asname or alias.name for alias in node.names if alias.name != "*")
            parts = _absolute_module(package + ".__init__", node).split(".")
            if parts[0] == package and len(parts) > 1:  # importing a submodule makes it an attribute
                names.add(parts[1])
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for block in ("body", "orelse", "finalbody"):
                names |= _bound_names(getattr(node, block, []), package)
            for handler in getattr(node, "handlers", []):
                names |= _bound_names(handler.body, package)
    return names


def _all_list(tree: ast.Module) -> list[str]:
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__"
                                                 for t in node.targets)):
            return list(ast.literal_eval(node.value))
    return []


@functools.cache
def torchair_exports() -> frozenset[str]:
    """Names `torchair/__init__.py` defines or imports (`CompilerConfig`, `get_compiler`, ...) plus `__all__`."""
    path = npu_wheel_root() / TORCHAIR_DIR / "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    return frozenset(_bound_names(tree.body, _TORCHAIR_PACKAGE) | set(_all_list(tree)))
