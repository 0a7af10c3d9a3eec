"""fold_constants: structure, numerics, and the values it must leave alone."""

from __future__ import annotations

import torch
from torch import nn

from graphllm.capture import capture
from graphllm.passes import PassContext, run_passes
from graphllm.passes.fold_constants import FOLDED_PREFIX, fold_constants

aten = torch.ops.aten


class Rotary(nn.Module):
    """cos/sin tables from a buffer (foldable) applied to the input (not foldable)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8)), persistent=False)
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x):  # x [B, S, 8]
        pos = torch.arange(x.shape[1])
        freqs = torch.outer(pos.float(), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        w = self.scale * 2  # depends on a Parameter: must stay in the graph (it trains)
        noise = torch.rand(8)  # random: must stay (a new draw each step)
        return x * emb.cos() + x * emb.sin() * w + noise * 0


def _run(gm, **options):
    ctx = PassContext()
    out, (rec,) = run_passes(gm, [fold_constants.with_options(**options)], ctx)
    return out, rec


def _calls(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_folds_tables_into_buffers() -> None:
    gm = capture(Rotary(), (torch.randn(2, 5, 8),))
    assert aten.cos.default in _calls(gm) and aten.sin.default in _calls(gm)
    out, rec = _run(gm)
    calls = _calls(out)
    assert aten.cos.default not in calls and aten.sin.default not in calls and aten.outer.default not in calls
    folded = [n for n in out.graph.nodes if n.op == "get_attr" and n.target.startswith(FOLDED_PREFIX)]
    assert len(folded) == 2 and rec.counters == {"folded": 2}
    assert all(tuple(getattr(out, n.target).shape) == (5, 8) for n in folded)


def test_folding_keeps_results_and_gradients() -> None:
    model = Rotary()
    x = torch.randn(2, 5, 8)
    gm = capture(model, (x,))
    ref_x = x.clone().requires_grad_()
    ref = gm(ref_x)
    ref.sum().backward()
    ref_grad, ref_scale = ref_x.grad, model.scale.grad.clone()
    model.scale.grad = None
    out, _ = _run(gm)
    x2 = x.clone().requires_grad_()
    got = out(x2)
    got.sum().backward()
    assert torch.equal(got, ref) and torch.equal(x2.grad, ref_grad) and torch.equal(model.scale.grad, ref_scale)


def test_leaves_parameters_inputs_random_and_large_values() -> None:
    gm = capture(Rotary(), (torch.randn(2, 5, 8),))
    out, _ = _run(gm)
    calls = _calls(out)
    assert aten.rand.default in calls  # random draw stays per step
    mul_by_param = [n for n in out.graph.nodes if n.target is aten.mul.Tensor
                    and any(a.op == "get_attr" and a.target == "scale" for a in n.all_input_nodes)]
    assert mul_by_param, "the Parameter-dependent product must not be folded"
    gm2 = capture(Rotary(), (torch.randn(2, 5, 8),))
    out2, rec2 = _run(gm2, max_elements=10)  # tables have 40 elements: over the cap, left alone
    assert aten.cos.default in _calls(out2) and not rec2.changed
