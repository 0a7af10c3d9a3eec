"""graphllm::lora_linear (ops/lora.py) and the `lora` pass (passes/lora.py) on tiny-llama.

Op: the kernel is its decomposition bit for bit; its autograd rule equals autograd through the decomposition
and gives the frozen base nothing; dropout p 0 is the dropout-free expression. Pass: structure (one op per
target, adapters named as PEFT names them, everything else frozen), numerics against the graph before it
(bitwise at initialisation; with trained adapters, equal to the base graph with W + s·BA merged in), cases
where it must not fire or must refuse, deterministic initialisation, the backward graph, and checkpoints.
"""

from __future__ import annotations

import pytest
import torch

from graphllm.capture import capture
from graphllm.errors import GraphllmError
from graphllm.ops.lora import lora_linear, lora_linear_decomposed
from graphllm.passes import PassContext, run_passes
from graphllm.passes.lora import adapted, init_lora_a, lora
from graphllm.planning.lora_config import LoraConfig
from hf_parity import rel_err

FP32_RTOL = 1e-5
"""fp32: the autograd rule and autograd through the decomposition associate the same products differently;
the merged-weight graph sums x(W + sBA)ᵀ where the adapted one sums xWᵀ + s(xAᵀ)Bᵀ."""
LINEARS_PER_LAYER, LAYERS = 7, 4  # tiny-llama: q k v o gate up down, 4 layers (+ lm_head, not a default target)
gops = torch.ops.graphllm


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _args(p: float = 0.0):
    x = _randn(2, 5, 16, seed=1).requires_grad_()
    w, b = _randn(12, 16, seed=2), _randn(12, seed=3)
    a, bb = _randn(4, 16, seed=4).requires_grad_(), _randn(12, 4, seed=5).requires_grad_()
    mask = _randn(2, 5, 16, seed=6) >= p if p else None
    return x, w, b, a, bb, 2.0, p, mask


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_op_equals_its_decomposition_and_its_rule_autograd(p):
    args = _args(p)
    torch.library.opcheck(gops.lora_linear.default, args)
    got, want = lora_linear(*args), lora_linear_decomposed(*args)
    assert torch.equal(got, want)
    g = _randn(*got.shape, seed=9)
    inputs = (args[0], args[3], args[4])
    for a, b in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g)):
        assert rel_err(a, b) <= FP32_RTOL


def test_op_gives_the_base_no_gradient_and_p0_is_the_plain_expression():
    x, w, b, a, bb, s, _, _ = _args()
    w.requires_grad_()
    y = lora_linear(x, w, b, a, bb, s, 0.0, None)
    y.sum().backward()
    assert w.grad is None and a.grad is not None
    assert torch.equal(y, torch.nn.functional.linear(x, w, b) + (x @ a.T @ bb.T) * s)


def _captured(seq: int = 32):
    from graphllm.models import load_model

    model = load_model("tiny-llama")
    ids, labels = _randn(2, seq).abs().mul(1000).long(), _randn(2, seq, seed=1).abs().mul(1000).long()
    return model, capture(model, (ids, labels)), (ids, labels)


def _lora(gm, **cfg):
    ctx = PassContext()
    out, (rec,) = run_passes(gm, [lora.with_options(config=LoraConfig(**{"rank": 8, **cfg}))], ctx)
    return out, rec


def test_structure_one_op_per_target_peft_names_base_frozen():
    _, gm, _ = _captured()
    out, rec = _lora(gm)
    n = LINEARS_PER_LAYER * LAYERS
    assert len(adapted(out)) == n and rec.counters["adapted linears"] == n
    linears = [x for x in out.graph.nodes if x.target is torch.ops.aten.linear.default]
    assert [x.args[1].target for x in linears] == ["lm_head.weight"]
    params = dict(out.named_parameters())
    assert params["model.layers.0.self_attn.q_proj.lora_A"].shape == (8, 256)
    assert params["model.layers.0.mlp.down_proj.lora_B"].shape == (256, 8)
    assert not params["model.layers.0.mlp.down_proj.lora_B"].any()
    assert sorted(k for k, p in params.items() if p.requires_grad) == sorted(k for k in params if ".lora_" in k)


def test_numerics_bitwise_at_init_and_merged_weights_after_training():
    model, gm, inputs = _captured()
    before = gm(*inputs).detach()
    out, _ = _lora(gm, alpha=32.0, target=("q_proj", "down_proj"))
    assert torch.equal(out(*inputs).detach(), before)  # B = 0: x Wᵀ + 0
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            if name.endswith(".lora_B"):
                p.copy_(_randn(*p.shape, seed=len(name)) * 0.05)
        adapted_loss = out(*inputs)
        for name, p in params.items():
            if name.endswith(".weight") and name.removesuffix(".weight") + ".lora_A" in params:
                m = name.removesuffix(".weight")
                p += params[m + ".lora_B"] @ params[m + ".lora_A"] * (32.0 / 8)
        merged = model(*inputs)
    assert abs(adapted_loss - before) > 1e-3 and rel_err(adapted_loss, merged) <= FP32_RTOL


