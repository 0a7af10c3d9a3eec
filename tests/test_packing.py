"""EOD-reset for packed rows: graphllm::varlen_attention, LlamaForCausalLM(position_ids), fuse_attention.

A packed row's loss with EOD-reset must equal the token-weighted mean over its samples run one by one,
through the compiled graph; HF transformers given the same position_ids and the block-diagonal 4-D
mask must give the same logits; the plain (non-packed) graph keeps graphllm::attention.
"""

from __future__ import annotations

import graphllm.ops  # noqa: F401  (registers torch.ops.graphllm)
import pytest
import torch
import torch.nn.functional as F
from graphllm.models import load_model
from graphllm.models.llama import packed_causal_mask
from graphllm.ops.attention import segment_causal_mask, varlen_attention_decomposed
from hf_parity import FP32_PARITY_RTOL, VOCAB, hf_model, rel_err, save_hf_checkpoint

from graphllm.compile import compile

# fp32: the packed row runs one S×S attention where the separate runs use shorter ones, so matmul and
# softmax reduction lengths differ (masked keys add exact zeros, but blocking differs): 1e-5 relative
PACKED_VS_SEPARATE_RTOL = 1e-5
GRAD_RTOL = 1e-5  # the op's backward rule vs autograd of SDPA with the mask: fp32 reduction order

ops = torch.ops.graphllm
LENGTHS = [[5, 3, 8], [10, 6]]  # samples per row, S = 16
S = 16


def _positions() -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in LENGTHS])  # [B, S]


def test_varlen_attention_is_attention_per_sample_with_its_backward() -> None:
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, D = 2, 4, 2, 8
    q = torch.randn(B, H, S, D, generator=g, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, generator=g, requires_grad=True)
    v = torch.randn(B, Hkv, S, D, generator=g, requires_grad=True)
    seg = torch.cumsum((_positions() == 0).long(), -1)
    out = ops.varlen_attention(q, k, v, seg, 0.3)
    for b, row in enumerate(LENGTHS):  # each sample alone, causal
        start = 0
        for n in row:
            sl = slice(start, start + n)
            ref = ops.attention(q[b:b + 1, :, sl], k[b:b + 1, :, sl], v[b:b + 1, :, sl], 0.3, True)
            assert rel_err(out[b:b + 1, :, sl].detach(), ref.detach()) < PACKED_VS_SEPARATE_RTOL
            start += n
    grad = torch.randn(out.shape, generator=g)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(varlen_attention_decomposed(q, k, v, seg, 0.3), (q, k, v), grad)
    for a, b in zip(got, want):
        assert rel_err(a, b) < GRAD_RTOL
    assert segment_causal_mask(seg)[0, 0, 5, 4].item() is False and segment_causal_mask(seg)[0, 0, 6, 5].item()


@pytest.fixture(scope="module")
def micro_ckpt(tmp_path_factory):
    """A 2-layer GQA llama (tests/hf_parity.py), saved once: small graphs compile fast."""
    return save_hf_checkpoint(hf_model("llama", "sdpa"), "llama", tmp_path_factory.mktemp("micro") / "ckpt")


