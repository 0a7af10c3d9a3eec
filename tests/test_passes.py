"""The four fusion passes on small captured graphs: three tests each (STYLE.md item 5).

(a) structure: the pass fires, the expected number of graphllm op nodes appears, the pattern's ATen
    ops are gone, and the pass's counter and PassRecord say so;
(b) numerics: the graph after the pass against the graph before it, forward and gradients w.r.t.
    inputs and parameters, on random inputs (both GraphModules run directly, sharing parameters);
(c) must-not-fire: look-alike graphs the op does not compute are left untouched (same object, same code).

Tolerance policy (STYLE.md item 6):
- forward 0 (bitwise) where the op's kernel is the pattern's own arithmetic in the same order
  (rms_norm, swiglu, rope, SDPA-form attention);
- FP32_RTOL = 1e-5 for the eager attention form (matmul-softmax-matmul vs SDPA's kernel: fp32
  reduction order) and for every fp32 gradient (hand-written autograd rules vs autograd through the
  pattern: same math, another association order);
- BF16_RTOL = 2e-2 for bf16 gradients (the rules keep intermediates in fp32 that autograd rounds to
  bf16: 8 mantissa bits, ~4e-3 per rounding, a few roundings in a chain).
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from graphllm.capture import capture
from graphllm.models.llama import repeat_kv, rotate_half
from graphllm.passes import GraphPass, PassContext, PassRecord, run_passes
from graphllm.passes.fuse_attention import fuse_attention
from graphllm.passes.fuse_rms_norm import fuse_rms_norm
from graphllm.passes.fuse_rope import fuse_rope
from graphllm.passes.fuse_swiglu import fuse_swiglu
from graphllm.passes.manager import PASS_META_KEY
from hf_parity import rel_err

aten, gops = torch.ops.aten, torch.ops.graphllm

FP32_RTOL = 1e-5  # fp32 reduction/association order (eager attention vs SDPA; autograd rules vs autograd)
BF16_RTOL = 2e-2  # bf16: intermediates the rules keep in fp32 are rounded to bf16 by autograd
EPS = 1e-5
B, H, HKV, S, D = 2, 4, 2, 6, 8  # attention/rope shapes: [B, H, S, D], kv [B, HKV, S, D]


def _randn(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _run(p: GraphPass, gm: fx.GraphModule) -> tuple[fx.GraphModule, PassRecord, PassContext]:
    ctx = PassContext()
    out, (rec,) = run_passes(gm, [p], ctx)
    return out, rec, ctx


def _calls(gm: fx.GraphModule) -> Counter:
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def _op_nodes(gm: fx.GraphModule, op) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is op]


def _graphllm_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "namespace", "") == "graphllm"]


# ---------------------------------------------------------------- small modules in the captured forms

class RMSNorm(nn.Module):
    """The Llama form exactly (graphllm.models.llama.LlamaRMSNorm): fp32 upcast when x is not fp32."""

    def __init__(self, d: int, *, weight_shape: tuple[int, ...] | None = None, pow_exp: int = 2,
                 mean_dim: int = -1, return_var: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * _randn(*(weight_shape or (d,)), seed=7))
        self.eps, self.pow_exp, self.mean_dim, self.return_var = EPS, pow_exp, mean_dim, return_var

    def forward(self, x):
        dtype = x.dtype
        if dtype != torch.float32:
            x = x.to(torch.float32)
        var = x.pow(self.pow_exp).mean(self.mean_dim, keepdim=True)
        x = x * torch.rsqrt(var + self.eps)
        if dtype != torch.float32:
            x = x.to(dtype)
        out = self.weight * x
        return (out, var) if self.return_var else out


class TwoNorms(nn.Module):
    """Two pre-norm residual steps: x + lin(norm1(x)), then norm2 of that."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm1, self.norm2, self.lin = RMSNorm(d), RMSNorm(d), nn.Linear(d, d)

    def forward(self, x):
        return self.norm2(x + self.lin(self.norm1(x)))


