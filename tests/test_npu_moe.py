"""The npu lowering of the MoE ops on CPU against emulated torch_npu kernels (graphllm.preflight.npu_kernels_moe):
moe_permute / moe_unpermute on npu_moe_token_permute / unpermute (written, not wired: no GE converter in torchair
2.13), grouped_matmul's tail rule on npu_grouped_matmul, and a tiny MoE model's npu train graphs through the
pre-flight."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import npu_emulation  # noqa: F401  (registers torch.ops.npu.* emulations)
from graphllm.ops.lowering import lowering_table
from graphllm.ops.lowering_npu import grouped_matmul_npu
from graphllm.ops.lowering_npu_moe import moe_permute_npu, moe_unpermute_npu
from graphllm.ops.moe_dispatch import moe_permute_decomposed, moe_unpermute_decomposed
from graphllm.preflight.check import BLOCKING, CONDITIONAL, FUSED, MISSING, check_graph
from graphllm.preflight.converters import converter_index
from hf_parity import rel_err

gl, NPU = torch.ops.graphllm, torch.ops.npu
FP32_RTOL = 1e-5  # fp32: the lowerings sum the k pairs in another order (and the emulated unpermute in fp32)
T, K, H, TOP_K = 6, 16, 8, 2
# (first_expert, num_experts) of the ids drawn from 0..7: all of them, or one rank's 3 experts 2..4 (a tail)
RANGES = {"all": (0, 8), "tail": (2, 3)}


def _randn(*shape, seed=0, requires_grad=True):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(requires_grad)


def _ids(seed=5):
    """[T, k] distinct expert ids per token in 0..7, as a top-k gives them."""
    return torch.rand(T, 8, generator=torch.Generator().manual_seed(seed)).topk(TOP_K, dim=-1).indices


def _grads(out, tensors, grad):
    return torch.autograd.grad(out, tensors, grad)


@pytest.mark.parametrize("rng", list(RANGES))
def test_moe_permute_lowering(rng):
    first, n = RANGES[rng]
    x, ids = _randn(T, H), _ids()
    if rng == "tail":
        local = (ids >= first) & (ids < first + n)
        assert local.any() and not local.all(), "the case must have pairs in range and pairs in the tail"
    got, want = moe_permute_npu(x, ids, first, n), gl.moe_permute(x, ids, first, n)
    for a, b in zip(got, want):  # x_sorted, order, group_sizes: a permutation and counts, exact
        assert a.dtype == b.dtype and torch.equal(a.detach(), b.detach())
    g = torch.randn_like(want[0])
    assert rel_err(_grads(got[0], x, g)[0], _grads(want[0], x, g)[0]) <= FP32_RTOL


@pytest.mark.parametrize("rng", list(RANGES))
def test_moe_unpermute_lowering(rng):
    """y with its tail rows zero, as grouped_matmul leaves them; gradients for y and the routing weights."""
    first, n = RANGES[rng]
    _, order, sizes = moe_permute_decomposed(_randn(T, H, requires_grad=False), _ids(), first, n)
    y = _randn(T * TOP_K, H, seed=1, requires_grad=False)
    y[int(sizes.sum()):] = 0
    y.requires_grad_()
    weights = _randn(T, TOP_K, seed=2).softmax(-1).detach().requires_grad_()
    got, want = moe_unpermute_npu(y, order, weights), gl.moe_unpermute(y, order, weights)
    assert rel_err(got.detach(), want.detach()) <= FP32_RTOL
    g = torch.randn_like(want)
    for a, b in zip(_grads(got, (y, weights), g), _grads(want, (y, weights), g)):
        assert rel_err(a, b) <= FP32_RTOL


def test_grouped_matmul_lowering_zeroes_the_tail():
    """Sizes summing to fewer than T rows: the tail comes out zero and gets no gradient (graphllm's rule), although
    the kernel's group list must cover every row (the emulation refuses a shorter one)."""
    sizes = torch.tensor([3, 0, 4])  # 7 of 10 rows
    x, w = _randn(10, K), _randn(3, K, H, seed=1)
    got, want = grouped_matmul_npu(x, w, sizes), gl.grouped_matmul(x, w, sizes)
    assert not got[7:].detach().any() and rel_err(got.detach(), want.detach()) <= FP32_RTOL
    g = torch.randn_like(want)
    got_grads, want_grads = _grads(got, (x, w), g), _grads(want, (x, w), g)
    assert not got_grads[0][7:].any()
    for a, b in zip(got_grads, want_grads):
        assert rel_err(a, b) <= FP32_RTOL
    with pytest.raises(ValueError, match="sum to x's rows"):
        NPU.npu_grouped_matmul([x.detach()], [w.detach()], group_list=sizes, split_item=3, group_type=0,
                               group_list_type=1)


def test_moe_block_with_a_tail_matches_the_ops():
    """One expert-parallel rank's block (experts 2..4 of 8): permute, grouped matmul, unpermute, all lowered, against
    graphllm's ops; gradients for the tokens, the expert weights and the routing weights."""
    first, n = RANGES["tail"]
    x, w, ids = _randn(T, K), _randn(n, K, H, seed=1), _ids()
    weights = _randn(T, TOP_K, seed=2).softmax(-1).detach().requires_grad_()

    def block(permute, gmm, unpermute):
        x_sorted, order, sizes = permute(x, ids, first, n)
        return unpermute(gmm(x_sorted, w, sizes), order, weights)
    got = block(moe_permute_npu, grouped_matmul_npu, moe_unpermute_npu)
    want = block(gl.moe_permute, gl.grouped_matmul, gl.moe_unpermute)
    assert rel_err(got.detach(), want.detach()) <= FP32_RTOL
    g = torch.randn_like(want)
    for a, b in zip(_grads(got, (x, w, weights), g), _grads(want, (x, w, weights), g)):
        assert rel_err(a, b) <= FP32_RTOL


def test_emulated_permute_follows_the_documented_mapping():
    """torch_npu's docs: permuted_tokens[sorted_indices[i]] = tokens[i // k]; rows sorted by index, stably."""
    tokens, ids = _randn(T, H, requires_grad=False), _ids()
    permuted, sorted_indices = NPU.npu_moe_token_permute(tokens, ids)
    assert sorted_indices.dtype == torch.int32
    si = sorted_indices.long()
    assert torch.equal(permuted[si], tokens.repeat_interleave(TOP_K, dim=0))
    pair_of_row = torch.empty_like(si).scatter_(0, si, torch.arange(si.numel()))
    key = ids.reshape(-1)[pair_of_row] * si.numel() + pair_of_row  # by index, then by pair: strictly increasing
    assert bool((key.diff() > 0).all())
    with pytest.raises(ValueError, match="permutation"):
        NPU.npu_moe_token_unpermute(permuted, torch.zeros_like(sorted_indices), probs=torch.ones(T, TOP_K))


def test_moe_lowerings_trace_to_ops_torchair_converts_but_the_kernels_lack_converters():
    """Forward and backward of the three lowerings, through the pre-flight's classification: every ATen op converts,
    the tail's included (no repeat_interleave, _assert_async or index_copy, whose converters are stubs). The token
    kernels themselves have no converter in this torch_npu, which is why the npu table keeps the decompositions."""
    first, n = RANGES["tail"]
    x, w, ids = _randn(T, K), _randn(n, K, H, seed=1), _ids()
    weights = _randn(T, TOP_K, seed=2).softmax(-1).detach().requires_grad_()

    def step(x, w, weights, g):
        x_sorted, order, sizes = moe_permute_npu(x, ids, first, n)
        out = moe_unpermute_npu(grouped_matmul_npu(x_sorted, w, sizes), order, weights)
        return torch.autograd.grad(out, (x, w, weights), g)
    check = check_graph(make_fx(step)(x, w, weights, torch.randn(T, H)), converter_index(), rank=0, graph="step",
                        capture=False)
    status = {o.op: o.status for o in check.ops}
    token_kernels = {"npu.npu_moe_token_permute.default", "npu.npu_moe_token_unpermute.default"}
    assert {op: status.get(op) for op in token_kernels} == dict.fromkeys(token_kernels, MISSING), status
    assert status.get("npu.npu_grouped_matmul.default") == FUSED, status
    flagged = {op: s for op, s in status.items() if op not in token_kernels and s in (*BLOCKING, CONDITIONAL)}
    assert flagged == {}, flagged
    table = lowering_table("npu")
    assert table[gl.moe_permute.default] is moe_permute_decomposed
    assert table[gl.moe_unpermute.default] is moe_unpermute_decomposed


def test_tiny_moe_model_npu_train_graphs_pass_the_preflight():
    """A 2-layer Mixtral (4 experts, top-2) compiled with the npu lowering on emulated kernels: the forward and
    backward graphs torchair would get have no blocking or unevaluated op, the experts run on the kernel, and the
    loss and gradients equal the eager backend's."""
    import graphllm
    from graphllm.models.presets import tiny_llama
    from graphllm.models.registry import build_model

    cfg = dataclasses.replace(tiny_llama(), model_type="mixtral", vocab_size=256, hidden_size=64,
                              intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                              output_router_logits=True, router_aux_loss_coef=0.02)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    losses, grads = {}, {}
    for backend in ("eager", "npu-emulated"):
        model = build_model(cfg)
        compiled = graphllm.compile(model, ids, ids, backend=backend)
        losses[backend] = compiled(ids, ids)
        losses[backend].backward()
        grads[backend] = {n: p.grad for n, p in model.named_parameters()}
    assert rel_err(losses["npu-emulated"].detach(), losses["eager"].detach()) <= FP32_RTOL
    for name, g in grads["eager"].items():
        assert rel_err(grads["npu-emulated"][name], g) <= FP32_RTOL, name
    index = converter_index()
    graphs = compiled.result.train_stage.graphs
    assert set(graphs) == {"forward", "backward"}, set(graphs)
    for name, g in graphs.items():
        check = check_graph(g, index, rank=0, graph=name, capture=False)
        flagged = [(o.op, o.status, o.detail) for o in check.ops if o.status in (*BLOCKING, CONDITIONAL)]
        assert flagged == [], (name, flagged)
        assert "npu.npu_grouped_matmul.default" in {o.op for o in check.ops}, name
