"""The npu lowering run on CPU against emulated torch_npu kernels (exact schemas from the wheel):
per op and on the whole tiny-llama step, forward and backward equal the unlowered graph."""

from __future__ import annotations

import pytest
import torch

import graphllm
import npu_emulation  # noqa: F401  (registers torch.ops.npu.* emulations)
from graphllm.backends import Backend, eager_graph_compiler, register_backend, unregister_backend
from graphllm.ops import lowering_npu
from graphllm.ops.attention import attention_decomposed
from graphllm.ops.lowering import lowering_table
from graphllm.ops.rms_norm import rms_norm_decomposed
from graphllm.ops.rope import rope_decomposed
from graphllm.ops.swiglu import swiglu_decomposed
from hf_parity import rel_err



@pytest.fixture(autouse=True, scope="module")
def npu_emulation_backend():
    """A test-only backend while this module runs: the npu lowering table on eager aot graphs."""
    register_backend(Backend(name="npu-emulation", lowering="npu", graph_compiler=eager_graph_compiler,
                             description="test only: npu lowering, emulated kernels, eager aot graphs"))
    yield
    unregister_backend("npu-emulation")


# fp32: the emulated kernels reorder sums and products (e.g. softmax as exp/sum, weight applied in fp32)
FP32_RTOL = 1e-5


def _randn(*shape, seed=0, requires_grad=True):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return t.requires_grad_(requires_grad)


def _compare(lowered, reference, inputs):
    out, ref = lowered(*inputs), reference(*inputs)
    assert rel_err(out.detach(), ref.detach()) <= FP32_RTOL
    grad = torch.randn_like(ref)
    tensors = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    g_low = torch.autograd.grad(out, tensors, grad)
    g_ref = torch.autograd.grad(ref, tensors, grad)
    for a, b in zip(g_low, g_ref):
        assert rel_err(a, b) <= FP32_RTOL


def test_rms_norm_lowering():
    _compare(lowering_npu.rms_norm_npu, rms_norm_decomposed, (_randn(2, 5, 16), _randn(16, seed=1), 1e-5))


def test_add_rms_norm_lowering():
    from graphllm.ops.add_rms_norm import add_rms_norm_decomposed

    def first(fn):
        return lambda *a: torch.stack(fn(*a))  # both outputs, so both gradients are compared
    _compare(first(lowering_npu.add_rms_norm_npu), first(add_rms_norm_decomposed),
             (_randn(2, 5, 16), _randn(2, 5, 16, seed=4), _randn(16, seed=1), 1e-5))


def test_swiglu_lowering():
    _compare(lowering_npu.swiglu_npu, swiglu_decomposed, (_randn(2, 5, 24), _randn(2, 5, 24, seed=1)))


def test_rope_lowering():
    cos, sin = _randn(1, 1, 6, 8, seed=2, requires_grad=False), _randn(1, 1, 6, 8, seed=3, requires_grad=False)
    _compare(lowering_npu.rope_npu, rope_decomposed, (_randn(2, 4, 6, 8), cos, sin))


@pytest.mark.parametrize("hkv", [4, 2, 1])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_lowering(hkv, causal):
    q, k, v = _randn(2, 4, 6, 8), _randn(2, hkv, 6, 8, seed=1), _randn(2, hkv, 6, 8, seed=2)
    _compare(lowering_npu.attention_npu, attention_decomposed, (q, k, v, 0.3, causal))


def test_table_uses_every_kernel():
    table = lowering_table("npu")
    assert {fn.__name__ for fn in table.values()} == {"rms_norm_npu", "add_rms_norm_npu", "swiglu_npu", "rope_npu",
                                                     "attention_npu", "grouped_matmul_npu", "matmul_all_reduce_npu", "rope_qk_npu",
                                                     "all_gather_matmul_npu", "matmul_reduce_scatter_npu",
                                                     "varlen_attention_npu", "attention_block_npu",
                                                     "window_attention_npu",
                                                     "lora_linear_decomposed",  # torch_npu has no LoRA kernel
                                                     # the fused LM-head loss: see ops/lowering_npu.py
                                                     "linear_cross_entropy_decomposed",
                                                     "linear_cross_entropy_parts_decomposed",
                                                     "nf4_dequantize_recomputed",  # nor an NF4 one (ops/nf4.py)
                                                     # their kernels lack GE converters (ops/lowering_npu_moe.py)
                                                     "moe_permute_decomposed", "moe_unpermute_decomposed",
                                                     "router_stat_decomposed",  # markers: nothing to run
                                                     "ahead_decomposed", "token_mean_decomposed"}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tiny_llama_step_lowered_for_npu_matches_unlowered(attn):
    ids = torch.randint(0, 8000, (2, 32), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 8000, (2, 32), generator=torch.Generator().manual_seed(1))
    losses, grads = {}, {}
    for backend in ("eager", "npu-emulation"):
        model = graphllm.load_model("tiny-llama", seed=0, attn_implementation=attn)
        compiled = graphllm.compile(model, ids, labels, backend=backend)
        loss = compiled(ids, labels)
        loss.backward()
        losses[backend], grads[backend] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
        if backend == "npu-emulation":
            called = {n.target.__name__ for n in compiled.result.lowered_graph.graph.nodes if n.op == "call_function"}
            assert {"rms_norm_npu", "add_rms_norm_npu", "swiglu_npu", "rope_npu", "attention_npu"} <= called
    assert rel_err(losses["npu-emulation"], losses["eager"]) <= FP32_RTOL
    for name, g in grads["eager"].items():
        assert rel_err(grads["npu-emulation"][name], g) <= FP32_RTOL, name


