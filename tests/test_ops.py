"""graphllm's custom ops against their plain-torch references.

For each of torch.ops.graphllm.{rms_norm, swiglu, rope, attention}: the kernel equals the `*_decomposed`
reference, the registered autograd rule equals autograd through that reference, gradcheck passes in
float64, the fake (meta) function agrees with the real output's shape and dtype (mixed dtypes included),
and `torch.library.opcheck` accepts the registration.

Tolerance policy (STYLE.md item 6):
- forward: the kernel *is* the reference (plus `.contiguous()`), so it must be bitwise equal;
- FP32_GRAD_RTOL = 1e-5: the hand-written backward rules are the same math as autograd through the
  reference but in another association/reduction order (e.g. rms_norm's mean(g * xhat) term, the
  recomputed softmax in attention), so fp32 results differ by rounding only;
- BF16_GRAD_RTOL = 2e-2: with bf16 inputs the rule keeps some intermediates in fp32 where autograd
  rounds them to bf16 (8 mantissa bits, ~4e-3 per rounding, a few roundings in a chain).
"""

from __future__ import annotations

import pytest
import torch

import graphllm.ops  # noqa: F401  (registers torch.ops.graphllm)
from graphllm.ops.attention import attention_decomposed
from graphllm.ops.rms_norm import rms_norm_decomposed
from graphllm.ops.rope import rope_decomposed
from graphllm.ops.swiglu import swiglu_decomposed
from hf_parity import rel_err

ops = torch.ops.graphllm

FP32_GRAD_RTOL = 1e-5  # reduction/association order of the hand-written backward vs autograd
BF16_GRAD_RTOL = 2e-2  # bf16 rounding of intermediates autograd keeps in bf16 and the rule in fp32
EPS = 1e-5


def _repro(request: pytest.FixtureRequest) -> str:
    return f"reproduce: python -m pytest tests/test_ops.py -k '{request.node.name}'"


def _leaves(*tensors: torch.Tensor, grad: tuple[bool, ...] | None = None) -> list[torch.Tensor]:
    """Fresh leaf copies, requiring grad where `grad` says (all floating tensors by default)."""
    grad = grad or tuple(t.is_floating_point() for t in tensors)
    return [t.detach().clone().requires_grad_(g) for t, g in zip(tensors, grad)]


def _check_against_reference(op, ref, tensors, extra, request, *, grad=None, rtol=FP32_GRAD_RTOL):
    """op(*tensors, *extra) == ref(...) bitwise; gradients of a random projection agree within rtol."""
    a = _leaves(*tensors, grad=grad)
    b = _leaves(*tensors, grad=grad)
    out_op = op(*a, *extra)
    out_ref = ref(*b, *extra)
    assert out_op.dtype == out_ref.dtype and out_op.shape == out_ref.shape
    assert torch.equal(out_op, out_ref), f"forward differs: rel err {rel_err(out_op, out_ref):.2e}; {_repro(request)}"
    g = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(1)).to(out_ref.dtype)
    want = [t for t in a if t.requires_grad]
    got_op = torch.autograd.grad(out_op, want, g)
    got_ref = torch.autograd.grad(out_ref, [t for t in b if t.requires_grad], g)
    for i, (x, y) in enumerate(zip(got_op, got_ref)):
        assert x.shape == y.shape and x.dtype == y.dtype, f"grad {i}: {x.shape}/{x.dtype} vs {y.shape}/{y.dtype}"
        err = rel_err(x.float(), y.float())
        assert err <= rtol, f"grad {i} rel err {err:.2e} > {rtol:g}; {_repro(request)}"


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------- rms_norm

def test_rms_norm_matches_reference_fp32(request) -> None:
    x, w = _randn(2, 5, 16), _randn(16, seed=1)
    _check_against_reference(ops.rms_norm, rms_norm_decomposed, (x, w), (EPS,), request)


