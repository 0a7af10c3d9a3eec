"""graphllm::window_attention: the sliding-window causal op, fuse_attention raising the model's forms to it,
and its npu lowering (npu_fusion_attention sparse_mode 4) on the CPU emulation of the kernel."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from graphllm.capture import capture
from graphllm.models.llama import repeat_kv
from graphllm.ops.attention import window_attention_decomposed, window_causal_mask
from graphllm.passes import PassContext, run_passes
from graphllm.passes.fuse_attention import fuse_attention, window_of
from hf_parity import rel_err

gops = torch.ops.graphllm
FP32_RTOL = 1e-5  # fp32: the op's recomputing backward and SDPA's kernels sum in different orders
B, H, HKV, S, D, W = 2, 4, 2, 10, 8, 4


def _randn(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _qkv() -> tuple[torch.Tensor, ...]:
    return _randn(B, H, S, D), _randn(B, HKV, S, D, seed=1), _randn(B, HKV, S, D, seed=2)


def _reference(q, k, v, window: int) -> torch.Tensor:
    """Every score written out: key j visible to query i when i - window < j <= i (transformers' convention)."""
    k, v = repeat_kv(k, H // HKV), repeat_kv(v, H // HKV)
    scores = q @ k.transpose(-2, -1) * D**-0.5
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    scores = scores.masked_fill(~((j <= i) & (i - j < window)), float("-inf"))
    return scores.softmax(-1) @ v


class WindowSDPA(nn.Module):
    """The model's windowed form: SDPA with a boolean mask built from constants."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

    def forward(self, q, k, v):
        s = q.shape[2]
        mask = torch.ones(s, s, dtype=torch.bool).tril() & ~torch.ones(s, s, dtype=torch.bool).tril(-self.window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


class WindowEager(nn.Module):
    """The eager forms: repeat_kv, scaled scores, then an additive mask or masked_fill(~mask, min)."""

    def __init__(self, window: int, form: str) -> None:
        super().__init__()
        self.window, self.form = window, form

    def forward(self, q, k, v):
        s = q.shape[2]
        k, v = repeat_kv(k, H // HKV), repeat_kv(v, H // HKV)
        scores = torch.matmul(q, k.transpose(2, 3)) * D**-0.5
        keep = torch.ones(s, s, dtype=torch.bool).tril() & ~torch.ones(s, s, dtype=torch.bool).tril(-self.window)
        if self.form == "fill":
            scores = scores.masked_fill(~keep, torch.finfo(q.dtype).min)
        else:
            scores = scores + torch.zeros(s, s).masked_fill(~keep, torch.finfo(q.dtype).min)
        return torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def _fused(module: nn.Module) -> tuple[fx.GraphModule, fx.GraphModule]:
    gm = capture(module, _qkv())
    before = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    after, _ = run_passes(gm, [fuse_attention], PassContext())
    return before, after


def _ops(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if getattr(n.target, "namespace", "") == "graphllm"]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Relative to the larger of |b|'s max and 1: a window of one key has an exactly-zero q gradient."""
    return bool((a - b).abs().max() <= FP32_RTOL * max(b.abs().max().item(), 1.0))


def _out_and_grads(fn, inputs):
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*xs)
    return out.detach(), torch.autograd.grad(out, xs, _randn(*out.shape, seed=9))


def test_op_matches_the_written_out_window_forward_and_backward() -> None:
    inputs = _qkv()
    for window in (1, W, S - 1):
        got, grads = _out_and_grads(lambda q, k, v: gops.window_attention(q, k, v, D**-0.5, window), inputs)
        want, want_grads = _out_and_grads(lambda q, k, v: _reference(q, k, v, window), inputs)
        assert rel_err(got, want) <= FP32_RTOL, window
        for a, b in zip(grads, want_grads):
            assert _close(a, b), window


@pytest.mark.parametrize("form", ["sdpa", "fill", "additive"])
def test_fuse_attention_raises_the_window_forms(form: str) -> None:
    module = WindowSDPA(W) if form == "sdpa" else WindowEager(W, form)
    before, after = _fused(module)
    assert _ops(after) == [gops.window_attention.default]
    (node,) = [n for n in after.graph.nodes if n.target is gops.window_attention.default]
    assert node.args[4] == W and node.args[3] == pytest.approx(D**-0.5)
    assert tuple(node.args[1].meta["val"].shape) == (B, HKV, S, D)  # repeat_kv folded back: grouped kv heads
    got, grads = _out_and_grads(after, _qkv())
    want, want_grads = _out_and_grads(before, _qkv())
    assert rel_err(got, want) <= FP32_RTOL
    for a, b in zip(grads, want_grads):
        assert rel_err(a, b) <= FP32_RTOL


def test_a_window_covering_the_sequence_is_plain_causal_attention() -> None:
    _, after = _fused(WindowSDPA(S))
    (node,) = [n for n in after.graph.nodes if n.target is gops.attention.default]
    assert node.args[4] is True


def test_other_constant_masks_are_left_alone() -> None:
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    assert window_of((j <= i) & (i - j < W), S) == W
    assert window_of(torch.ones(S, S, dtype=torch.bool), S) is None  # bidirectional
    assert window_of((j <= i) & (i - j < W) & (j != 0), S) is None  # a hole in the band
    assert window_of((j < i) & (i - j < W), S) is None  # the diagonal hidden
    assert window_of((j <= i + 1) & (i - j < W), S) is None  # one future key visible


def test_npu_lowering_uses_the_band_mode_and_matches_on_the_emulated_kernel() -> None:
    import npu_emulation  # noqa: F401  (registers torch.ops.npu.* emulations)
    from graphllm.ops.lowering_npu import SPARSE_MODE_BAND, window_attention_npu

    assert SPARSE_MODE_BAND == 4
    inputs = _qkv()
    got, grads = _out_and_grads(lambda q, k, v: window_attention_npu(q, k, v, D**-0.5, W), inputs)
    want, want_grads = _out_and_grads(lambda q, k, v: window_attention_decomposed(q, k, v, D**-0.5, W), inputs)
    assert rel_err(got, want) <= FP32_RTOL
    for a, b in zip(grads, want_grads):
        assert rel_err(a, b) <= FP32_RTOL
    assert torch.equal(window_causal_mask(3, 3, 2), torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool))


def test_a_windowed_model_compiles_to_the_op_and_refuses_context_parallelism(tmp_path) -> None:
    import graphllm
    from graphllm.errors import GraphllmError
    from graphllm.models import load_config
    from graphllm.planning.layout import Layout
    from hf_parity import SEQ, batch, hf_model, save_hf_checkpoint

    ckpt = save_hf_checkpoint(hf_model("mistral-window", "sdpa"), "mistral-window", tmp_path / "m")
    cfg = load_config(ckpt)
    window = cfg.window_of(0)
    assert window is not None and window < SEQ
    ids, labels = batch()
    compiled = graphllm.compile(graphllm.load_model(ckpt), ids, labels, backend="eager")
    fused = [n for n in compiled.result.model_graph.graph.nodes if n.target is gops.window_attention.default]
    assert len(fused) == cfg.num_hidden_layers and {n.args[4] for n in fused} == {window}
    with pytest.raises(GraphllmError, match=rf"--cp 2: this model's sliding-window attention \(window {window} <"):
        Layout(cp=2).check_model(cfg, batch_size=1, seq_len=SEQ)
    Layout(cp=2).check_model(cfg, batch_size=1, seq_len=4)  # every window covers the sequence: plain causal
