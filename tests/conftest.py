import sys
from pathlib import Path

import pytest
import torch

# tests import their shared fixtures (hf_parity) as plain modules
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """`graphllm run --threads N` sets torch's thread count for the whole process; give the next test its own."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
