"""fuse_add_rms_norm: structure, numerics against the graph before it, and where it must not fire."""

from __future__ import annotations

import operator

import torch
from torch import nn

from graphllm.capture import capture
from graphllm.passes import PassContext, run_passes
from graphllm.passes.fuse_add_rms_norm import fuse_add_rms_norm
from graphllm.passes.fuse_rms_norm import fuse_rms_norm
from hf_parity import rel_err

gops, aten = torch.ops.graphllm, torch.ops.aten
FP32_RTOL = 1e-5  # the fused op computes the same sum and norm; only the backward's reduction order differs


class Block(nn.Module):
    """Pre-norm residual: the sum feeds the norm and the next residual add (the decoder's shape)."""

    def __init__(self, scale_residual: bool = False, broadcast: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16))
        self.scale_residual, self.broadcast = scale_residual, broadcast

    def norm(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.w * (x * torch.rsqrt(var + 1e-5))

    def forward(self, x, r):
        if self.scale_residual:
            h = torch.add(x, r, alpha=0.5)  # alpha-scaled: another computation
        elif self.broadcast:
            h = x + r[:1]  # broadcasting add: the kernel adds elementwise
        else:
            h = x + r
        return self.norm(h) * 3 + h


def _fused(model, x, r):
    gm = capture(model, (x, r))
    before = run_passes(gm, [fuse_rms_norm], PassContext())[0]
    ref = capture(model, (x, r))
    out, (rec,) = run_passes(before, [fuse_add_rms_norm], PassContext())
    return ref, out, rec


def _calls(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)


def test_fires_and_returns_the_sum_to_its_other_users():
    x, r = _inputs()
    _, out, rec = _fused(Block(), x, r)
    calls = _calls(out)
    assert calls.count(gops.add_rms_norm.default) == 1 and gops.rms_norm.default not in calls
    assert aten.add.Tensor in calls  # the final `+ h` stays, now reading the fused op's second output
    fused = next(n for n in out.graph.nodes if n.target is gops.add_rms_norm.default)
    assert sorted(u.args[1] for u in fused.users if u.target is operator.getitem) == [0, 1]
    assert rec.counters == {"replaced": 1}


def test_numerics_forward_and_backward():
    model = Block()
    x, r = _inputs()
    ref, out, _ = _fused(model, x, r)
    results = []
    for gm in (ref, out):
        xi, ri = x.clone().requires_grad_(), r.clone().requires_grad_()
        model.w.grad = None
        y = gm(xi, ri)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), xi.grad, ri.grad, model.w.grad.clone()))
    for a, b in zip(*results):
        assert rel_err(a, b) <= FP32_RTOL


def test_does_not_fire_on_scaled_or_broadcast_adds():
    x, r = _inputs()
    for model in (Block(scale_residual=True), Block(broadcast=True)):
        _, out, rec = _fused(model, x, r)
        assert gops.add_rms_norm.default not in _calls(out) and not rec.changed
