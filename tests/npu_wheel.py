"""The torch_npu 2.13.0 wheel as data for the contract tests: its op schemas and its torchair API, read
without importing it (installed without Ascend CANN, torch_npu breaks `import torch`).

Where the sources come from (an explicit wheel, `$GRAPHLLM_TORCH_NPU_WHEEL`, an installed torch_npu, or
torch_npu 2.13.0 downloaded once into `$GRAPHLLM_CACHE/npu-wheel/`) and the schema parsing live in
graphllm.preflight.wheel, which the product's Ascend pre-flight uses too; this module re-exports them:

- `npu_wheel_root()`: the folder holding the sources' `torch_npu/` (`torch_npu_sources()`);
- `npu_schemas()`: kernel name -> schema, from `torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml`;
- `schema_arg_names(schema)`: the argument names of one schema, keyword-only ones included;

and adds two readers only tests need:

- `compiler_config_fields()`: every dotted attribute path on `torchair.CompilerConfig()`, from an `ast`
  walk of `torch_npu/dynamo/torchair/configs/*.py`;
- `torchair_exports()`: the names `torch_npu/dynamo/torchair/__init__.py` defines or imports.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

from graphllm.preflight.wheel import (SCHEMA_YAML, TORCH_NPU_VERSION, TORCHAIR_DIR, npu_schemas, schema_arg_names,
                                      torch_npu_sources)

__all__ = ["SCHEMA_YAML", "TORCH_NPU_VERSION", "TORCHAIR_DIR", "compiler_config_fields", "npu_schemas",
           "npu_wheel_root", "schema_arg_names", "torchair_exports"]

_TORCHAIR_PACKAGE = "torchair"  # torchair's sources import themselves as `torchair.*`


def npu_wheel_root() -> Path:
    """The folder holding the torch_npu sources' `torch_npu/` (only its .py and .yaml files)."""
    return torch_npu_sources()


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
