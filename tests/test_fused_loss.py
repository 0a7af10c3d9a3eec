"""graphllm::linear_cross_entropy (ops/linear_cross_entropy.py) and fuse_linear_cross_entropy: the op and its
decomposition against F.cross_entropy over full logits, the pass on the tiny-llama training graph (and not on a
soft-capped one), compiled parity with the pass on and off (eager; inductor on the head alone, where the joint
graph must not save a chunk's logits), tp2 parity on gloo ranks, and the npu lowering on the CPU emulation.

Reproduce one case: `python -m pytest tests/test_fused_loss.py -k NAME -q`.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphllm
from graphllm.ops.linear_cross_entropy import (linear_cross_entropy_decomposed, linear_cross_entropy_parts_decomposed,
                                               vocab_spans)
from graphllm.passes import PassContext, default_passes, run_passes
from graphllm.passes.fuse_linear_cross_entropy import fuse_linear_cross_entropy
from graphllm.planning.flops import forward_flops

FP32_RTOL = 1e-5
"""fp32: the op sums the softmax over vocabulary chunks (a running max, rescaled) and grad_hidden over the chunks'
partial products, where F.cross_entropy and the linear's backward sum each in one kernel: the same terms in another
order, a few ulps of the largest value (~1e-7 measured; 1e-5 is the project's fp32 reduction-order bound)."""
BF16_RTOL = 2e-2
"""bf16 autocast: both sides round the same matmul inputs to bf16, but the op sums grad_hidden's chunk partials
(each rounded to bf16 by its matmul) in fp32 where the linear's backward rounds one full product."""
gl = torch.ops.graphllm
OP, PARTS = gl.linear_cross_entropy.default, gl.linear_cross_entropy_parts.default
REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """hf_parity.rel_err; not imported from there, which would import transformers in each spawned tp rank."""
    return ((a - b).abs().max() / b.abs().max()).item()


def _case(n=37, h=16, v=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.5
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = -100  # ignored tokens
    return hidden, weight, labels


def _grads(fn, hidden, weight, labels, seed=1):
    """(loss, lse, grad_hidden, grad_weight) of fn(h, w) -> (loss, lse) under random upstream gradients for both."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, lse = fn(h, w)
    g = torch.Generator().manual_seed(seed)
    (loss * torch.randn(loss.shape, generator=g)).sum().add((lse * torch.randn(lse.shape, generator=g)).sum()).backward()
    return loss.detach(), lse.detach(), h.grad, w.grad


@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("impl", ["op", "decomposed"])
def test_op_matches_cross_entropy_over_full_logits(impl, reduction):
    hidden, weight, labels = _case()
    chunk = 30  # 101 vocabulary rows in chunks of 30, 30, 30, 11: the chunk size does not divide V
    assert [b - a for a, b in vocab_spans(101, chunk)] == [30, 30, 30, 11]
    fused = OP if impl == "op" else linear_cross_entropy_decomposed

    def ref(h, w):
        z = h @ w.t()
        return F.cross_entropy(z.float(), labels, reduction=REDUCTIONS[reduction]), torch.logsumexp(z, -1)

    got = _grads(lambda h, w: fused(h, w, labels, -100, reduction, chunk), hidden, weight, labels)
    want = _grads(ref, hidden, weight, labels)
    for name, a, b in zip(("loss", "lse", "grad_hidden", "grad_weight"), got, want):
        assert rel_err(a, b) <= FP32_RTOL, name


def test_every_label_ignored_gives_nan_mean_like_cross_entropy():
    hidden, weight, labels = _case(n=4)
    labels[:] = -100
    assert torch.isnan(OP(hidden, weight, labels, -100, 1, 30)[0])
    assert torch.isnan(F.cross_entropy(hidden @ weight.t(), labels))


@pytest.mark.parametrize("impl", ["op", "decomposed"])
def test_parts_over_two_vocabulary_shards_combine_to_the_loss(impl):
    """The vocab-parallel form in one process: each shard's parts, combined as passes/vocab_parallel.py does."""
    hidden, weight, labels = _case()
    parts = PARTS if impl == "op" else linear_cross_entropy_parts_decomposed

    def split(h, w):
        shards = [parts(h, w[a:b], labels, a, 20) for a, b in ((0, 51), (51, 101))]
        gmax = torch.maximum(shards[0][0], shards[1][0])  # the all-reduce max
        lse = gmax + sum(s * (m - gmax).exp() for m, s, _ in shards).log()  # the all-reduce sum, rescaled
        per_token = torch.where(labels == -100, 0.0, lse - sum(t for _, _, t in shards))
        return per_token.sum() / (labels != -100).sum(), lse

    got = _grads(split, hidden, weight, labels)
    want = _grads(lambda h, w: OP(h, w, labels, -100, 1, 0), hidden, weight, labels)
    for name, a, b in zip(("loss", "lse", "grad_hidden", "grad_weight"), got, want):
        assert rel_err(a, b) <= FP32_RTOL, name


# -- the pass on model graphs --------------------------------------------------------------------------------------
def _tiny(layers: int | None = None, **fields) -> nn.Module:
    from graphllm.models import PRESETS, build_model

    cfg = PRESETS["tiny-llama"]()
    return build_model(dataclasses.replace(cfg, num_hidden_layers=layers or cfg.num_hidden_layers, **fields), seed=0)


def _batch(vocab: int, b: int = 2, s: int = 16):
    g = torch.Generator().manual_seed(3)
    ids, labels = torch.randint(0, vocab, (b, s), generator=g), torch.randint(0, vocab, (b, s), generator=g)
    labels[0, :5] = -100  # a prompt: ignored
    return ids, labels


def _fused(gm, **options):
    options.setdefault("min_bytes", 0)  # tiny logits: under the pass's default threshold
    out, (rec,) = run_passes(gm, [fuse_linear_cross_entropy.with_options(**options)], PassContext())
    return out, rec


def test_pass_fires_on_the_tiny_llama_training_graph():
    from graphllm.capture import capture

    ids, labels = _batch(8000)
    gm = capture(_tiny(), (ids, labels))
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert calls.count(torch.ops.aten.cross_entropy_loss.default) == 1 and calls.count(torch.ops.aten.linear.default) == 29
    assert not _fused(gm, exclude=("q_proj", "lm_head"))[1].changed  # a LoRA target: left to the lora pass
    assert not _fused(gm, min_bytes=32 * 8000 * 4 + 1)[1].changed  # 32 tokens × 8000 fp32 logits: under the bar
    flops = forward_flops(gm)
    out, rec = _fused(gm, min_bytes=32 * 8000 * 4)  # at the bar
    assert forward_flops(out) == flops  # the op counts the head's matmul
    calls = [n.target for n in out.graph.nodes if n.op == "call_function"]
    assert rec.counters == {"replaced": 1} and calls.count(OP) == 1
    assert torch.ops.aten.cross_entropy_loss.default not in calls and calls.count(torch.ops.aten.linear.default) == 28
    (node,) = [n for n in out.graph.nodes if n.target is OP]
    assert node.args[0].meta["val"].shape == (2, 16, 256) and node.args[1].target == "lm_head.weight"
    assert node.args[3:] == (-100, 1, 1000)  # ignore_index, mean, 8 chunks of 1000 rows


def test_the_plan_sets_the_pass_options_lora_targets_and_fused_loss():
    from graphllm.pass_pipeline import build_pipeline
    from graphllm.plan import CompilePlan
    from graphllm.planning.lora_config import LoraConfig

    def options(fused_loss="auto", **lora):
        plan = CompilePlan(backend="eager", fused_loss=fused_loss, lora=LoraConfig(**lora))
        return next((s.graph_pass.options for s in build_pipeline(plan).steps
                     if s.name == "fuse_linear_cross_entropy"), None)

    assert options() == {} and options(rank=4, target=("q_proj", "lm_head")) == {"exclude": ("q_proj", "lm_head")}
    assert options("on") == {"min_bytes": 0} and options("off") is None


def test_pass_leaves_a_soft_capped_head_alone():
    """Gemma 2 caps the final logits (tanh(logits / c) * c) before the loss: not the op's loss. The config is
    tests/hf_parity.py's gemma2 family as a plain dict (importing hf_parity would import transformers)."""
    from graphllm.capture import capture
    from graphllm.models import ModelConfig, build_model

    cfg = ModelConfig.from_hf({"model_type": "gemma2", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
                               "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "head_dim": 16, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 0.5,
                               "final_logit_softcapping": 2.0, "tie_word_embeddings": False}, source="gemma2")
    gm = capture(build_model(cfg, seed=0), _batch(cfg.vocab_size))
    assert torch.ops.aten.tanh.default in {n.target for n in gm.graph.nodes}
    out, rec = _fused(gm)
    assert not rec.changed and OP not in {n.target for n in out.graph.nodes}
    assert torch.ops.aten.cross_entropy_loss.default in {n.target for n in out.graph.nodes}


def _loss_and_grads(model, ids, labels, **compile_kw):
    compiled = graphllm.compile(model, ids, labels, **compile_kw)
    loss = compiled(ids, labels)
    loss.backward()
    return compiled, loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def unfused_reference():
    """One-layer tiny-llama (vocab 1000), eager, the pass disabled: loss and gradients."""
    ids, labels = _batch(1000)
    _, loss, grads = _loss_and_grads(_tiny(1, vocab_size=1000), ids, labels, backend="eager",
                                     disable=["fuse_linear_cross_entropy"])
    return ids, labels, loss, grads


def _chunked(chunks: int = 3):
    return [p.with_options(chunks=chunks, min_bytes=0) if p.name == "fuse_linear_cross_entropy" else p
            for p in default_passes()]


@pytest.mark.parametrize("backend,recompute", [("eager", "budget"), ("npu-emulated", "none")])
def test_compiled_step_with_the_pass_equals_it_disabled(unfused_reference, backend, recompute):
    """eager: the op's own kernels and backward; npu-emulated: the npu table (the decomposition, traced). Under a
    recompute policy (min-cut at a 5% activation budget) the op still runs once in the forward, its backward once
    (graphllm.recompute.keep_fused_loss), and the forward hands over no chunk's logits."""
    from graphllm.planning.memory import input_views
    from graphllm.planning.recompute_config import RecomputeConfig

    ids, labels, ref_loss, ref = unfused_reference
    policy = RecomputeConfig(policy=recompute, budget=0.05 if recompute == "budget" else None)
    compiled, loss, grads = _loss_and_grads(_tiny(1, vocab_size=1000), ids, labels, backend=backend,
                                            passes=_chunked(), recompute=policy)
    fired = [n.target for n in compiled.result.model_graph.graph.nodes].count(OP)
    lowered = {getattr(n.target, "__name__", "") for n in compiled.result.lowered_graph.graph.nodes}
    assert fired == 1 and ("linear_cross_entropy_decomposed" in lowered) == (backend == "npu-emulated")
    graphs = compiled.result.train_stage.graphs
    if backend == "eager":
        calls = {kind: [n.target for n in graphs[kind].graph.nodes] for kind in ("forward", "backward")}
        assert calls["forward"].count(OP) == 1 and OP not in calls["backward"]
        assert calls["backward"].count(gl.linear_cross_entropy_backward.default) == 1
    (out,) = [n for n in graphs["forward"].graph.nodes if n.op == "output"]
    inputs = input_views(graphs["forward"])  # parameters (lm_head.weight is [1000, 256]) and views of them
    assert not [a for a in out.args[0] if isinstance(a, torch.fx.Node) and a.name not in inputs
                and _logits_like(a.meta["val"], ids, 1000)]


def _logits_like(t: torch.Tensor, ids: torch.Tensor, vocab: int) -> bool:
    """A chunk's logits or more: a dimension of the vocabulary or of a chunk of it (3 chunks: 334, 332 rows)."""
    return t.numel() >= ids.numel() * 332 and bool({vocab, 334, 332} & set(t.shape))


@pytest.mark.parametrize("impl", ["op", "decomposed"])
def test_bf16_autocast_matmuls_like_the_linear(impl):
    """Under autocast the op's matmuls run in bf16 (the op's autocast policy; the decomposition casts to autocast's
    dtype), its log-sum-exp in fp32: the unfused head's numbers up to bf16 rounding."""
    hidden, weight, labels = _case(n=48, h=64, v=300)
    fused = OP if impl == "op" else linear_cross_entropy_decomposed
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _grads(lambda h, w: fused(h, w, labels, -100, 1, 70), hidden, weight, labels)
        want = _grads(lambda h, w: (F.cross_entropy(F.linear(h, w).float(), labels),
                                    torch.logsumexp(F.linear(h, w).float(), -1)), hidden, weight, labels)
    assert got[0].dtype == got[1].dtype == torch.float32 and got[3].dtype == torch.float32
    for name, a, b in zip(("loss", "lse", "grad_hidden", "grad_weight"), got, want):
        assert rel_err(a, b) <= BF16_RTOL, name
    fp32 = _grads(lambda h, w: OP(h, w, labels, -100, 1, 70), hidden, weight, labels)
    assert rel_err(got[0], fp32[0]) > 1e-6  # it did compute in bf16


class _Head(nn.Module):
    """Just an LM head and its loss: the inductor case stays small."""

    def __init__(self, hidden: int = 32, vocab: int = 600):
        super().__init__()
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        nn.init.normal_(self.lm_head.weight, std=0.2)

    def forward(self, h, labels):
        return F.cross_entropy(self.lm_head(h).float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def test_inductor_saves_no_chunk_logits_and_matches():
    """The backward recomputes each chunk's logits transposed, so inductor's partitioner (CSE, then min-cut) cannot
    merge them with the forward's and save them: the forward hands over hidden, W, labels and [N]-sized values."""
    g = torch.Generator().manual_seed(0)
    h, labels = torch.randn(2, 24, 32, generator=g), torch.randint(0, 600, (2, 24), generator=g)
    labels[1, :7] = -100
    head = _Head()
    ref_h = h.clone().requires_grad_()
    ref = head(ref_h, labels)
    ref.backward()
    ref_grad_w, head.lm_head.weight.grad = head.lm_head.weight.grad, None
    x = h.clone().requires_grad_()
    compiled = graphllm.compile(head, x, labels, backend="inductor", passes=_chunked(4))
    loss = compiled(x, labels)
    loss.backward()
    assert rel_err(loss.detach(), ref.detach()) <= FP32_RTOL
    assert rel_err(x.grad, ref_h.grad) <= FP32_RTOL and rel_err(head.lm_head.weight.grad, ref_grad_w) <= FP32_RTOL
    forward = compiled.result.train_stage.graphs["forward"]
    (out,) = [n for n in forward.graph.nodes if n.op == "output"]
    saved = [a.meta["val"] for a in out.args[0] if isinstance(a, torch.fx.Node) and "val" in a.meta]
    assert saved and max(t.numel() for t in saved) <= 600 * 32  # W (or a block of it); a chunk's logits: 48 × 150


# -- tensor parallelism ------------------------------------------------------------------------------------------
def tp_rank_step(layout: dict):
    """One step of the one-layer tiny-llama with the pass, on this rank of `layout`."""
    from graphllm.parallel.groups import init_parallel
    from graphllm.planning import Layout
    from graphllm.planning.sharding import shard_of

    lay = Layout(**layout)
    st = init_parallel(lay)
    model = _tiny(1, vocab_size=1000)
    ids, labels = _batch(1000)
    c = graphllm.compile(model, ids, labels, backend="eager", layout=lay, groups=st, rank=st.rank, passes=_chunked())
    loss = c(ids, labels)
    loss.backward()
    calls = [n.target for n in c.result.model_graph.graph.nodes]
    return loss.detach(), {n: (p.grad, shard_of(p)) for n, p in model.named_parameters()}, calls.count(PARTS)


def test_tp2_matches_one_process(unfused_reference):
    """tp2 (gloo): each rank's parts over its vocabulary half, combined by all-reduces, against one unfused process."""
    from dist_util import run_ranks

    _, _, ref_loss, ref = unfused_reference
    outs = run_ranks(tp_rank_step, 2, {"tp": 2})
    for loss, _, parts in outs:
        assert parts == 1 and rel_err(loss, ref_loss) <= FP32_RTOL
    for name, g in ref.items():
        pieces = [o[1][name] for o in outs]
        shard = pieces[0][1]
        full = torch.cat([p[0] for p in pieces], shard.dim) if shard else pieces[0][0]
        assert rel_err(full, g) <= FP32_RTOL, name


# -- npu: the decomposition's ATen ops all have GE converters ----------------------------------------------------
def test_decomposition_uses_only_ops_torchair_converts():
    """The decomposition's forward and backward (make_fx) against the converter index of the torch_npu 2.13 wheel:
    an op whose converter is a stub (aten.amax, aten.index_put) would fail torchair's compile."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from graphllm.preflight.check import check_graph
    from graphllm.preflight.converters import converter_index
    from npu_wheel import npu_wheel_root

    hidden, weight, labels = _case()

    def step(h, w):
        loss, _ = linear_cross_entropy_decomposed(h, w, labels, -100, 1, 30)
        return torch.autograd.grad(loss, (h, w))

    gm = make_fx(step)(hidden.requires_grad_(), weight.requires_grad_())
    check = check_graph(gm, converter_index(npu_wheel_root()), rank=0, graph="forward", capture=False)
    assert [(o.op, o.status, o.detail) for o in check.blocking] == []
    assert {o.op for o in check.ops} >= {"aten.mm.default", "aten.max.dim", "aten.scatter_add.default",
                                         "aten.gather.default"}