def test_rms_norm_matches_reference_bf16_input_fp32_weight(request) -> None:
    x, w = _randn(2, 5, 16, dtype=torch.bfloat16), _randn(16, seed=1)
    _check_against_reference(ops.rms_norm, rms_norm_decomposed, (x, w), (EPS,), request, rtol=BF16_GRAD_RTOL)


@pytest.mark.parametrize("grad", [(True, False), (False, True)], ids=["x_only", "weight_only"])
def test_rms_norm_grad_of_one_input(grad, request) -> None:
    x, w = _randn(3, 8), _randn(8, seed=1)
    _check_against_reference(ops.rms_norm, rms_norm_decomposed, (x, w), (EPS,), request, grad=grad)


def test_rms_norm_gradcheck_fp64() -> None:
    """rms_norm computes in fp32 by definition, float64 inputs included (as HF's LlamaRMSNorm, which
    always casts to float32), so the finite differences are taken at fp32 resolution: step 1e-3 and
    tolerance 1e-3 (fp32 rounding / step ~ 1e-7 / 1e-3, truncation ~ step²)."""
    x, w = _leaves(_randn(2, 3, 4, dtype=torch.float64), _randn(4, dtype=torch.float64, seed=1))
    assert torch.autograd.gradcheck(lambda x, w: ops.rms_norm(x, w, EPS), (x, w), eps=1e-3, atol=1e-3, rtol=1e-3)


def test_rms_norm_backward_with_2d_weight() -> None:
    x, w = _leaves(_randn(2, 3, 4), _randn(3, 4, seed=1))
    ops.rms_norm(x, w, EPS).sum().backward()
    assert w.grad is not None and w.grad.shape == w.shape


# ---------------------------------------------------------------- swiglu

def test_swiglu_matches_reference_fp32(request) -> None:
    gate, up = _randn(2, 5, 24), _randn(2, 5, 24, seed=1)
    _check_against_reference(ops.swiglu, swiglu_decomposed, (gate, up), (), request)


def test_swiglu_matches_reference_bf16(request) -> None:
    gate, up = _randn(2, 5, 24, dtype=torch.bfloat16), _randn(2, 5, 24, dtype=torch.bfloat16, seed=1)
    _check_against_reference(ops.swiglu, swiglu_decomposed, (gate, up), (), request, rtol=BF16_GRAD_RTOL)


def test_swiglu_broadcast_grads_reduce_to_input_shapes(request) -> None:
    """The rule returns full-size grads; autograd sums them back to a broadcast input's shape."""
    gate, up = _randn(2, 5, 24), _randn(24, seed=1)
    _check_against_reference(ops.swiglu, swiglu_decomposed, (gate, up), (), request)


def test_swiglu_gradcheck_fp64() -> None:
    gate, up = _leaves(_randn(3, 6, dtype=torch.float64), _randn(3, 6, dtype=torch.float64, seed=1))
    assert torch.autograd.gradcheck(ops.swiglu, (gate, up))


# ---------------------------------------------------------------- rope

