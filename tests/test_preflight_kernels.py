"""graphllm.preflight.npu_kernels: the emulated torch_npu kernels differentiate through their backward kernels
as torch_npu's autograd does, stay single `npu.*` nodes in compiled forward and backward graphs (what the
pre-flight checks against torchair's converters), and refuse to shadow a loaded torch_npu."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.utils._python_dispatch import TorchDispatchMode

import graphllm
from graphllm.backends import Backend, eager_graph_compiler, register_backend, unregister_backend
from graphllm.errors import GraphllmError
from graphllm.preflight.npu_kernels import CAUSAL_MASK_SIZE, EMULATED, NPU_AUTOGRAD, register_npu_kernels
from hf_parity import rel_err
from npu_wheel import npu_schemas

FP32_RTOL = 2e-6
"""The kernels take fp16/bf16/fp32 only (float64 is rejected, as torch_npu documents) and compute in fp32;
the reference runs in float64 on the same values, so the error is the kernel's fp32 rounding (sums of a
few dozen products, softmax rebuilt from its saved max/sum): at most 3e-7 of a tensor's largest entry here."""
register_npu_kernels(npu_schemas())  # what tests/npu_emulation.py does on import (a no-op after it)
NPU = torch.ops.npu


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class _Dispatched(TorchDispatchMode):
    """Records the ops dispatched below autograd (a kernel's own ops are not seen: only the calls)."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


def _check_grads(kernel: str, fn, reference, inputs):
    """fn (the kernel, fp32) vs reference (plain torch, float64) on the same values: the output and every
    input's gradient for one random cotangent; the backward must run the kernel's backward kernel."""
    x32 = [t.float().requires_grad_() for t in inputs]
    x64 = [t.double().requires_grad_() for t in inputs]
    out, ref = fn(*x32), reference(*x64)
    assert out.dtype == torch.float32 and rel_err(out.double(), ref) <= FP32_RTOL
    cotangent = _randn(*ref.shape, seed=99).double()
    with _Dispatched() as seen:
        got = torch.autograd.grad(out, x32, cotangent.float())
    assert f"npu.{NPU_AUTOGRAD[kernel]}.default" in seen.ops, seen.ops
    for i, (a, b) in enumerate(zip(got, torch.autograd.grad(ref, x64, cotangent))):
        assert a.shape == b.shape and rel_err(a.double(), b) <= FP32_RTOL, (kernel, i, rel_err(a.double(), b))


def _rms_norm_ref(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def test_rms_norm_gradients():
    _check_grads("npu_rms_norm", lambda x, w: NPU.npu_rms_norm(x, w, epsilon=1e-5)[0], _rms_norm_ref,
                 (_randn(2, 5, 16), _randn(16, seed=1)))


@pytest.mark.parametrize("dim", [-1, 1])
def test_swiglu_gradients(dim):
    def ref(x):
        a, b = x.chunk(2, dim=dim)
        return torch.nn.functional.silu(a) * b
    _check_grads("npu_swiglu", lambda x: NPU.npu_swiglu(x, dim=dim), ref, (_randn(2, 6, 10),))


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@pytest.mark.parametrize("table", [(1, 1, 6, 8), (2, 1, 6, 8)], ids=["11SD", "B1SD"])
def test_rotary_mul_gradients(table):
    """dx and the tables' gradients (summed over the axes they broadcast along)."""
    _check_grads("npu_rotary_mul", lambda x, r1, r2: NPU.npu_rotary_mul(x, r1, r2, rotary_mode="half"),
                 lambda x, r1, r2: r1 * x + r2 * _rotate_half(x),
                 (_randn(2, 4, 6, 8), _randn(*table, seed=1), _randn(*table, seed=2)))


def _causal_mask():
    return torch.ones(CAUSAL_MASK_SIZE, CAUSAL_MASK_SIZE, dtype=torch.bool).triu(1)


def _attention_ref(q, k, v, scale, masked, layout):
    """Plain attention (BNSD math), kv heads repeated for GQA; `masked` True = masked out."""
    if layout == "BSND":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scores = q @ k.transpose(-2, -1) * scale
    if masked is not None:
        scores = scores.masked_fill(masked, float("-inf"))
    out = torch.softmax(scores, -1) @ v
    return out.transpose(1, 2) if layout == "BSND" else out