def test_a_wrong_lowering_is_caught(monkeypatch):
    """The emulation is strict enough to catch layout mistakes: claiming BSND for BNSD tensors."""
    def wrong(q, k, v, scale, causal):
        mask = torch.ones(2048, 2048, dtype=torch.bool).triu(1)
        return torch.ops.npu.npu_fusion_attention(q, k, v, head_num=q.shape[1], input_layout="BSND",
                                                  atten_mask=mask, scale=scale, sparse_mode=2)[0]

    q, k, v = _randn(2, 4, 6, 8), _randn(2, 2, 6, 8, seed=1), _randn(2, 2, 6, 8, seed=2)
    with pytest.raises(ValueError, match="head_num"):
        wrong(q, k, v, 0.3, True)
    with pytest.raises(ValueError, match="compressed 2048"):  # a per-sequence mask with sparse_mode 2
        torch.ops.npu.npu_fusion_attention(q, k, v, head_num=4, input_layout="BNSD",
                                           atten_mask=torch.ones(6, 6, dtype=torch.bool).triu(1), scale=0.3,
                                           sparse_mode=2)


def test_missing_kernel_falls_back_to_decomposition_with_a_warning(monkeypatch):
    from graphllm.ops import lowering

    op = torch.ops.graphllm.swiglu.default
    monkeypatch.setitem(lowering.NPU_KERNELS, op, lowering.NpuKernel("npu_swiglu_from_the_future", "absent"))
    with pytest.warns(UserWarning, match="torch_npu has no npu_swiglu_from_the_future"):
        table = lowering_table("npu")
    assert table[op] is swiglu_decomposed
    assert table[torch.ops.graphllm.rms_norm.default] is lowering_npu.rms_norm_npu


def test_grouped_matmul_lowering():
    """npu_grouped_matmul (one x, one [G, K, N] weight, counts as group_list) vs graphllm's grouped_matmul,
    forward and backward, with an empty group; its dweight is graphllm's masked contraction."""
    sizes = torch.tensor([3, 0, 5, 2])
    x, w = _randn(10, 16), _randn(4, 16, 12, seed=1)
    _compare(lowering_npu.grouped_matmul_npu, torch.ops.graphllm.grouped_matmul, (x, w, sizes))


def test_rope_qk_lowering_for_inference_and_training():
    """Without gradients one npu_apply_rotary_pos_emb (BSND copies, [B,S,1,D] tables); with gradients two
    npu_rotary_mul. Both equal the decomposition; the pair_rope pass pairs each layer's q and k."""
    from graphllm.ops.rope import rope_qk_decomposed

    q, k = _randn(2, 4, 6, 64, requires_grad=False), _randn(2, 2, 6, 64, seed=1, requires_grad=False)
    cos, sin = _randn(1, 1, 6, 64, seed=2, requires_grad=False), _randn(1, 1, 6, 64, seed=3, requires_grad=False)
    for got, want in zip(lowering_npu.rope_qk_npu(q, k, cos, sin), rope_qk_decomposed(q, k, cos, sin)):
        assert got.shape == want.shape and rel_err(got, want) <= FP32_RTOL

    def both(fn):
        return lambda q, k, cos, sin: torch.cat([t.flatten() for t in fn(q, k, cos, sin)])
    _compare(both(lowering_npu.rope_qk_npu), both(rope_qk_decomposed),
             (q.clone().requires_grad_(), k.clone().requires_grad_(), cos, sin))


