"""graphllm::attention_block (attention of query rows against one key block, with its log-sum-exp) against a
float64 brute-force reference, one query row at a time.

Covered: out and lse for causal, full, GQA, packed segments (rows that see no key: out 0, lse -inf) and Sq != Sk;
the ring-attention merge of two key blocks by the lse rule equals attention over the concatenated keys (a row
may see nothing in one block); gradients of a loss on both outputs (reference autograd, and gradcheck in
float64); the registered backward rule against autograd through the decomposition; fake/meta shapes, opcheck,
autocast, and an aot_eager torch.compile. The kernel and the backward rule in query chunks (QUERY_CHUNK shrunk so
small cases span several): equal to the dense math, and no intermediate larger than a chunk's scores.

Tolerance policy (STYLE.md item 6):
- FP32_VS_FP64_RTOL = 1e-5: the op computes in fp32 (scores, exp, the P·V and gradient matmuls), the reference in
  float64 on the same fp32 inputs; the gap is fp32 rounding accumulated over reductions of at most 12 terms;
- FP32_GRAD_RTOL = 1e-5: the hand-written backward rule is autograd's math in another association order;
- BF16_GRAD_RTOL = 2e-2: with bf16 inputs the rule keeps intermediates in fp32 where autograd rounds some to bf16;
- FP32_CHUNKED_RTOL = 1e-6: the kernel is the decomposition on chunks of query rows (a causal chunk without the
  keys after its last row); each row's math is the same, only GEMM blocking and reduction lengths differ;
- BF16_OUT_RTOL = 1e-2: a bf16 out whose fp32 value differs in the last fp32 bits may round one bf16 ulp apart.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import graphllm.ops  # noqa: F401  (registers torch.ops.graphllm)
from graphllm.ops.attention_block import attention_block_decomposed
from hf_parity import rel_err

ops = torch.ops.graphllm

FP32_VS_FP64_RTOL = 1e-5  # fp32 compute vs the float64 reference on the same inputs
FP32_GRAD_RTOL = 1e-5  # association order of the hand-written backward vs autograd through the decomposition
BF16_GRAD_RTOL = 2e-2  # bf16 rounding of intermediates autograd keeps in bf16 and the rule in fp32
FP32_CHUNKED_RTOL = 1e-6  # chunked kernel vs dense decomposition: same per-row math, other GEMM blocking
BF16_OUT_RTOL = 1e-2  # one bf16 ulp (2^-8) on the largest out element
SCALE = 0.35


def _repro(request: pytest.FixtureRequest) -> str:
    return f"reproduce: python -m pytest tests/test_attention_block.py -k '{request.node.name}'"


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def visible_of(q_seg, k_seg, causal: bool, b: int, s_q: int, s_k: int) -> torch.Tensor:
    """bool [B, Sq, Sk], True where query i may see key j (written apart from the op's own mask builder)."""
    vis = torch.ones(b, s_q, s_k, dtype=torch.bool)
    if causal:
        vis &= torch.arange(s_k)[None, :] <= torch.arange(s_q)[:, None]
    if q_seg is not None:
        vis &= q_seg[:, :, None] == k_seg[:, None, :]
    return vis


def reference(q, k, v, visible, scale):
    """float64, row by row: lse and softmax over the keys the row sees; a row that sees none gets 0 and -inf."""
    (b_n, h_n, s_q, _), group = q.shape, q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double(), v.double()
    outs, lses = [], []
    for b in range(b_n):
        for h in range(h_n):
            for i in range(s_q):
                keys = visible[b, i].nonzero().flatten()
                if len(keys) == 0:
                    outs.append(v.new_zeros(v.shape[-1]))
                    lses.append(v.new_tensor(float("-inf")))
                    continue
                s = k[b, h // group, keys] @ q[b, h, i] * scale  # [keys]
                lses.append(torch.logsumexp(s, 0))
                outs.append(torch.softmax(s, 0) @ v[b, h // group, keys])
    return torch.stack(outs).view(b_n, h_n, s_q, -1), torch.stack(lses).view(b_n, h_n, s_q)


# Batch 1's query 0 (segment 0) sees no key (all segment 1): a row with out 0, lse -inf.
Q_SEG = torch.tensor([[0, 0, 1, 1, 2], [0, 1, 1, 1, 1]])
K_SEG5 = torch.tensor([[0, 0, 1, 1, 2], [1, 1, 1, 1, 1]])
K_SEG6 = torch.tensor([[0, 1, 1, 1, 2, 2], [1, 1, 1, 1, 1, 1]])

CASES = {  # name: (H, Hkv, Sq, Sk, causal, segments)
    "causal": (4, 4, 5, 5, True, None),
    "full": (4, 4, 5, 5, False, None),
    "gqa_causal": (4, 2, 5, 5, True, None),
    "gqa_full": (4, 2, 5, 5, False, None),
    "segments_causal": (4, 2, 5, 5, True, (Q_SEG, K_SEG5)),
    "segments_full": (4, 2, 5, 6, False, (Q_SEG, K_SEG6)),
    "cross_lengths_full": (2, 1, 3, 7, False, None),
}


def _case(name: str, dtype=torch.float32):
    h, hkv, s_q, s_k, causal, seg = CASES[name]
    q, k, v = _randn(2, h, s_q, 8, dtype=dtype), _randn(2, hkv, s_k, 8, dtype=dtype, seed=1), \
        _randn(2, hkv, s_k, 8, dtype=dtype, seed=2)
    q_seg, k_seg = seg or (None, None)
    return (q, k, v, q_seg, k_seg), causal


def _check_lse(lse, want, rtol, msg):
    assert torch.equal(lse.isinf(), want.isinf()) and not lse.isnan().any(), msg
    assert (lse[lse.isinf()] < 0).all(), msg
    finite = want.isfinite()
    assert rel_err(lse[finite].double(), want[finite]) <= rtol, msg


def _loss(out, lse, seed=3):
    """A random projection of both outputs; lse's -inf rows are dropped (they carry no gradient)."""
    g_out = _randn(*out.shape, seed=seed).to(out.dtype)
    g_lse = _randn(*lse.shape, seed=seed + 1).to(lse.dtype)
    return (out * g_out).sum() + (lse.masked_fill(lse.isinf(), 0.0) * g_lse).sum()


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name: str, request) -> None:
    (q, k, v, q_seg, k_seg), causal = _case(name)
    out, lse = ops.attention_block(q, k, v, q_seg, k_seg, SCALE, causal)
    want_out, want_lse = reference(q, k, v, visible_of(q_seg, k_seg, causal, 2, q.shape[2], k.shape[2]), SCALE)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == q.shape[:-1] and lse.dtype == torch.float32
    err = rel_err(out.double(), want_out)
    assert err <= FP32_VS_FP64_RTOL, f"out rel err {err:.2e}; {_repro(request)}"
    _check_lse(lse, want_lse, FP32_VS_FP64_RTOL, _repro(request))
    assert (q_seg is not None) == bool(lse.isinf().any())  # the segment cases hold a row that sees nothing
    assert (out[lse.isinf()] == 0).all()


@pytest.mark.parametrize("name", list(CASES))
def test_grads_of_out_and_lse_match_reference(name: str, request) -> None:
    (q, k, v, q_seg, k_seg), causal = _case(name)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    got = torch.autograd.grad(_loss(*ops.attention_block(*leaves, q_seg, k_seg, SCALE, causal)), leaves)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    visible = visible_of(q_seg, k_seg, causal, 2, q.shape[2], k.shape[2])
    want = torch.autograd.grad(_loss(*reference(*ref_leaves, visible, SCALE)), ref_leaves)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == torch.float32 and not a.isnan().any(), f"grad {i}; {_repro(request)}"
        err = rel_err(a.double(), b)
        assert err <= FP32_VS_FP64_RTOL, f"grad {i} rel err {err:.2e}; {_repro(request)}"
    if q_seg is not None:  # the query row that sees no key gets no gradient
        assert (got[0][1, :, 0] == 0).all()


@pytest.mark.parametrize("name", ["gqa_causal", "segments_causal", "segments_full"])
def test_gradcheck_fp64(name: str) -> None:
    """Finite differences of (out, lse with its -inf rows zeroed) in float64, where the op computes in float64."""
    (q, k, v, q_seg, k_seg), causal = _case(name, dtype=torch.float64)
    q, k, v = (t[:1, :, :4].clone().requires_grad_() for t in (q, k, v))  # small: gradcheck is O(inputs)
    q_seg, k_seg = (None, None) if q_seg is None else (q_seg[1:, :4], k_seg[1:, :4])

    def fn(q, k, v):
        out, lse = ops.attention_block(q, k, v, q_seg, k_seg, SCALE, causal)
        return out, lse.masked_fill(lse.isinf(), 0.0)
    assert torch.autograd.gradcheck(fn, (q, k, v))


def _merge(o1, l1, o2, l2):
    """Ring attention's merge of two blocks' partial results by the log-sum-exp rule."""
    lse = torch.logaddexp(l1, l2)
    return o1 * torch.exp(l1 - lse)[..., None] + o2 * torch.exp(l2 - lse)[..., None], lse


@pytest.mark.parametrize("segments", [False, True], ids=["dense", "segments"])
def test_merging_two_key_blocks_equals_attention_over_both(segments: bool, request) -> None:
    """A ring step's shape: the queries are the second half of a 10-token sequence; block 1 is the first half's
    keys (all earlier: non-causal), block 2 the diagonal (causal). With segments, the samples of queries 2..4
    start in block 2, so those rows see nothing in block 1 (lse -inf there) and the merge must still be exact."""
    s = 5
    q, k, v = _randn(2, 4, s, 8), _randn(2, 2, 2 * s, 8, seed=1), _randn(2, 2, 2 * s, 8, seed=2)
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]])
    q_seg, k_seg = (seg[:, s:], seg) if segments else (None, None)
    visible = visible_of(q_seg, k_seg, False, 2, s, 2 * s) & (torch.arange(2 * s) <= torch.arange(s)[:, None] + s)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    q_, k_, v_ = leaves
    first = ops.attention_block(q_, k_[:, :, :s], v_[:, :, :s], q_seg, None if k_seg is None else k_seg[:, :s],
                                SCALE, False)
    second = ops.attention_block(q_, k_[:, :, s:], v_[:, :, s:], q_seg, None if k_seg is None else k_seg[:, s:],
                                 SCALE, True)
    assert segments == bool(first[1].isinf().any())
    out, lse = _merge(*first, *second)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    want_out, want_lse = reference(*ref_leaves, visible, SCALE)
    assert rel_err(out.detach().double(), want_out.detach()) <= FP32_VS_FP64_RTOL, _repro(request)
    _check_lse(lse.detach(), want_lse.detach(), FP32_VS_FP64_RTOL, _repro(request))
    got = torch.autograd.grad(_loss(out, lse), leaves)
    want = torch.autograd.grad(_loss(want_out, want_lse), ref_leaves)
    for i, (a, b) in enumerate(zip(got, want)):
        assert not a.isnan().any() and rel_err(a.double(), b) <= FP32_VS_FP64_RTOL, f"grad {i}; {_repro(request)}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["causal", "gqa_full", "segments_causal", "segments_full"])