# (layout, kv heads, Sq, Skv, sparse_mode, mask): GQA with 2 and 1 kv heads for 4 query heads, causal sparse_mode 2
# (left-up) and 3 (right-down, Sq < Skv), an explicit per-batch mask with sparse_mode 0 (packed rows)
ATTENTION_CASES = {
    "mha-nomask": ("BNSD", 4, 6, 6, 0, None),
    "gqa2-causal2": ("BNSD", 2, 6, 6, 2, "causal"),
    "mqa-causal2": ("BNSD", 1, 6, 6, 2, "causal"),
    "gqa2-causal2-bsnd": ("BSND", 2, 6, 6, 2, "causal"),
    "gqa2-causal3-short-q": ("BNSD", 2, 4, 6, 3, "causal"),
    "gqa2-explicit-mask": ("BNSD", 2, 6, 6, 0, "explicit"),
}


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_fusion_attention_gradients(case):
    layout, hkv, sq, sk, sparse_mode, mask_kind = ATTENTION_CASES[case]
    scale = 0.3
    explicit = torch.ones(2, 1, sq, sk, dtype=torch.bool).triu(1)
    explicit[1, :, 3:, :3] = True  # the second row packs two samples: rows 3.. see only keys 3..
    atten_mask = {None: None, "causal": _causal_mask(), "explicit": explicit}[mask_kind]
    masked = {None: None, "causal": torch.ones(sq, sk, dtype=torch.bool).triu(1 if sparse_mode == 2 else sk - sq + 1),
              "explicit": explicit}[mask_kind]

    def bnsd_or_bsnd(b, n, s, d):
        return (b, n, s, d) if layout == "BNSD" else (b, s, n, d)

    def kernel(q, k, v):
        return NPU.npu_fusion_attention(q, k, v, head_num=4, input_layout=layout, atten_mask=atten_mask, scale=scale,
                                        sparse_mode=sparse_mode)[0]
    inputs = (_randn(*bnsd_or_bsnd(2, 4, sq, 8)), _randn(*bnsd_or_bsnd(2, hkv, sk, 8), seed=1),
              _randn(*bnsd_or_bsnd(2, hkv, sk, 8), seed=2))
    _check_grads("npu_fusion_attention", kernel, lambda q, k, v: _attention_ref(q, k, v, scale, masked, layout), inputs)


def test_kernels_reject_float64():
    with pytest.raises(TypeError, match="float64 is not supported"):
        NPU.npu_rms_norm(_randn(2, 4).double(), _randn(4).double())


def test_shapes_under_fake_tensors_are_torch_npus():
    """Output shapes and dtypes as torch_npu's meta registrations give them (softmax stats [B, N, Sq, 8] fp32,
    dgamma fp32, an empty fp32 dsink without sink), equal eagerly and under FakeTensorMode (where the
    value checks, e.g. of the compressed causal mask, are skipped)."""
    q, k = _randn(2, 4, 6, 8), _randn(2, 2, 6, 8, seed=1)
    x, w = _randn(3, 16).bfloat16(), _randn(16, seed=1).bfloat16()

    def run():
        fa = NPU.npu_fusion_attention(q, k, k, 4, "BNSD", atten_mask=_causal_mask(), scale=0.3, sparse_mode=2)
        grad = NPU.npu_fusion_attention_grad(q, k, k, fa[0], 4, "BNSD", atten_mask=_causal_mask(), softmax_max=fa[1],
                                             softmax_sum=fa[2], attention_in=fa[0], scale_value=0.3, sparse_mode=2)
        y, rstd = NPU.npu_rms_norm(x, w)
        return [*fa[:4], *grad, y, rstd, *NPU.npu_rms_norm_backward(y, x, w, rstd)]
    eager = run()
    with torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True):
        fake = run()
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in eager]
    assert eager[1].shape == (2, 4, 6, 8) and eager[1].dtype == torch.float32
    assert eager[8].shape == (0,) and eager[8].dtype == torch.float32  # dsink
    assert eager[9].dtype == torch.bfloat16 and eager[10].shape == (3, 1) and eager[12].dtype == torch.float32


def _block(x, w, w_up, cos, sin):
    """rms norm -> swiglu -> q (2 heads) and k, v (1 head) -> rotary on q and k -> causal GQA attention."""
    h = NPU.npu_rms_norm(x, w, epsilon=1e-5)[0]
    h = NPU.npu_swiglu(h @ w_up, dim=-1)  # [B, S, 32]
    q, k, v = (t.unflatten(-1, (-1, 8)).transpose(1, 2) for t in h.split([16, 8, 8], dim=-1))
    q, k = (NPU.npu_rotary_mul(t, cos, sin, rotary_mode="half") for t in (q, k))
    mask = torch.ones(CAUSAL_MASK_SIZE, CAUSAL_MASK_SIZE, dtype=torch.bool, device=x.device).triu(1)
    out = NPU.npu_fusion_attention(q, k, v, head_num=2, input_layout="BNSD", atten_mask=mask, scale=8 ** -0.5,
                                   sparse_mode=2)[0]
    return out.square().sum()


def _targets(gm) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


