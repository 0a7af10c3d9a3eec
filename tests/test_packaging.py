"""Packaging: one import name, the console script, and no torch_npu in the default install."""

import subprocess
import sys


def test_default_install_never_imports_torch_npu() -> None:
    code = (
        "import sys, graphllm, graphllm.cli.main, graphllm.backends, graphllm.job, graphllm.ops.lowering\n"
        "import graphllm.passes, graphllm.models, graphllm.data\n"
        "from graphllm.backends import get_backend\n"
        "try:\n    get_backend('npu')\nexcept Exception as e:\n    print(type(e).__name__)\n"
        "assert 'torch_npu' not in sys.modules and 'torchair' not in sys.modules, sorted(sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "GraphllmError"


def test_subpackages_live_under_one_name() -> None:
    import graphllm.cli
    import graphllm.models
    import graphllm.ops
    import graphllm.passes

    for mod, folder in [(graphllm.passes, "passes"), (graphllm.ops, "ops"), (graphllm.models, "models"),
                        (graphllm.cli, "cli")]:
        assert mod.__file__.replace("\\", "/").endswith(f"/{folder}/__init__.py")


def test_every_subpackage_is_listed_in_pyproject() -> None:
    """A subpackage missing from pyproject's explicit list is left out of a regular (non-editable) install."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, dirs = set(tool["packages"]), tool["package-dir"]
    found = set()
    for name, folder in dirs.items():
        for init in (root / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(root / folder).parts
            found.add(".".join([name, *rel]))
    assert found <= listed, f"subpackages missing from pyproject.toml [tool.setuptools] packages: {sorted(found - listed)}"


def test_one_version_source_and_the_package_metadata() -> None:
    """graphllm/version.py is the version (pyproject reads it); `graphllm --version` prints it; the
    distribution carries its license, and py.typed marks the package as typed."""
    import tomllib
    from importlib.metadata import metadata
    from pathlib import Path

    from graphllm.version import __version__

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "graphllm.version.__version__"}
    proc = subprocess.run([sys.executable, "-m", "graphllm", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith(f"graphllm {__version__} (torch "), proc.stdout
    assert metadata("graphllm")["Version"] == __version__
    assert project["project"]["license"] == "BSD-3-Clause" and (root / "LICENSE").read_text().startswith("BSD 3-Clause")
    assert (root / "graphllm" / "py.typed").is_file()
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["graphllm"]