def test_op_equals_decomposition(name: str, dtype: torch.dtype, request) -> None:
    """The kernel and the registered backward rule vs autograd through the decomposition (what inductor runs)."""
    (q, k, v, q_seg, k_seg), causal = _case(name, dtype=dtype)
    _check_op_against_decomposition(q, k, v, q_seg, k_seg, causal, request)


def _check_op_against_decomposition(q, k, v, q_seg, k_seg, causal, request) -> None:
    dtype = q.dtype
    a = [t.clone().requires_grad_() for t in (q, k, v)]
    b = [t.clone().requires_grad_() for t in (q, k, v)]
    out_a, lse_a = ops.attention_block(*a, q_seg, k_seg, SCALE, causal)
    out_b, lse_b = attention_block_decomposed(*b, q_seg, k_seg, SCALE, causal)
    out_rtol = FP32_CHUNKED_RTOL if dtype == torch.float32 else BF16_OUT_RTOL
    err = rel_err(out_a.detach().float(), out_b.detach().float())
    assert err <= out_rtol, f"out rel err {err:.2e} > {out_rtol:g}; {_repro(request)}"
    _check_lse(lse_a.detach(), lse_b.detach().double(), FP32_CHUNKED_RTOL, _repro(request))
    rtol = FP32_GRAD_RTOL if dtype == torch.float32 else BF16_GRAD_RTOL
    for i, (x, y) in enumerate(zip(torch.autograd.grad(_loss(out_a, lse_a), a),
                                   torch.autograd.grad(_loss(out_b, lse_b), b))):
        assert x.dtype == dtype and not x.isnan().any() and not y.isnan().any(), f"grad {i}; {_repro(request)}"
        err = rel_err(x.float(), y.float())
        assert err <= rtol, f"grad {i} rel err {err:.2e} > {rtol:g}; {_repro(request)}"


