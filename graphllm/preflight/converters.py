"""torchair's GE converters, indexed from the torch_npu sources with `ast` (torch_npu is never imported).

torchair turns each FX node into Ascend GE IR through the converter registered for its op with
`@register_fx_node_ge_converter(torch.ops.aten.add.Tensor)`, maybe under `@declare_supported([Support(
F32(2, 2), F16(2, 1)), ...])`. As torchair's `fx_summary.py` does, a converter is `implemented` (no
`raise NotImplementedError`), `partial` (raises NotImplementedError on some path only) or a `stub`
(every path raises; docstrings aside). Many registered converters are stubs.

Only files torchair imports register anything. `imported_modules` follows statically what runs on
`import torchair` (module bodies; functions they call at import, one call deep; `from pkg import *` and
`importlib.import_module` loops over a pkgutil-built `__all__`) and on a converter lookup
(`fx2ge_converter._get_converter` imports the `custom` package).

Keys are the op as `str(OpOverload)` prints it (`aten.add.Tensor`); a registration on a packet
(`torch.ops.npu.npu_foo`) is keyed `npu.npu_foo`, so use `lookup` (the overload, then its packet);
Python callables are keyed by their dotted name as written (`operator.add`). Registrations whose target
is computed at run time are listed in `ConverterIndex.unparsed`, not indexed. The index is cached as
JSON per sources fingerprint in `$GRAPHLLM_CACHE/npu-wheel/`; a corrupt cache file is rebuilt.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from graphllm.data.cache import cache_dir, write_temp
from graphllm.preflight.wheel import TORCHAIR_DIR, sources_fingerprint, torch_npu_sources

Status = Literal["implemented", "partial", "stub"]
STATUSES: tuple[Status, ...] = ("implemented", "partial", "stub")
_FORMAT = 1  # bump when the index's content or meaning changes: old cache files are then ignored
_PKG = "torchair"  # torchair's sources import themselves as `torchair.*`
_GE_DIR = "_ge_concrete_graph"
_REGISTER, _DECLARE = "register_fx_node_ge_converter", "declare_supported"
# functions torchair runs on every node it converts (their imports count as done)
_LOOKUP_ROOTS = (("torchair._ge_concrete_graph.fx2ge_converter", "_get_converter"),)
# supported_declaration.py's tensor helpers (`F32(2, 2)`); `T(v, dtype=torch.int64)` is read from its dtype
_DTYPE_HELPERS = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
                  "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "C64": "complex64", "BOOL": "bool"}


@dataclass(frozen=True, slots=True)
class Converter:
    """One registered GE converter."""
    op: str            # "aten.add.Tensor", "npu.npu_rms_norm.default", "_c10d_functional.all_reduce.default"
    status: Status
    where: str         # its def: "ge_converter/aten/add.py:15" (under _ge_concrete_graph/), else "torchair/x.py:9"
    dtypes: tuple[str, ...] = ()   # dtypes in its declare_supported cases, sorted; () when none declared
    unsupported: tuple[str, ...] = ()  # partial only: "<condition>: <message>" of each NotImplementedError raise


class ConverterIndex(dict):
    """op -> Converter (do not mutate), plus what could not be indexed:
    `unparsed`: "file:line: target" of registrations whose target is computed at run time;
    `unimported`: files that register converters but that torchair never imports."""

    def __init__(self, items=(), unparsed=(), unimported=()):
        super().__init__(items)
        self.unparsed: tuple[str, ...] = tuple(unparsed)
        self.unimported: tuple[str, ...] = tuple(unimported)


def lookup(index: dict[str, Converter], op: str) -> Converter | None:
    """The converter for `op` ("npu.npu_rms_norm.default"): the overload's own, else its packet's."""
    found = index.get(op)
    if found is None and op.count(".") >= 2:
        found = index.get(op.rsplit(".", 1)[0])
    return found


def index_summary(index: ConverterIndex) -> dict[str, int]:
    """Counts: `total` and per status, the same for the `aten` namespace (`aten`, `aten_stub`, ...), `npu`
    (torch_npu's custom ops), `unparsed` registrations and `unimported` converter files."""
    counts = Counter({key: 0 for key in ("total", *STATUSES, "aten", *(f"aten_{s}" for s in STATUSES), "npu")})
    for conv in index.values():
        namespace = conv.op.split(".", 1)[0]
        counts.update(["total", conv.status] + ([namespace] if namespace in ("aten", "npu") else [])
                      + ([f"aten_{conv.status}"] if namespace == "aten" else []))
    return dict(counts, unparsed=len(getattr(index, "unparsed", ())), unimported=len(getattr(index, "unimported", ())))


def converter_index(root: Path | None = None) -> ConverterIndex:
    """Every GE converter torchair registers in the sources at `root` (default `torch_npu_sources()`)."""
    return _cached_index(Path(root).resolve() if root is not None else torch_npu_sources())


@functools.cache
def _cached_index(root: Path) -> ConverterIndex:
    try:
        path = cache_dir("npu-wheel") / f"converters-v{_FORMAT}-{sources_fingerprint(root)}.json"
        data = json.loads(path.read_text())
        convs = [Converter(**{k: tuple(v) if isinstance(v, list) else v for k, v in c.items()})
                 for c in data["converters"]]
        if all(c.status in STATUSES for c in convs):
            return ConverterIndex(((c.op, c) for c in convs), data["unparsed"], data["unimported"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # absent, corrupt or unreadable (cache_dir's GraphllmError is a ValueError): rebuild
    index = build_index(root)
    data = {"format": _FORMAT, "converters": [dataclasses.asdict(c) for c in index.values()],
            "unparsed": list(index.unparsed), "unimported": list(index.unimported)}
    try:
        path = cache_dir("npu-wheel") / f"converters-v{_FORMAT}-{sources_fingerprint(root)}.json"
        os.replace(write_temp(path, json.dumps(data, indent=0).encode()), path)
    except (OSError, ValueError):
        pass  # an unwritable cache only costs a rebuild next time
    return index


def build_index(root: Path) -> ConverterIndex:
    """The index, parsed afresh (no caches): see the module docstring."""
    sources = _Sources(Path(root) / TORCHAIR_DIR)
    imported = imported_modules(sources)
    found: dict[str, Converter] = {}
    unparsed: list[str] = []
    unimported: list[str] = []
    for module in sources.all_modules():
        tree = sources.tree(module) if _REGISTER + "(" in sources.file(module).read_text() else None
        if tree is None or not any(_is_call_to(n, _REGISTER) for n in ast.walk(tree)):
            continue
        where = sources.where(module)
        if module not in imported:
            unimported.append(where)
            continue
        for conv in _module_converters(tree, where, unparsed):
            found[conv.op] = conv  # a later registration replaces an earlier one, as in torchair
    return ConverterIndex(sorted(found.items()), unparsed, unimported)


# --- torchair's sources and what importing it runs --------------------------------------------------

class _Sources:
    """torchair's modules (`torchair.a.b`) and their parsed files."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._trees: dict[str, ast.Module | None] = {}
        self._bindings: dict[str, dict[str, tuple[str, str]]] = {}

    def file(self, module: str) -> Path | None:
        rel = self.folder.joinpath(*module.split(".")[1:])
        if (rel / "__init__.py").is_file():
            return rel / "__init__.py"
        return rel.with_suffix(".py") if module != _PKG and rel.with_suffix(".py").is_file() else None

    def is_package(self, module: str) -> bool:
        return (path := self.file(module)) is not None and path.name == "__init__.py"

    def all_modules(self) -> list[str]:
        parts = (p.relative_to(self.folder).with_suffix("").parts for p in sorted(self.folder.rglob("*.py")))
        return [".".join((_PKG, *(p[:-1] if p[-1] == "__init__" else p))) for p in parts]

    def submodules(self, package: str) -> list[str]:
        """What `pkgutil.iter_modules` lists in the package's folder: .py files and folders with an __init__."""
        folder = self.file(package).parent
        return sorted(f"{package}.{p.stem if p.suffix else p.name}" for p in folder.iterdir()
                      if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file())

    def tree(self, module: str) -> ast.Module | None:
        if module not in self._trees:
            path = self.file(module)
            try:
                self._trees[module] = ast.parse(path.read_text(), filename=str(path)) if path else None
            except (OSError, SyntaxError, ValueError):
                self._trees[module] = None
        return self._trees[module]

    def where(self, module: str) -> str:
        rel = self.file(module).relative_to(self.folder).as_posix()
        return rel.removeprefix(_GE_DIR + "/") if rel.startswith(_GE_DIR + "/") else f"{_PKG}/{rel}"

    def lists_all_submodules(self, package: str) -> bool:
        """Whether the package's `__all__` is built with pkgutil.iter_modules (every submodule's name)."""
        tree = self.tree(package) if self.is_package(package) else None
        return tree is not None and any(
            isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)
            and "iter_modules" in ast.unparse(n.value) for n in tree.body)

    def bindings(self, module: str) -> dict[str, tuple[str, str]]:
        """Name -> (module, name) for the module's own defs and the names it imports with `from x import`."""
        if module not in self._bindings:
            nodes = list(ast.walk(self.tree(module))) if self.tree(module) else []
            found = {a.asname or a.name: (self.absolute(module, n), a.name)
                     for n in nodes if isinstance(n, ast.ImportFrom) for a in n.names}
            found.update({n.name: (module, n.name) for n in self.tree(module).body if isinstance(n, ast.FunctionDef)}
                         if nodes else {})
            self._bindings[module] = found
        return self._bindings[module]

    def absolute(self, module: str, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        package = module if self.is_package(module) else module.rsplit(".", 1)[0]
        package = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        return f"{package}.{node.module}" if node.module else package


def _import_time_nodes(nodes):
    """Nodes a module body runs when imported, in order: all but the insides of functions and lambdas."""
    for node in nodes:
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _import_time_nodes(ast.iter_child_nodes(node))


def _is_call_to(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Call) and (
        (isinstance(node.func, ast.Name) and node.func.id == name)
        or (isinstance(node.func, ast.Attribute) and node.func.attr == name))


def imported_modules(sources: _Sources) -> set[str]:
    """torchair modules that `import torchair` and converter lookups import (see the module docstring)."""
    seen: set[str] = set()
    ran: set[tuple[str, str]] = set()

    def load(module: str, *, everything: bool = False) -> None:
        """Import `module` (parents first); `everything`: also each name of a pkgutil-built `__all__`."""
        if module not in seen and module.startswith(_PKG) and sources.file(module) is not None:
            parts = module.split(".")
            for i in range(1, len(parts)):
                load(".".join(parts[:i]))
            seen.add(module)
            visit(module, list(_import_time_nodes(sources.tree(module).body if sources.tree(module) else [])))
        for sub in sources.submodules(module) if everything and sources.lists_all_submodules(module) else ():
            load(sub)

    def run(module: str, name: str) -> None:
        """Run function `name` of `module`: its own import statements (one call deep)."""
        fn = _function(sources.tree(module), name)
        if fn is not None and (module, name) not in ran:
            ran.add((module, name))
            visit(module, [n for n in ast.walk(fn) if not isinstance(n, ast.Call)])

    def visit(module: str, nodes: list[ast.AST]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    load(alias.name)
            elif isinstance(node, ast.ImportFrom):
                base = sources.absolute(module, node)
                load(base, everything=any(alias.name == "*" for alias in node.names))
                for alias in node.names:
                    load(f"{base}.{alias.name}")
            elif isinstance(node, ast.Call) and _is_call_to(node, "import_module"):
                load(module, everything=True)  # a loop over a pkgutil-built __all__ (custom/, lite/)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                target = sources.bindings(module).get(node.func.id)  # a torchair function run at import
                fn = _function(sources.tree(target[0]), target[1]) if target else None
                if fn is None:
                    continue
                run(*target)
                if target[0] == module and any(_is_call_to(n, "import_module") for n in ast.walk(fn)):
                    # `try_import_submodule("aten")`: that subpackage and its pkgutil-built __all__
                    package = module if sources.is_package(module) else module.rsplit(".", 1)[0]
                    for arg in node.args:
                        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                            load(f"{package}.{arg.value}", everything=True)

    load(_PKG)
    for module, name in _LOOKUP_ROOTS:
        load(module)
        run(module, name)
    return seen


def _function(tree: ast.Module | None, name: str) -> ast.FunctionDef | None:
    """The module-level `def name` of `tree`."""
    return next((n for n in (tree.body if tree else ()) if isinstance(n, ast.FunctionDef) and n.name == name), None)


# --- one module's converters ------------------------------------------------------------------------

def _module_converters(tree: ast.Module, where: str, unparsed: list[str]):
    """The converters a module registers: `@register_fx_node_ge_converter(op)` decorators (several per
    function allowed; `@declare_supported` applies to the registration right below it) and
    `register_fx_node_ge_converter(op)(fn)` calls. Unresolvable targets go to `unparsed`."""
    defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    functions = {fn.name: fn for fn in defs}  # for `register(op)(name)`: the last def of that name
    used: set[int] = set()
    chains = [(fn, fn.decorator_list) for fn in defs]
    for node in ast.walk(tree):  # `register_fx_node_ge_converter(op)(fn)`, maybe under declare_supported(...)(...)
        if isinstance(node, (ast.Assign, ast.Expr)) and isinstance(node.value, ast.Call):
            wrappers, inner = [], node.value
            while (isinstance(inner, ast.Call) and len(inner.args) == 1
                   and (_is_call_to(inner.func, _REGISTER) or _is_call_to(inner.func, _DECLARE))):
                wrappers.append(inner.func)
                inner = inner.args[0]
            if wrappers and isinstance(inner, ast.Name) and inner.id in functions:
                chains.append((functions[inner.id], wrappers))  # outermost first, as decorators are listed
    for fn, decorators in chains:
        status, unsupported = _classify(fn)
        registered: list[list] = []  # [op, dtypes] per registration, bottom-up
        for dec in reversed(decorators):
            if _is_call_to(dec, _REGISTER) and dec.args:
                used.add(id(dec))
                op = _op_key(dec.args[0], tree)
                if op is None:
                    unparsed.append(f"{where}:{dec.lineno}: {ast.unparse(dec.args[0])}")
                registered.append([op, ()])
            elif _is_call_to(dec, _DECLARE) and registered:
                registered[-1][1] = _declared_dtypes(dec)
        for op, dtypes in registered:
            if op is not None:
                yield Converter(op, status, f"{where}:{fn.lineno}", dtypes,
                                unsupported if status == "partial" else ())
    for node in ast.walk(tree):  # registrations neither pattern covers (a converter factory, ...)
        if _is_call_to(node, _REGISTER) and id(node) not in used and node.args:
            unparsed.append(f"{where}:{node.lineno}: {ast.unparse(node.args[0])}")


def _op_key(target: ast.expr, tree: ast.Module) -> str | None:
    """"aten.add.Tensor" for `torch.ops.aten.add.Tensor`; "aten.rand.names" for
    `getattr(torch.ops.aten.rand, 'names', None)`; "operator.add"; a name imported with
    `from torch import sym_sqrt` -> "torch.sym_sqrt"; None when computed at run time."""
    if (isinstance(target, ast.Call) and isinstance(target.func, ast.Name) and target.func.id == "getattr"
            and len(target.args) >= 2 and isinstance(target.args[1], ast.Constant)):
        base = _op_key(target.args[0], tree)
        return f"{base}.{target.args[1].value}" if base else None
    if isinstance(target, ast.Name):
        imports = (n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level)
        return next((f"{n.module}.{a.name}" for n in imports for a in n.names if (a.asname or a.name) == target.id),
                    None)
    parts = []
    while isinstance(target, ast.Attribute):
        parts.append(target.attr)
        target = target.value
    if not isinstance(target, ast.Name) or not parts:
        return None
    dotted = ".".join([target.id, *reversed(parts)])
    return dotted.removeprefix("torch.ops.") if dotted.startswith("torch.ops.") else dotted


def _classify(fn: ast.FunctionDef) -> tuple[Status, tuple[str, ...]]:
    """(status, "<condition>: <message>" per guarded NotImplementedError) of one converter function."""
    body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    raises: list[str] = []
    returns = False

    def walk(stmts: list[ast.stmt], guards: tuple[str, ...]) -> None:
        nonlocal returns
        for stmt in stmts:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(stmt, ast.Return):
                returns = True
            elif isinstance(stmt, ast.Raise) and ast.unparse(stmt.exc or ast.Pass()).startswith("NotImplementedError"):
                args = stmt.exc.args if isinstance(stmt.exc, ast.Call) else []
                text = " ".join("".join(a.value if isinstance(a, ast.Constant) and isinstance(a.value, str) else
                                        ast.unparse(a) if isinstance(a, ast.JoinedStr) else "" for a in args).split())
                raises.append(": ".join(p for p in (" and ".join(guards), text) if p))
            elif isinstance(stmt, ast.If):
                test = ast.unparse(stmt.test)
                walk(stmt.body, guards + (test,))
                walk(stmt.orelse, guards + (f"not ({test})",))
            else:  # for/while/with/try/match: their blocks, under the same guards
                blocks = [getattr(stmt, f, []) for f in ("body", "orelse", "finalbody")]
                for block in blocks + [c.body for c in getattr(stmt, "handlers", []) + getattr(stmt, "cases", [])]:
                    walk(block, guards)

    walk(body, ())
    if not raises:
        return "implemented", ()
    if not returns and _always_raises(body):
        return "stub", ()
    return "partial", tuple(dict.fromkeys(raises))


def _always_raises(stmts: list[ast.stmt]) -> bool:
    """Whether running `stmts` always ends in a raise (an if raises only when both branches do)."""
    for stmt in stmts:
        if isinstance(stmt, ast.Raise):
            return True
        if isinstance(stmt, ast.If) and stmt.orelse and _always_raises(stmt.body) and _always_raises(stmt.orelse):
            return True
        if isinstance(stmt, ast.With) and _always_raises(stmt.body):
            return True
    return False


def _declared_dtypes(declare: ast.Call) -> tuple[str, ...]:
    """The dtypes `@declare_supported([...])` mentions: helper calls (`F32(2, 2)`) and `torch.<dtype>`
    attributes (`T(2, dtype=torch.int64)`; aliases such as `torch.float` resolved by torch)."""
    found = set()
    for node in ast.walk(declare):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _DTYPE_HELPERS:
            found.add(_DTYPE_HELPERS[node.func.id])
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch":
            if isinstance(dtype := getattr(torch, node.attr, None), torch.dtype):
                found.add(str(dtype).removeprefix("torch."))
    return tuple(sorted(found))
