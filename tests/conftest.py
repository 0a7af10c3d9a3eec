import os
import sys
from pathlib import Path

import pytest
import torch

# tests import their shared fixtures (hf_parity) as plain modules
sys.path.insert(0, str(Path(__file__).parent))
# pytest-xdist's workers inherit COLUMNS=80, which graphllm's consoles honour (cli/console.py): the same output in a
# worker as in one process (a test that needs a width sets it with monkeypatch)
os.environ.pop("COLUMNS", None)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """`graphllm run --threads N` sets torch's thread count for the whole process; give the next test its own."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> Path:
    """tiny-llama compiled once for the session (eager, batch 2 × 32): for tests that run an artifact and write
    only under their own paths or runs/<their own --run-name>."""
    from graphllm.job import compile_artifact
    from graphllm.plan import CompilePlan

    out = tmp_path_factory.mktemp("tiny_artifact") / "tiny"
    compile_artifact(CompilePlan(model="tiny-llama", backend="eager", batch_size=2, seq_len=32), out)
    return out