def test_grad_of_one_output_only() -> None:
    """Autograd hands the rule a zero (or no) gradient for the unused output: lse alone, then out alone."""
    (q, k, v, q_seg, k_seg), causal = _case("segments_causal")
    for pick in (1, 0):
        a = [t.clone().requires_grad_() for t in (q, k, v)]
        b = [t.clone().requires_grad_() for t in (q, k, v)]
        ya = ops.attention_block(*a, q_seg, k_seg, SCALE, causal)[pick]
        yb = attention_block_decomposed(*b, q_seg, k_seg, SCALE, causal)[pick]
        for x, y in zip(torch.autograd.grad(ya.masked_fill(ya.isinf(), 0).sum(), a),
                        torch.autograd.grad(yb.masked_fill(yb.isinf(), 0).sum(), b, materialize_grads=True)):
            assert (x == y).all() if not y.any() else rel_err(x, y) <= FP32_GRAD_RTOL  # lse: dv is 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["gqa_causal", "segments_full"])
def test_fake_and_meta_match_real(name: str, dtype: torch.dtype) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    (q, k, v, q_seg, k_seg), causal = _case(name, dtype=dtype)
    real = ops.attention_block(q, k, v, q_seg, k_seg, SCALE, causal)
    with FakeTensorMode() as mode:
        fake = ops.attention_block(*(None if t is None else mode.from_tensor(t) for t in (q, k, v, q_seg, k_seg)),
                                   SCALE, causal)
    meta = ops.attention_block(*(None if t is None else t.to("meta") for t in (q, k, v, q_seg, k_seg)), SCALE, causal)
    for outs in (fake, meta):
        for got, want in zip(outs, real):
            assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous()
    assert real[1].dtype == torch.float32