def test_must_not_fire_and_refusals():
    _, gm, _ = _captured()
    code = gm.code
    out, rec = _lora(gm, rank=0)
    assert out is gm and out.code == code and not rec.changed
    with pytest.raises(GraphllmError, match=r"matches none of the model's linear layers \(lm_head, "
                                            r"model\.layers\.\*\.mlp\.down_proj"):
        _lora(gm, target=("qkv_proj",))
    with pytest.raises(GraphllmError, match="--lora-rank 300 is larger than model.layers.0.self_attn.k_proj's "
                                            "256→128 features; use a rank of at most 128"):
        _lora(gm, rank=300, target=("k_proj",))
    assert gm.code == code  # a refusal leaves the graph as it was


def test_initialisation_is_deterministic_per_module_and_seed():
    _, g1, _ = _captured()
    _, g2, _ = _captured(seq=16)
    p1 = dict(_lora(g1)[0].named_parameters())
    p2 = dict(_lora(g2)[0].named_parameters())
    q, k = "model.layers.0.self_attn.q_proj.lora_A", "model.layers.1.self_attn.q_proj.lora_A"
    assert torch.equal(p1[q], p2[q]) and not torch.equal(p1[q], p1[k])
    assert not torch.equal(init_lora_a((8, 256), 0, q[:-7]), init_lora_a((8, 256), 1, q[:-7]))
    bound = 1 / 256 ** 0.5  # PEFT: kaiming_uniform_(a=√5) on [r, in] is U(±1/√in)
    assert 0.9 * bound < p1[q].abs().max() <= bound


def _compiled_lora(**cfg):
    from graphllm.compile import compile_pipeline
    from graphllm.models import load_model
    from graphllm.pass_pipeline import build_pipeline
    from graphllm.plan import CompilePlan

    plan = CompilePlan(model="tiny-llama", batch_size=2, seq_len=32, backend="eager",
                       lora=LoraConfig(**{"rank": 8, **cfg}))
    model = load_model("tiny-llama")
    ids = _randn(2, 32).abs().mul(1000).long()
    return model, compile_pipeline(model, (ids, ids), build_pipeline(plan)), ids


def test_backward_graph_computes_no_base_weight_gradient():
    model, c, ids = _compiled_lora(target=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj", "lm_head"))
    c(ids, ids).backward()
    backward = c.result.train_stage.graphs["backward"]
    base = {tuple(p.shape) for n, p in c.result.model_graph.named_parameters() if p.dim() == 2 and ".lora_" not in n}
    # the base weights come in (dx = g W needs them) but nothing the backward computes has their shape
    made = [n for n in backward.graph.nodes if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)
            and tuple(n.meta["val"].shape) in base]
    assert not made, f"the backward graph computes tensors shaped like a base weight: {[n.name for n in made][:5]}"
    grads = [g for g in next(n for n in backward.graph.nodes if n.op == "output").args[0] if g is not None]
    assert len(grads) == 2 * (LINEARS_PER_LAYER * LAYERS + 1)  # A and B of every adapter, nothing else
    assert all(p.grad is None for n, p in c.result.model_graph.named_parameters() if ".lora_" not in n)


def test_dropout_draws_one_keep_mask_per_adapter():
    _, gm, inputs = _captured()
    out, _ = _lora(gm, dropout=0.1, target=("q_proj",))
    ops = [n for n in adapted(out)]
    assert all(n.args[6] == 0.1 and n.args[7].target is torch.ops.aten.ge.Scalar for n in ops)
    assert sum(n.target is torch.ops.aten.rand_like.default for n in out.graph.nodes) == LAYERS


def test_checkpoint_holds_adapter_optimizer_state_only_and_resumes(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    from graphllm.plan import CompilePlan
    from parallel_harness import save_and_resume

    plan = CompilePlan(model="tiny-llama", batch_size=4, seq_len=32, backend="eager", lora=LoraConfig(rank=4))
    path, losses, resumed = save_and_resume(plan, tmp_path)
    keys = FileSystemReader(path).read_metadata().state_dict_metadata
    optim = {k.split("/")[1] for k in keys if k.startswith("optim/") and k != "optim/step"}
    assert optim and all(".lora_" in k for k in optim)
    assert resumed == losses[2:]


def test_dropout_masks_replay_under_full_recompute_bitwise():
    """The keep-masks are ordinary random ops: recomputing them in the backward (aot_autograd's RNG
    functionalisation) gives the forward's masks, so losses match a run without recomputation bit for bit."""
    import dataclasses

    from graphllm.job import build
    from graphllm.planning.recompute_config import RecomputeConfig
    from graphllm.train import TrainConfig, train_steps
    from parallel_harness import batch_at, make_plan

    losses = {}
    for policy in ("none", "full"):
        plan = dataclasses.replace(make_plan(), lora=LoraConfig(rank=8, dropout=0.2),
                                   recompute=RecomputeConfig(policy=policy))
        cfg = TrainConfig(steps=3, lr=1e-2, warmup_steps=1)
        losses[policy] = [r["loss"] for r in train_steps(build(plan).engine, batch_at, cfg)]
    assert losses["full"] == losses["none"]