FORWARD_KERNELS = {f"npu.{k}.default" for k in NPU_AUTOGRAD}
BACKWARD_KERNELS = {f"npu.{k}.default" for k in NPU_AUTOGRAD.values()}
DECOMPOSED = {"aten.rsqrt.default", "aten.silu.default", "aten.sigmoid.default", "aten.exp.default",
              "aten._softmax.default", "aten.amax.default"}
"""Ops the kernels' emulations run: none may appear in a traced graph (the kernels must not decompose)."""


def test_compiled_graphs_hold_the_kernels_and_their_backward_kernels():
    torch._dynamo.reset()
    graphs = {}

    def record(kind):
        def compile_graph(gm, example_inputs):
            graphs[kind] = gm
            return make_boxed_func(gm.forward)
        return compile_graph
    inputs = [_randn(2, 6, 16), _randn(16, seed=1), _randn(16, 64, seed=2).div(4), _randn(1, 1, 6, 8, seed=3),
              _randn(1, 1, 6, 8, seed=4)]
    eager_inputs = [t.clone().requires_grad_() for t in inputs]
    compiled_inputs = [t.clone().requires_grad_() for t in inputs]
    want = _block(*eager_inputs)
    want.backward()
    step = torch.compile(_block, fullgraph=True, backend=aot_autograd(fw_compiler=record("forward"),
                                                                      bw_compiler=record("backward")))
    got = step(*compiled_inputs)
    got.backward()
    forward, backward = _targets(graphs["forward"]), _targets(graphs["backward"])
    assert FORWARD_KERNELS <= forward and not DECOMPOSED & forward, forward
    assert BACKWARD_KERNELS <= backward and not DECOMPOSED & backward, backward
    assert rel_err(got.detach(), want.detach()) <= FP32_RTOL
    for a, b in zip(compiled_inputs, eager_inputs):
        assert rel_err(a.grad, b.grad) <= FP32_RTOL


def _tiny_llama_head_dim_64():
    """tiny-llama, smaller, with head_dim 64: rope_npu keeps npu_rotary_mul under grad only where torchair
    can build its backward kernel (last dim a multiple of 64); tiny-llama's 32 runs the decomposition."""
    from graphllm.models import build_model
    from graphllm.models.presets import tiny_llama

    cfg = dataclasses.replace(tiny_llama(), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    model = build_model(cfg, seed=0)
    model.source = "tiny-llama-head-dim-64"
    return model


def test_tiny_llama_step_lowered_for_npu_runs_backward_kernels():
    """graphllm's npu lowering on a training step: the backward graph runs torch_npu's backward kernels
    (npu_rms_norm_backward also for npu_add_rms_norm, through graphllm's own autograd.Function)."""
    graphs = []

    def graph_compiler(stage):
        inner = eager_graph_compiler(stage)

        def compile_graph(gm, example_inputs):
            graphs.append(gm)
            return inner(gm, example_inputs)
        return compile_graph
    register_backend(Backend(name="npu-test", lowering="npu", graph_compiler=graph_compiler,
                             description="test only: npu lowering, recorded eager aot graphs"))
    try:
        ids = torch.randint(0, 8000, (2, 16), generator=torch.Generator().manual_seed(0))
        labels = torch.randint(0, 8000, (2, 16), generator=torch.Generator().manual_seed(1))
        model = _tiny_llama_head_dim_64()
        compiled = graphllm.compile(model, ids, labels, backend="npu-test")
        compiled(ids, labels).backward()
    finally:
        unregister_backend("npu-test")
    is_backward = [any(n.op == "placeholder" and n.name.startswith("tangents") for n in g.graph.nodes) for g in graphs]
    assert sorted(is_backward) == [False, True], is_backward
    forward, backward = (_targets(graphs[is_backward.index(b)]) for b in (False, True))
    assert FORWARD_KERNELS | {"npu.npu_add_rms_norm.default"} <= forward, forward
    assert BACKWARD_KERNELS <= backward, backward
    assert all(p.grad is not None and bool(p.grad.isfinite().all()) for p in model.parameters())


def test_registering_twice_is_a_no_op():
    register_npu_kernels(npu_schemas())  # already registered above: defining again would raise
    assert set(NPU_AUTOGRAD) | set(NPU_AUTOGRAD.values()) <= set(EMULATED)
    assert rel_err(NPU.npu_rms_norm(_randn(2, 8), torch.ones(8))[0], _rms_norm_ref(_randn(2, 8), 1, 1e-6)) <= FP32_RTOL
    for name in EMULATED:  # autograd only where torch_npu registers it
        has = torch._C._dispatch_has_kernel_for_dispatch_key(f"npu::{name}", "Autograd")
        assert has == (name in NPU_AUTOGRAD), name


def test_refuses_when_torch_npu_is_loaded(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    with pytest.raises(GraphllmError, match="torch_npu is loaded"):
        register_npu_kernels(npu_schemas())