@pytest.mark.parametrize("name", ["gqa_causal", "segments_causal"])
def test_opcheck(name: str) -> None:
    """torch.library.opcheck: schema, fake tensor, autograd registration, aot_dispatch."""
    (q, k, v, q_seg, k_seg), causal = _case(name)
    torch.library.opcheck(ops.attention_block.default,
                          (*(t.clone().requires_grad_() for t in (q, k, v)), q_seg, k_seg, SCALE, causal))


def test_autocast_runs_bf16_and_keeps_lse_fp32() -> None:
    (q, k, v, q_seg, k_seg), causal = _case("segments_causal")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, lse = ops.attention_block(q, k, v, q_seg, k_seg, SCALE, causal)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32


def test_aot_eager_compile_matches_eager() -> None:
    (q, k, v, q_seg, k_seg), causal = _case("segments_causal")

    g_out, g_lse = _randn(*q.shape, seed=3), _randn(*q.shape[:-1], seed=4)

    def step(q, k, v):
        out, lse = ops.attention_block(q, k, v, q_seg, k_seg, SCALE, causal)
        return (out * g_out).sum() + (lse.masked_fill(lse.isinf(), 0.0) * g_lse).sum()
    a = [t.clone().requires_grad_() for t in (q, k, v)]
    b = [t.clone().requires_grad_() for t in (q, k, v)]
    want = step(*a)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(*b)  # the op stays one node: no graph break
    assert torch.equal(got, want)
    for x, y in zip(torch.autograd.grad(got, b), torch.autograd.grad(want, a)):
        assert torch.equal(x, y)


def test_one_segment_tensor_alone_is_refused() -> None:
    (q, k, v, q_seg, _), causal = _case("segments_causal")
    with pytest.raises(ValueError, match="both q_segment and k_segment or neither"):
        ops.attention_block(q, k, v, q_seg, None, SCALE, causal)