def _cos_sin(S: int, D: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama-style tables [1, 1, S, D] (both halves equal), as the models build them."""
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))  # [D/2]
    freqs = torch.outer(torch.arange(S, dtype=torch.float32), inv)  # [S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [S, D]
    return emb.cos()[None, None].to(dtype), emb.sin()[None, None].to(dtype)


def test_rope_matches_reference_broadcast_cos_sin(request) -> None:
    x = _randn(2, 4, 6, 8)  # [B, H, S, D]
    cos, sin = _cos_sin(6, 8)  # [1, 1, S, D]
    _check_against_reference(ops.rope, rope_decomposed, (x, cos, sin), (), request, grad=(True, False, False))


def test_rope_grads_for_cos_and_sin_when_required(request) -> None:
    """cos/sin broadcast over B and H: their grads are summed back to [1, 1, S, D]."""
    x = _randn(2, 4, 6, 8)
    cos, sin = _cos_sin(6, 8)
    _check_against_reference(ops.rope, rope_decomposed, (x, cos, sin), (), request, grad=(True, True, True))
    _check_against_reference(ops.rope, rope_decomposed, (x, cos, sin), (), request, grad=(False, False, True))


def test_rope_cos_sin_of_lower_rank(request) -> None:
    """cos/sin [S, D] against x [B, H, S, D]: leading broadcast dims are summed away in the grads."""
    x = _randn(2, 3, 6, 8)
    cos, sin = (t[0, 0] for t in _cos_sin(6, 8))
    _check_against_reference(ops.rope, rope_decomposed, (x, cos, sin), (), request, grad=(True, True, True))


def test_rope_bf16_x_fp32_tables(request) -> None:
    x = _randn(1, 2, 6, 8, dtype=torch.bfloat16)
    cos, sin = _cos_sin(6, 8)
    _check_against_reference(ops.rope, rope_decomposed, (x, cos, sin), (), request, grad=(True, False, False),
                             rtol=BF16_GRAD_RTOL)


def test_rope_gradcheck_fp64() -> None:
    x = _randn(1, 2, 3, 4, dtype=torch.float64)
    cos, sin = _randn(1, 1, 3, 4, dtype=torch.float64, seed=1), _randn(1, 1, 3, 4, dtype=torch.float64, seed=2)
    assert torch.autograd.gradcheck(ops.rope, tuple(_leaves(x, cos, sin)))


# ---------------------------------------------------------------- attention

@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("hkv", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
def test_attention_matches_reference(hkv: int, causal: bool, request) -> None:
    B, H, S, D = 2, 4, 7, 8
    q, k, v = _randn(B, H, S, D), _randn(B, hkv, S, D, seed=1), _randn(B, hkv, S, D, seed=2)
    _check_against_reference(ops.attention, attention_decomposed, (q, k, v), (D**-0.5, causal), request)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_attention_gqa_equals_repeated_kv_mha(causal: bool) -> None:
    """Each kv head serves H/Hkv consecutive query heads (HF repeat_kv = repeat_interleave on dim 1)."""
    q, k, v = _randn(1, 4, 5, 8), _randn(1, 2, 5, 8, seed=1), _randn(1, 2, 5, 8, seed=2)
    gqa = ops.attention(q, k, v, 0.3, causal)
    mha = ops.attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), 0.3, causal)
    torch.testing.assert_close(gqa, mha, rtol=FP32_GRAD_RTOL, atol=1e-6)


def test_attention_bf16(request) -> None:
    q, k, v = (_randn(1, 4, 6, 8, dtype=torch.bfloat16, seed=s) for s in range(3))
    k, v = k[:, :2], v[:, :2]
    _check_against_reference(ops.attention, attention_decomposed, (q, k, v), (0.35, True), request,
                             rtol=BF16_GRAD_RTOL)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("hkv", [2, 1], ids=["gqa2", "mqa"])
def test_attention_gradcheck_fp64(hkv: int, causal: bool) -> None:
    q = _randn(1, 4, 3, 4, dtype=torch.float64)
    k, v = _randn(1, hkv, 3, 4, dtype=torch.float64, seed=1), _randn(1, hkv, 3, 4, dtype=torch.float64, seed=2)
    assert torch.autograd.gradcheck(lambda q, k, v: ops.attention(q, k, v, 0.5, causal), tuple(_leaves(q, k, v)))


def test_attention_noncausal_cross_lengths_gradcheck_fp64() -> None:
    """Sq != Sk without a mask is well defined (no diagonal to align)."""
    q = _randn(1, 2, 3, 4, dtype=torch.float64)
    k, v = _randn(1, 1, 5, 4, dtype=torch.float64, seed=1), _randn(1, 1, 5, 4, dtype=torch.float64, seed=2)
    assert torch.autograd.gradcheck(lambda q, k, v: ops.attention(q, k, v, 0.5, False), tuple(_leaves(q, k, v)))


def test_attention_causal_cross_lengths_gradcheck_fp64() -> None:
    q = _randn(1, 2, 3, 4, dtype=torch.float64)
    k, v = _randn(1, 2, 5, 4, dtype=torch.float64, seed=1), _randn(1, 2, 5, 4, dtype=torch.float64, seed=2)
    assert torch.autograd.gradcheck(lambda q, k, v: ops.attention(q, k, v, 0.5, True), tuple(_leaves(q, k, v)),
                                    raise_exception=False)


# ---------------------------------------------------------------- fake functions and opcheck

bf16, f32 = torch.bfloat16, torch.float32

FAKE_CASES = {
    "rms_norm_f32": (ops.rms_norm, [((2, 3, 8), f32), ((8,), f32)], (EPS,)),
    "rms_norm_bf16_x_f32_w": (ops.rms_norm, [((2, 3, 8), bf16), ((8,), f32)], (EPS,)),
    "rms_norm_bf16": (ops.rms_norm, [((2, 3, 8), bf16), ((8,), bf16)], (EPS,)),
    "swiglu_f32": (ops.swiglu, [((2, 3, 8), f32), ((2, 3, 8), f32)], ()),
    "swiglu_bf16_f32": (ops.swiglu, [((2, 3, 8), bf16), ((2, 3, 8), f32)], ()),
    "swiglu_broadcast": (ops.swiglu, [((2, 3, 8), f32), ((8,), f32)], ()),
    "rope_broadcast": (ops.rope, [((2, 4, 6, 8), f32), ((1, 1, 6, 8), f32), ((1, 1, 6, 8), f32)], ()),
    "rope_bf16_x_f32_tables": (ops.rope, [((2, 4, 6, 8), bf16), ((1, 1, 6, 8), f32), ((1, 1, 6, 8), f32)], ()),
    "attention_gqa": (ops.attention, [((2, 4, 6, 8), f32), ((2, 2, 6, 8), f32), ((2, 2, 6, 8), f32)], (0.3, True)),
    "attention_mqa_bf16": (ops.attention, [((2, 4, 6, 8), bf16), ((2, 1, 6, 8), bf16), ((2, 1, 6, 8), bf16)],
                           (0.3, False)),
    "attention_v_width": (ops.attention, [((1, 2, 6, 8), f32), ((1, 2, 6, 8), f32), ((1, 2, 6, 4), f32)],
                          (0.3, False)),
}


@pytest.mark.parametrize("case", list(FAKE_CASES))
def test_fake_matches_real(case: str) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    op, specs, extra = FAKE_CASES[case]
    real_in = [_randn(*shape, dtype=dtype, seed=i) for i, (shape, dtype) in enumerate(specs)]
    real = op(*real_in, *extra)
    with FakeTensorMode() as mode:
        fake = op(*[mode.from_tensor(t) for t in real_in], *extra)
    meta = op(*[t.to("meta") for t in real_in], *extra)
    for out in (fake, meta):
        assert out.shape == real.shape and out.dtype == real.dtype, f"{case}: {out.shape}/{out.dtype} vs real " \
                                                                    f"{real.shape}/{real.dtype}"
        assert out.is_contiguous() and real.is_contiguous()


OPCHECK_CASES = {
    "rms_norm": (ops.rms_norm.default, lambda: (*_leaves(_randn(2, 3, 4), _randn(4, seed=1)), EPS)),
    "swiglu": (ops.swiglu.default, lambda: tuple(_leaves(_randn(2, 4), _randn(2, 4, seed=1)))),
    "rope": (ops.rope.default, lambda: tuple(_leaves(_randn(1, 2, 3, 4), *_cos_sin(3, 4), grad=(True, False, False)))),
    "attention": (ops.attention.default,
                  lambda: (*_leaves(_randn(1, 4, 3, 8), _randn(1, 2, 3, 8, seed=1), _randn(1, 2, 3, 8, seed=2)),
                           0.3, True)),
}


@pytest.mark.parametrize("name", list(OPCHECK_CASES))
def test_opcheck(name: str) -> None:
    """torch.library.opcheck: schema, fake tensor, autograd registration, aot_dispatch."""
    op, make_args = OPCHECK_CASES[name]
    torch.library.opcheck(op, make_args())