def test_pair_rope_pass_on_tiny_llama():
    from graphllm.passes import default_passes
    from graphllm.passes.pair_rope import pair_rope

    ids = torch.randint(0, 8000, (1, 16), generator=torch.Generator().manual_seed(0))
    model = graphllm.load_model("tiny-llama", seed=0)
    ref = model(ids)
    compiled = graphllm.compile(model, ids, passes=default_passes() + [pair_rope], backend="npu-emulation")
    nodes = [n.target for n in compiled.result.model_graph.graph.nodes if n.op == "call_function"]
    assert nodes.count(torch.ops.graphllm.rope_qk.default) == 4 and torch.ops.graphllm.rope.default not in nodes
    with torch.no_grad():
        assert rel_err(compiled(ids), ref) <= FP32_RTOL


def _attention_block_case(hkv, causal, segments):
    """q [2, 4, 5, 8] against a block of 6 keys; with segments, batch 1's query 0 sees no key of the block."""
    q, k, v = _randn(2, 4, 5, 8), _randn(2, hkv, 6, 8, seed=1), _randn(2, hkv, 6, 8, seed=2)
    if not segments:
        return q, k, v, None, None
    q_seg, k_seg = torch.tensor([[0, 0, 1, 1, 2], [0, 1, 1, 1, 1]]), torch.tensor([[0, 1, 1, 1, 1, 2], [1] * 6])
    return q, k, v, q_seg, k_seg


@pytest.mark.parametrize("segments", [False, True], ids=["dense", "segments"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("hkv", [4, 2])
def test_attention_block_lowering(hkv, causal, segments):
    """npu_fusion_attention's out and lse (softmax_max + log softmax_sum) equal the decomposition's, rows that see
    no key included (out 0, lse -inf); gradients of a loss on both outputs agree and hold no NaN."""
    from graphllm.ops.attention_block import attention_block_decomposed

    inputs = _attention_block_case(hkv, causal, segments)
    (out, lse), (ref_out, ref_lse) = (fn(*inputs, 0.3, causal) for fn in (lowering_npu.attention_block_npu,
                                                                         attention_block_decomposed))
    assert rel_err(out.detach(), ref_out.detach()) <= FP32_RTOL
    assert torch.equal(lse.isinf(), ref_lse.isinf()) and (lse.isinf().any() == segments)
    finite = ref_lse.isfinite()
    assert rel_err(lse.detach()[finite], ref_lse.detach()[finite]) <= FP32_RTOL
    g_out, g_lse = torch.randn_like(ref_out), torch.randn_like(ref_lse)

    def loss(o, l):
        return (o * g_out).sum() + (l.masked_fill(~finite, 0.0) * g_lse).sum()
    g_low = torch.autograd.grad(loss(out, lse), inputs[:3])
    g_ref = torch.autograd.grad(loss(ref_out, ref_lse), inputs[:3])
    for a, b in zip(g_low, g_ref):
        assert not a.isnan().any() and rel_err(a, b) <= FP32_RTOL


def test_attention_block_lowering_in_a_compiled_step():
    """The npu table's attention_block under the npu-emulation backend (Dynamo traces _AttentionBlockNpu's forward
    and backward): the graph calls the kernel, and values and gradients equal the eager op's."""
    class Step(torch.nn.Module):
        def forward(self, q, k, v, q_seg, k_seg):
            out, lse = torch.ops.graphllm.attention_block(q, k, v, q_seg, k_seg, 0.3, True)
            return out.sum() + lse.masked_fill(lse.isinf(), 0.0).sum()

    inputs = _attention_block_case(2, True, True)
    want = Step()(*inputs)
    want_grads = torch.autograd.grad(want, inputs[:3])
    compiled = graphllm.compile(Step(), inputs, backend="npu-emulation")
    got = compiled(*inputs)
    called = {n.target.__name__ for n in compiled.result.lowered_graph.graph.nodes if n.op == "call_function"}
    assert "attention_block_npu" in called
    assert rel_err(got.detach(), want.detach()) <= FP32_RTOL
    for a, b in zip(torch.autograd.grad(got, inputs[:3]), want_grads):
        assert rel_err(a, b) <= FP32_RTOL


def test_emulated_fusion_attention_rejects_a_3d_mask():
    """sparse_mode 0 takes BNSS, B1SS, 11SS or SS masks; [B, Sq, Sk] would broadcast B over the heads."""
    q, k = _randn(2, 2, 4, 8), _randn(2, 2, 4, 8, seed=1)
    with pytest.raises(ValueError, match="BNSS, B1SS, 11SS or SS"):
        torch.ops.npu.npu_fusion_attention(q, k, k, head_num=2, input_layout="BNSD",
                                           atten_mask=torch.zeros(2, 4, 4, dtype=torch.bool), scale=0.3)
