"""Capture: one static graph sharing the model's parameters, canonicalised; failures name the line."""

from __future__ import annotations

import torch
from torch import nn

import pytest

from graphllm.capture import CaptureError, capture


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        y = self.lin(x)
        if y.sum() > 0:  # data-dependent Python control flow: not one static graph
            return y * 2
        return y


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x.float()).relu()


def test_data_dependent_branch_names_the_source_line() -> None:
    with pytest.raises(CaptureError) as info:
        capture(DataDependent(), (torch.randn(2, 8),))
    msg = str(info.value)
    assert "test_capture.py:" in msg and "if y.sum() > 0" in msg and "static" in msg


def test_capture_shares_parameters_and_drops_noise() -> None:
    model = Plain()
    gm = capture(model, (torch.randn(2, 8),))
    assert gm.get_parameter("lin.weight") is model.lin.weight  # gradients reach the user's model
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten._assert_tensor_metadata.default not in targets
    assert torch.ops.aten.to.dtype not in targets  # x.float() on fp32 is a no-op and is removed
    x = torch.randn(2, 8)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    code = gm.code
    assert "tree_flatten_spec" not in code and "_guards_fn" not in code


def test_provenance_points_at_model_code_not_torch() -> None:
    gm = capture(Plain(), (torch.randn(2, 8),))
    linear = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default)
    last = linear.meta["stack_trace"].strip().splitlines()[-2]
    assert "test_capture.py" in last and "torch/nn" not in last