class BF16Norm(nn.Module):
    """The Llama form on a bf16 activation with an fp32 weight (upcast → fp32 norm → cast back)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = RMSNorm(d)

    def forward(self, x):
        return self.norm(x.to(torch.bfloat16))


class BF16NormNoUpcast(nn.Module):
    """RMSNorm computed in bf16 (no fp32 upcast): not what the op computes."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        x = x.to(torch.bfloat16)
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


class MLP(nn.Module):
    def __init__(self, d: int, f: int, *, up_width: int | None = None, silu_twice: bool = False) -> None:
        super().__init__()
        self.gate, self.up = nn.Linear(d, f), nn.Linear(d, up_width or f)
        self.down, self.silu_twice = nn.Linear(f, d), silu_twice

    def forward(self, x):
        s = F.silu(self.gate(x))
        h = s * self.up(x)
        if self.silu_twice:
            h = h + s  # the silu result has a second user
        return self.down(h)


class Rope(nn.Module):
    """q and k rotated with shared cos/sin tables, as LlamaAttention does; rotation form selectable."""

    def __init__(self, rotate: Callable = rotate_half) -> None:
        super().__init__()
        self.rotate = rotate

    def forward(self, q, k, cos, sin):
        return q * cos + self.rotate(q) * sin, k * cos + self.rotate(k) * sin


def _rotate_at(split: int) -> Callable:
    return lambda x: torch.cat((-x[..., split:], x[..., :split]), dim=-1)


def _rotate_seq_dim(x):
    """rotate_half on the sequence dim (-2): slices and cat not on the last dim."""
    half = x.shape[-2] // 2
    return torch.cat((-x[..., half:, :], x[..., :half, :]), dim=-2)


def _rotate_shared(x):
    r = rotate_half(x)
    return r + 0 * r.sum()  # rotate_half's result has a second user


class SDPA(nn.Module):
    def __init__(self, *, causal: bool = True, dropout_p: float = 0.0, masked: bool = False) -> None:
        super().__init__()
        self.causal, self.dropout_p, self.masked = causal, dropout_p, masked

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout_p,
                                              is_causal=self.causal, enable_gqa=k.shape[1] != q.shape[1])


class EagerAttention(nn.Module):
    """HF eager attention: repeat_kv, matmul, * scale, + constant mask, fp32 softmax, matmul."""

    def __init__(self, *, mask: str | None = "causal", scale_form: str = "mul") -> None:
        super().__init__()
        self.mask, self.scale_form = mask, scale_form

    def forward(self, q, k, v, mask_in=None):
        Sq, Hq = q.shape[2], q.shape[1]
        k, v = repeat_kv(k, Hq // k.shape[1]), repeat_kv(v, Hq // v.shape[1])  # [B, H, Sk, D]
        if self.scale_form == "mul":
            scores = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5  # [B, H, Sq, Sk]
        else:
            scores = torch.matmul(q, k.transpose(2, 3)) / q.shape[-1] ** 0.5
        if self.mask == "causal":
            scores = scores + torch.full((Sq, Sq), torch.finfo(q.dtype).min, dtype=q.dtype).triu(1)
        elif self.mask == "triu2":  # a constant mask that also hides the first superdiagonal: not causal
            scores = scores + torch.full((Sq, Sq), torch.finfo(q.dtype).min, dtype=q.dtype).triu(2)
        elif self.mask == "input":
            scores = scores + mask_in
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v)


def _qkv(hkv: int = HKV, sk: int = S, sq: int = S) -> tuple[torch.Tensor, ...]:
    return _randn(B, H, sq, D), _randn(B, hkv, sk, D, seed=1), _randn(B, hkv, sk, D, seed=2)


def _cos_sin() -> tuple[torch.Tensor, torch.Tensor]:
    ang = _randn(1, 1, S, D // 2, seed=5)
    emb = torch.cat((ang, ang), dim=-1)  # [1, 1, S, D]
    return emb.cos(), emb.sin()


# ---------------------------------------------------------------- cases where the pass fires

@dataclass(frozen=True)
class Fires:
    pass_: GraphPass
    make: Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]
    op: object
    count: int
    gone: tuple  # ATen ops of the pattern that no longer appear
    fwd_rtol: float = 0.0
    grad_rtol: float = FP32_RTOL


