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