def _separate_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-weighted mean of the per-sample losses, each sample run alone."""
    total, count = torch.zeros(()), 0
    for b, row in enumerate(LENGTHS):
        start = 0
        for n in row:
            sl = slice(start, start + n)
            logits = model(ids[b:b + 1, sl])
            lab = labels[b:b + 1, sl]
            total = total + F.cross_entropy(logits.flatten(0, 1), lab.flatten(), ignore_index=-100, reduction="sum")
            count += int((lab != -100).sum())
            start += n
    return total / count


def test_packed_loss_equals_samples_run_separately_through_the_graph(micro_ckpt) -> None:
    model = load_model(str(micro_ckpt))
    pos = _positions()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, S), generator=g)
    labels = torch.randint(0, model.config.vocab_size, (2, S), generator=g)
    labels[pos == 0] = -100  # some ignored tokens, like prompts
    compiled = compile(model, ids, labels, extra_inputs=(pos,), backend="eager")
    graph = compiled.result.model_graph
    targets = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    assert targets.count(ops.varlen_attention.default) == model.config.num_hidden_layers
    assert ops.attention.default not in targets and torch.ops.aten.scaled_dot_product_attention.default not in targets
    packed = compiled(ids, labels, pos)
    with torch.no_grad():
        separate = _separate_loss(model, ids, labels)
    assert rel_err(packed.detach(), separate) < PACKED_VS_SEPARATE_RTOL
    packed.backward()  # the op's backward rule runs inside the compiled graph
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_plain_graph_keeps_causal_attention(micro_ckpt) -> None:
    model = load_model(str(micro_ckpt))
    ids = torch.zeros(2, S, dtype=torch.long)
    compiled = compile(model, ids, torch.zeros(2, S, dtype=torch.long), backend="eager")
    targets = [n.target for n in compiled.result.model_graph.graph.nodes if n.op == "call_function"]
    assert ops.attention.default in targets and ops.varlen_attention.default not in targets
    assert len([n for n in compiled.result.model_graph.graph.nodes if n.op == "placeholder"]) == 2


def test_fuse_attention_refuses_other_masks() -> None:
    """SDPA with a mask that is not the packed-sample form stays SDPA."""
    from graphllm.passes import PassContext, run_passes
    from graphllm.passes.fuse_attention import fuse_attention

    from graphllm.capture import capture

    class Masked(torch.nn.Module):
        def forward(self, q, k, v, seg):
            same = seg[:, None, :, None] == seg[:, None, None, :]  # no causal part: bidirectional within samples
            return F.scaled_dot_product_attention(q, k, v, attn_mask=same)

    q = torch.randn(2, 4, S, 8)
    seg = torch.cumsum((_positions() == 0).long(), -1)
    gm = capture(Masked(), (q, q.clone(), q.clone(), seg))
    gm, _ = run_passes(gm, [fuse_attention], PassContext())
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.varlen_attention.default not in targets
    assert torch.ops.aten.scaled_dot_product_attention.default in targets


def test_matches_transformers_with_block_diagonal_mask(tmp_path) -> None:
    hf = hf_model("llama", "sdpa")
    ours = load_model(str(save_hf_checkpoint(hf, "llama", tmp_path / "ckpt")))
    pos = _positions()
    ids = torch.randint(0, VOCAB, pos.shape, generator=torch.Generator().manual_seed(2))
    mask = packed_causal_mask(pos)  # [B, 1, S, S] bool
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    for attn in ("sdpa", "eager"):
        hf.config._attn_implementation = attn
        with torch.no_grad():
            want = hf(input_ids=ids, position_ids=pos, attention_mask=additive).logits
            got = ours(ids, position_ids=pos)
        assert rel_err(got, want) < FP32_PARITY_RTOL, attn


def test_npu_lowering_matches_under_emulation() -> None:
    """The npu table's varlen_attention (npu_fusion_attention, BNSD, explicit mask, sparse_mode 0) against
    the decomposition, forward and backward, on the emulated kernel (tests/npu_emulation.py)."""
    import npu_emulation  # noqa: F401  (registers torch.ops.npu.* emulations)
    from graphllm.ops.lowering_npu import varlen_attention_npu

    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, S, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 2, S, 8, generator=g, requires_grad=True)
    v = torch.randn(2, 2, S, 8, generator=g, requires_grad=True)
    seg = torch.cumsum((_positions() == 0).long(), -1)
    out, ref = varlen_attention_npu(q, k, v, seg, 0.3), varlen_attention_decomposed(q, k, v, seg, 0.3)
    assert rel_err(out.detach(), ref.detach()) < PACKED_VS_SEPARATE_RTOL
    grad = torch.randn(ref.shape, generator=g)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        assert rel_err(a, b) < GRAD_RTOL


def test_gradient_accumulation_over_micro_batches_with_positions(micro_ckpt) -> None:
    """Engine with 2 micro-batches of 1 packed row (the compiled batch-1 graph run twice) gives the
    full batch's loss and gradients: position_ids are sliced and chunked like the rows."""
    from graphllm.parallel.engine import Engine
    from graphllm.planning.layout import Layout

    model = load_model(str(micro_ckpt))
    pos = _positions()
    g = torch.Generator().manual_seed(4)
    ids, labels = (torch.randint(0, VOCAB, (2, S), generator=g) for _ in range(2))  # no -100: equal counts
    compiled = compile(model, ids[:1], labels[:1], extra_inputs=(pos[:1],), backend="eager")
    engine = Engine(layout=Layout(micro_batches=2), st=None, named_params=dict(model.named_parameters()),
                    step_fn=compiled, micro_batch_size=1)
    loss = engine.forward_backward(ids, labels, pos)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    want = model(ids, labels, pos)
    want.backward()
    assert abs(loss - want.item()) <= PACKED_VS_SEPARATE_RTOL * abs(want.item())
    assert max(rel_err(got[n], p.grad) for n, p in model.named_parameters()) < GRAD_RTOL