FIRES = {
    "rms_norm_fp32": Fires(fuse_rms_norm, lambda: (TwoNorms(16), (_randn(2, 5, 16),)), gops.rms_norm.default, 2,
                           (aten.rsqrt.default, aten.pow.Tensor_Scalar, aten.mean.dim)),
    "rms_norm_bf16_upcast": Fires(fuse_rms_norm, lambda: (BF16Norm(16), (_randn(2, 5, 16),)),
                                  gops.rms_norm.default, 1,
                                  (aten.rsqrt.default, aten.pow.Tensor_Scalar, aten.mean.dim), grad_rtol=BF16_RTOL),
    "swiglu": Fires(fuse_swiglu, lambda: (MLP(8, 24), (_randn(2, 5, 8),)), gops.swiglu.default, 1,
                    (aten.silu.default,)),
    "rope": Fires(fuse_rope, lambda: (Rope(), (_randn(B, H, S, D), _randn(B, HKV, S, D, seed=1), *_cos_sin())),
                  gops.rope.default, 2, (aten.cat.default, aten.neg.default, aten.slice.Tensor)),
    "attention_sdpa_gqa_causal": Fires(fuse_attention, lambda: (SDPA(), _qkv()), gops.attention.default, 1,
                                       (aten.scaled_dot_product_attention.default,)),
    "attention_sdpa_mqa_full": Fires(fuse_attention, lambda: (SDPA(causal=False), _qkv(hkv=1)),
                                     gops.attention.default, 1, (aten.scaled_dot_product_attention.default,)),
    "attention_eager_gqa_causal": Fires(fuse_attention, lambda: (EagerAttention(), _qkv()), gops.attention.default, 1,
                                        (aten.softmax.int, aten.matmul.default, aten.expand.default, aten.triu.default),
                                        fwd_rtol=FP32_RTOL),
    "attention_eager_mha_nomask_div": Fires(fuse_attention,
                                            lambda: (EagerAttention(mask=None, scale_form="div"), _qkv(hkv=H)),
                                            gops.attention.default, 1, (aten.softmax.int, aten.matmul.default),
                                            fwd_rtol=FP32_RTOL),
}


@pytest.mark.parametrize("case", list(FIRES))
def test_fires_structure(case: str) -> None:
    c = FIRES[case]
    module, inputs = c.make()
    gm = capture(module, inputs)
    assert not _op_nodes(gm, c.op)
    before = len(gm.graph.nodes)
    out, rec, ctx = _run(c.pass_, gm)
    calls = _calls(out)
    assert calls[c.op] == c.count, f"{case}: {calls[c.op]} {c.op} nodes, want {c.count}"
    assert [n.target for n in _graphllm_nodes(out)] == [c.op] * c.count  # no other graphllm op appeared
    left = [op for op in c.gone if calls[op]]
    assert not left, f"{case}: pattern ops left after the pass: {left}"
    assert ctx.counters[c.pass_.name] == Counter(replaced=c.count)
    assert rec.counters == {"replaced": c.count} and rec.changed
    assert rec.nodes_before == before and rec.nodes_after == len(out.graph.nodes) <= before
    assert rec.added == c.count  # exactly one new node per fused pattern
    assert rec.nodes_after == rec.nodes_before + rec.added - rec.removed
    for n in _op_nodes(out, c.op):  # provenance stamp and fake value for later passes and dumps
        assert n.meta[PASS_META_KEY] == c.pass_.name
        assert isinstance(n.meta.get("val"), torch.Tensor)