# -- the kernel and the backward rule in query chunks --------------------------------------------------------------
SMALL_CHUNK = 3  # 11 query rows: chunks [0, 3) [3, 6) [6, 9) [9, 11), the last one short
Q_SEG11 = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2], [0, 0, 1, 1, 1, 1, 3, 3, 3, 3, 3]])
# batch 1's keys hold no segment 3: its query rows 6..10 (the last two chunks) see nothing
K_SEG11 = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2], [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
K_SEG13 = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
CHUNKED_CASES = {  # name: (H, Hkv, Sq, Sk, causal, segments)
    "causal_gqa": (4, 2, 11, 11, True, None),
    "full": (4, 4, 11, 11, False, None),
    "causal_more_keys": (2, 1, 11, 13, True, None),  # causal chunks skip the keys after their last row
    "segments_causal_gqa": (4, 2, 11, 11, True, (Q_SEG11, K_SEG11)),
    "segments_full_gqa": (4, 2, 11, 13, False, (Q_SEG11, K_SEG13)),
}


@pytest.fixture
def small_chunk(monkeypatch):
    """QUERY_CHUNK = SMALL_CHUNK for the test (the module, not graphllm.ops.attention_block: that name is the op)."""
    module = importlib.import_module("graphllm.ops.attention_block")
    monkeypatch.setattr(module, "QUERY_CHUNK", SMALL_CHUNK)
    return module


def _chunked_case(name: str, dtype=torch.float32):
    h, hkv, s_q, s_k, causal, seg = CHUNKED_CASES[name]
    q, k, v = (_randn(2, n, s, 8, dtype=dtype, seed=i) for i, (n, s) in enumerate([(h, s_q), (hkv, s_k), (hkv, s_k)]))
    q_seg, k_seg = seg or (None, None)
    return (q, k, v, q_seg, k_seg), causal


@pytest.mark.parametrize("name", list(CHUNKED_CASES))
def test_chunked_matches_reference(name: str, small_chunk, request) -> None:
    (q, k, v, q_seg, k_seg), causal = _chunked_case(name)
    assert len(small_chunk.row_chunks(q.shape[2], k.shape[2], causal)) == 4
    visible = visible_of(q_seg, k_seg, causal, 2, q.shape[2], k.shape[2])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = ops.attention_block(*leaves, q_seg, k_seg, SCALE, causal)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    want_out, want_lse = reference(*ref_leaves, visible, SCALE)
    err = rel_err(out.detach().double(), want_out.detach())
    assert err <= FP32_VS_FP64_RTOL, f"out rel err {err:.2e}; {_repro(request)}"
    _check_lse(lse.detach(), want_lse.detach(), FP32_VS_FP64_RTOL, _repro(request))
    assert (q_seg is not None) == bool(lse.isinf().any()) and (out[lse.isinf()] == 0).all()
    got = torch.autograd.grad(_loss(out, lse), leaves)
    want = torch.autograd.grad(_loss(want_out, want_lse), ref_leaves)
    for i, (a, b) in enumerate(zip(got, want)):
        err = rel_err(a.double(), b)
        assert not a.isnan().any() and err <= FP32_VS_FP64_RTOL, f"grad {i} rel err {err:.2e}; {_repro(request)}"
    if q_seg is not None:  # batch 1's rows 6..10 see nothing: no gradient
        assert (got[0][1, :, 6:] == 0).all(), _repro(request)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CHUNKED_CASES))
def test_chunked_equals_dense_decomposition(name: str, dtype: torch.dtype, small_chunk, request) -> None:
    (q, k, v, q_seg, k_seg), causal = _chunked_case(name, dtype=dtype)
    _check_op_against_decomposition(q, k, v, q_seg, k_seg, causal, request)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_chunked_intermediates_are_chunk_sized(causal: bool, small_chunk) -> None:
    """The point of the chunks: neither the kernel nor the backward rule makes a [B, H, Sq, Sk] tensor. Shapes
    where the scores outsize every input and output (D = 2), so the largest traced tensor is the scores."""
    from torch.fx.experimental.proxy_tensor import make_fx

    b, h, s_q, s_k = 1, 2, 12, 40
    q, k, v = _randn(b, h, s_q, 2), _randn(b, 1, s_k, 2, seed=1), _randn(b, 1, s_k, 2, seed=2)
    q_seg, k_seg = torch.arange(s_q)[None] // 4, torch.arange(s_k)[None] // 10
    lse, g_out, g_lse = _randn(b, h, s_q), _randn(b, h, s_q, 2, seed=3), _randn(b, h, s_q, seed=4)

    def largest(fn, *args) -> int:
        graph = make_fx(fn, tracing_mode="fake")(*args).graph
        return max(n.meta["val"].numel() for n in graph.nodes if isinstance(n.meta.get("val"), torch.Tensor))

    def forward(q, k, v, q_seg, k_seg):
        return small_chunk.attention_block_chunked(q, k, v, q_seg, k_seg, SCALE, causal)

    def backward(q, k, v, q_seg, k_seg, lse, g_out, g_lse):
        return small_chunk.attention_block_grads_chunked(q, k, v, q_seg, k_seg, lse, g_out, g_lse, SCALE, causal)

    def dense(q, k, v, q_seg, k_seg):
        return attention_block_decomposed(q, k, v, q_seg, k_seg, SCALE, causal)

    assert largest(dense, q, k, v, q_seg, k_seg) == b * h * s_q * s_k  # the check sees the dense scores
    assert largest(forward, q, k, v, q_seg, k_seg) <= b * h * SMALL_CHUNK * s_k
    assert largest(backward, q, k, v, q_seg, k_seg, lse, g_out, g_lse) <= b * h * SMALL_CHUNK * s_k


def test_chunked_opcheck(small_chunk) -> None:
    """Schema, fake tensor and aot_dispatch with the chunked kernel and rule (the rule's in-place dk/dv sums)."""
    (q, k, v, q_seg, k_seg), causal = _chunked_case("segments_causal_gqa")
    torch.library.opcheck(ops.attention_block.default,
                          (*(t.clone().requires_grad_() for t in (q, k, v)), q_seg, k_seg, SCALE, causal))
