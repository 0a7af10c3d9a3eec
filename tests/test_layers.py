"""The code's shape: imports only run downward through the documented layers, and files stay small.

LAYERS is the layer table of docs/architecture.md ("Layers"), top to bottom; a module may import
modules of its own layer and of the layers below it. Imports are read with `ast` from every module of
the installed package (function-level imports count: they run too; `if TYPE_CHECKING:` imports do
not run and are skipped). The docs table and this one are compared, so they cannot drift apart.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"graphllm": "graphllm", "graphllm.passes": "passes", "graphllm.ops": "ops",
                "graphllm.models": "models", "graphllm.cli": "cli"}
"""pyproject.toml's package-dir mapping: import name → folder."""

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("cli", ("graphllm.cli", "graphllm.__main__")),
    ("api", ("graphllm",)),
    ("app", ("graphllm.trainer", "graphllm.disk_space", "graphllm.run_config", "graphllm.checkpoint_root", "graphllm.job", "graphllm.artifact", "graphllm.report",
             "graphllm.resume", "graphllm.profile", "graphllm.profile_layers", "graphllm.profile_kernels", "graphllm.step_log", "graphllm.inspect_graphs",
             "graphllm.graph_view", "graphllm.graph_layout", "graphllm.graph_render", "graphllm.graph_export",
             "graphllm.inspect_pipeline", "graphllm.convert", "graphllm.output_dir", "graphllm.lora_io", "graphllm.megatron_layout",
             "graphllm.megatron_io", "graphllm.megatron_unpickle", "graphllm.megatron_convert", "graphllm.launch", "graphllm.slurm_env", "graphllm.eval",
             "graphllm.generate", "graphllm.npu_preflight", "graphllm.launch_script", "graphllm.megatron_flags",
             "graphllm.planner")),
    ("compile", ("graphllm.compile", "graphllm.pass_pipeline", "graphllm.plan", "graphllm.tasks", "graphllm.backends",
                 "graphllm.npu_backend", "graphllm.preflight", "graphllm.train_stage", "graphllm.recompute", "graphllm.offload_activations",
                 "graphllm.capture", "graphllm.dump", "graphllm.compile_cache")),
    ("runtime", ("graphllm.parallel", "graphllm.train", "graphllm.signals", "graphllm.data")),
    ("passes", ("graphllm.passes",)),
    ("planning", ("graphllm.planning",)),
    ("ops", ("graphllm.ops",)),
    ("models", ("graphllm.models",)),
    ("base", ("graphllm.errors", "graphllm.options", "graphllm.version", "graphllm.job_config")),
]
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name → file."""
    out = {}
    for name, folder in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            mod = ".".join([name, *parts])
            if name == "graphllm" and parts and f"graphllm.{parts[0]}" in PACKAGE_DIRS:
                continue
            out[mod] = path
    return out


def layer_of(module: str) -> int:
    """Index into LAYERS of the longest prefix that names `module` (`graphllm` names only the facade)."""
    best, index = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or (module.startswith(p + ".") and p != "graphllm")) and len(p) > best:
                best, index = len(p), i
    if index is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layers.py LAYERS (and docs/architecture.md)")
    return index


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Line numbers of imports inside `if TYPE_CHECKING:` blocks."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                for n in ast.walk(sub):
                    if isinstance(n, (ast.Import, ast.ImportFrom)):
                        lines.add(n.lineno)
    return lines


def imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported graphllm module) for each import that runs."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_only(tree)
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.lineno in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "graphllm"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "graphllm":
                continue
            for a in node.names:  # `from graphllm.passes import coc` imports the submodule
                sub = f"{base}.{a.name}"
                out.append((node.lineno, sub if sub in MODULES else base))
    return out


MODULES = modules()


def test_every_module_has_a_layer():
    for mod in MODULES:
        layer_of(mod)


def test_imports_run_downward():
    bad = []
    for mod, path in MODULES.items():
        mine = layer_of(mod)
        for line, target in imports(mod, path):
            if layer_of(target) < mine:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {LAYERS[mine][0]} module {mod} imports "
                           f"{LAYERS[layer_of(target)][0]} module {target}")
    assert not bad, "imports against the layer order (docs/architecture.md):\n" + "\n".join(bad)


def test_no_import_cycles():
    """No two modules import each other, directly or through others (late imports count)."""
    graph = {m: {t for _, t in imports(m, p) if t in MODULES and t != m} for m, p in MODULES.items()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return path[path.index(t):] + [t] if t in path else [m, t]
            if t not in state and (found := visit(t, path + [t])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m, [m])):
            pytest.fail("import cycle: " + " → ".join(cycle))


def test_docs_list_the_same_layers():
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `?(\w+)`? \| (.+?) \|", section, flags=re.M)
    documented = [(name, tuple(re.findall(r"`([\w.]+)`", mods))) for name, mods in rows if name != "layer"]
    assert documented == LAYERS, "docs/architecture.md's layer table and tests/test_layers.py LAYERS differ"


@pytest.mark.parametrize("folder", sorted(set(PACKAGE_DIRS.values())))
def test_files_and_functions_stay_small(folder):
    long_files, long_functions = [], []
    for path in sorted((ROOT / folder).rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            long_files.append(f"{path.relative_to(ROOT)} ({text.count(chr(10))} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long_files, f"files over {MAX_FILE_LINES} lines (two ideas in one?): {long_files}"
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"