@pytest.mark.parametrize("case", list(FIRES))
def test_fires_numerics(case: str, request: pytest.FixtureRequest) -> None:
    repro = f"reproduce: python -m pytest tests/test_passes.py -k '{request.node.name}'"
    c = FIRES[case]
    module, inputs = c.make()
    gm = capture(module, inputs)
    before = fx.GraphModule(gm, copy.deepcopy(gm.graph))  # shares gm's parameters
    after, _, _ = _run(c.pass_, gm)
    assert _op_nodes(after, c.op) and not _op_nodes(before, c.op)
    params = [p for _, p in after.named_parameters()]
    results = []
    for g in (before, after):
        xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        outs = g(*xs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        wrt = [x for x in xs if x.requires_grad] + params
        cot = [_randn(*o.shape, seed=11 + i).to(o.dtype) for i, o in enumerate(outs)]
        grads = torch.autograd.grad(outs, wrt, cot)
        results.append(([o.detach() for o in outs], grads))
    (out_b, grad_b), (out_a, grad_a) = results
    for i, (a, b) in enumerate(zip(out_a, out_b)):
        assert a.dtype == b.dtype and a.shape == b.shape
        if c.fwd_rtol == 0.0:
            assert torch.equal(a, b), f"{case} output {i} not bitwise equal (rel err {rel_err(a, b):.2e}); {repro}"
        else:
            err = rel_err(a.float(), b.float())
            assert err <= c.fwd_rtol, f"{case} output {i} rel err {err:.2e} > {c.fwd_rtol:g}; {repro}"
    assert len(grad_a) == len(grad_b) > 0
    for i, (a, b) in enumerate(zip(grad_a, grad_b)):
        assert a.dtype == b.dtype and a.shape == b.shape
        err = rel_err(a.float(), b.float())
        assert err <= c.grad_rtol, f"{case} gradient {i} rel err {err:.2e} > {c.grad_rtol:g}; {repro}"


def test_eager_attention_folds_repeat_kv_to_kv_heads() -> None:
    """repeat_kv (unsqueeze → expand → reshape) is folded back: the op gets k and v with HKV heads."""
    q, k, v = _qkv()
    gm = capture(EagerAttention(), (q, k, v))
    out, _, _ = _run(fuse_attention, gm)
    (node,) = _op_nodes(out, gops.attention.default)
    qn, kn, vn, scale, causal = node.args
    assert tuple(kn.meta["val"].shape) == tuple(vn.meta["val"].shape) == (B, HKV, S, D)
    assert kn.op == vn.op == "placeholder"  # the graph inputs themselves, not a repeated copy
    assert tuple(qn.meta["val"].shape) == (B, H, S, D)
    assert scale == pytest.approx(D**-0.5) and causal is True
    assert not _calls(out)[aten.reshape.default] and not _calls(out)[aten.expand.default]


def test_sdpa_gqa_keeps_kv_heads_and_scale() -> None:
    q, k, v = _qkv(hkv=1)
    gm = capture(SDPA(causal=False), (q, k, v))
    out, _, _ = _run(fuse_attention, gm)
    (node,) = _op_nodes(out, gops.attention.default)
    assert tuple(node.args[1].meta["val"].shape) == (B, 1, S, D)
    assert node.args[3] == pytest.approx(D**-0.5) and node.args[4] is False  # SDPA's default scale


def test_rms_norm_bf16_upcast_is_folded_into_the_op() -> None:
    """The fp32 upcast feeding only the norm disappears: the op takes the bf16 x and upcasts itself."""
    gm = capture(BF16Norm(16), (_randn(2, 5, 16),))
    out, _, _ = _run(fuse_rms_norm, gm)
    (node,) = _op_nodes(out, gops.rms_norm.default)
    assert node.args[0].meta["val"].dtype == torch.bfloat16 and node.args[2] == EPS
    assert node.meta["val"].dtype == torch.float32  # bf16 normalised x times the fp32 weight
    casts = [n for n in out.graph.nodes if n.target in (aten.to.dtype, aten._to_copy.default)]
    assert len(casts) == 1  # only the module's own fp32 → bf16 input cast is left


# ---------------------------------------------------------------- cases where the pass must not fire

NOT_FIRES = {
    # rms_norm
    "rms_norm_mean_not_last_dim": (fuse_rms_norm, lambda: (RMSNorm(16, mean_dim=1), (_randn(2, 5, 16),))),
    "rms_norm_pow3": (fuse_rms_norm, lambda: (RMSNorm(16, pow_exp=3), (_randn(2, 5, 16),))),
    "rms_norm_var_has_another_user": (fuse_rms_norm, lambda: (RMSNorm(16, return_var=True), (_randn(2, 5, 16),))),
    "rms_norm_2d_weight": (fuse_rms_norm, lambda: (RMSNorm(16, weight_shape=(5, 16)), (_randn(2, 5, 16),))),
    "rms_norm_in_bf16": (fuse_rms_norm, lambda: (BF16NormNoUpcast(16), (_randn(2, 5, 16),))),
    # swiglu
    "swiglu_broadcast": (fuse_swiglu, lambda: (MLP(8, 24, up_width=1), (_randn(2, 5, 8),))),
    "swiglu_silu_used_twice": (fuse_swiglu, lambda: (MLP(8, 24, silu_twice=True), (_randn(2, 5, 8),))),
    # rope
    "rope_split_not_at_half": (fuse_rope, lambda: (Rope(_rotate_at(D // 2 - 1)),
                                                   (_randn(B, H, S, D), _randn(B, HKV, S, D, seed=1), *_cos_sin()))),
    "rope_cat_on_seq_dim": (fuse_rope, lambda: (Rope(_rotate_seq_dim),
                                                (_randn(B, H, S, D), _randn(B, HKV, S, D, seed=1), *_cos_sin()))),
    "rope_rotated_has_another_user": (fuse_rope, lambda: (Rope(_rotate_shared),
                                                          (_randn(B, H, S, D), _randn(B, HKV, S, D, seed=1),
                                                           *_cos_sin()))),
    # attention
    "attention_sdpa_input_mask": (fuse_attention, lambda: (SDPA(causal=False), (*_qkv(), _randn(S, S, seed=3)))),
    "attention_sdpa_dropout": (fuse_attention, lambda: (SDPA(dropout_p=0.1), _qkv())),
    "attention_eager_input_mask": (fuse_attention, lambda: (EagerAttention(mask="input"),
                                                            (*_qkv(), _randn(S, S, seed=3)))),
    "attention_eager_triu2_mask": (fuse_attention, lambda: (EagerAttention(mask="triu2"), _qkv())),
    # a decode-like step: Sq=1 < Sk, so the [1, 1] "causal" mask is [[0]] and masks nothing; the op's
    # causal=True would hide keys 1.. (this fired before the square-scores check in fuse_attention._eager)
    "attention_eager_causal_sq1_sk4": (fuse_attention, lambda: (EagerAttention(), _qkv(sq=1, sk=4))),
}


# the op each look-alike still contains, so a refusal is the pass's decision, not a missing pattern
LOOK_ALIKE = {
    "fuse_rms_norm": (aten.rsqrt.default,),
    "fuse_swiglu": (aten.silu.default,),
    "fuse_rope": (aten.cat.default,),
    "fuse_attention": (aten.scaled_dot_product_attention.default, aten.softmax.int),
}


@pytest.mark.parametrize("case", list(NOT_FIRES))
def test_does_not_fire(case: str) -> None:
    p, make = NOT_FIRES[case]
    module, inputs = make()
    gm = capture(module, inputs)
    assert any(_calls(gm)[op] for op in LOOK_ALIKE[p.name]), f"{case}: the look-alike pattern was not captured"
    code, n_nodes = gm.code, len(gm.graph.nodes)
    out, rec, ctx = _run(p, gm)
    assert out is gm, "a pass with nothing to do returns the same object"
    assert not _graphllm_nodes(out), f"{case}: {p.name} fired: {[n.target for n in _graphllm_nodes(out)]}"
    assert out.code == code and len(out.graph.nodes) == n_nodes
    assert (rec.added, rec.removed, rec.counters) == (0, 0, {}) and not rec.changed
    assert p.name not in ctx.counters
