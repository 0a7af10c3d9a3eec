"""The pass manager and the default pipeline.

- order_passes: list order kept, moved only by after/before constraints; cycles, duplicate and unknown
  (disabled) names are GraphllmErrors;
- run_passes: a pass that returns a non-GraphModule, raises, or leaves a graph that does not lint is a
  PassError naming it and the passes before it; counters through ctx.count; provenance stamps;
- user passes through graphllm.compile (eager backend): a `model` pass appended to default_passes()
  sees graphllm ops; a `train` pass sees the forward and backward graphs;
- the default pipeline on tiny-llama (batch 2, seq 32) fuses exactly 2L+1 norms, L swiglus, 2L ropes,
  L attentions for attn_implementation "sdpa" and "eager".
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.fx as fx
from torch import nn

import graphllm
from graphllm import GraphllmError, PassContext, graph_pass
from graphllm.capture import capture
from graphllm.models import ModelConfig, build_model
from graphllm.passes import GraphPass, PassError, order_passes, run_passes
from graphllm.passes.fuse_swiglu import fuse_swiglu
from graphllm.passes.manager import PASS_META_KEY
from hf_parity import rel_err

aten, gops = torch.ops.aten, torch.ops.graphllm
GRAPHLLM_OPS = (gops.rms_norm.default, gops.add_rms_norm.default, gops.swiglu.default, gops.rope.default,
                gops.attention.default)
FP32_RTOL = 1e-5  # eager attention vs the op's SDPA kernel: fp32 reduction order


def _identity(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    return gm


def _p(name: str, **kw) -> GraphPass:
    return graph_pass(name, **kw)(_identity)


def _names(passes) -> list[str]:
    return [p.name for p in passes]


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.lin(x)) * 2


@pytest.fixture
def tiny_gm() -> fx.GraphModule:
    return capture(_Tiny(), (torch.randn(3, 4),))


# ---------------------------------------------------------------- ordering

def test_order_keeps_list_order_without_constraints() -> None:
    assert _names(order_passes([_p("c"), _p("a"), _p("b")])) == ["c", "a", "b"]


def test_order_after_and_before_constraints() -> None:
    # c must run after a; b must run before a; nothing else moves
    passes = [_p("c", after=["a"]), _p("a"), _p("b", before=["a"]), _p("d")]
    assert _names(order_passes(passes)) == ["b", "a", "c", "d"]


def test_constraints_on_absent_or_disabled_passes_are_ignored() -> None:
    passes = [_p("c", after=["a", "not_here"]), _p("a"), _p("b", before=["a"])]
    assert _names(order_passes(passes, disable=["a"])) == ["c", "b"]


def test_cycle_is_an_error() -> None:
    passes = [_p("x"), _p("a", after=["b"]), _p("b", after=["a"])]
    with pytest.raises(GraphllmError, match="cycle among: a, b"):
        order_passes(passes)
    with pytest.raises(GraphllmError, match="cycle"):
        order_passes([_p("a", before=["b"]), _p("b", before=["a"])])


def test_disable_by_name() -> None:
    ordered = order_passes(graphllm.default_passes(), disable=["fuse_rope"])
    assert _names(ordered) == ["fuse_rms_norm", "fuse_add_rms_norm", "fuse_swiglu", "fuse_attention",
                               "fold_constants", "fuse_linear_cross_entropy"]


def test_disable_unknown_name_is_an_error() -> None:
    with pytest.raises(GraphllmError, match=r"unknown pass\(es\) fuse_rop\b.*passes here: fuse_rms_norm"):
        order_passes(graphllm.default_passes(), disable=["fuse_rop"])


def test_duplicate_names_are_an_error() -> None:
    with pytest.raises(GraphllmError, match="repeated: a"):
        order_passes([_p("a"), _p("b"), _p("a")])


def test_bad_stage_is_an_error() -> None:
    with pytest.raises(GraphllmError, match="stage must be 'model' or 'train', got 'backward'"):
        graph_pass("x", stage="backward")  # type: ignore[arg-type]


# ---------------------------------------------------------------- the checked runner

def test_pass_returning_none_names_it_and_the_passes_before(tiny_gm) -> None:
    bad = graph_pass("forgets_return")(lambda gm, ctx: None)
    with pytest.raises(PassError, match=r"'forgets_return' returned NoneType, not a GraphModule "
                                        r"\(passes before it: first, second\)"):
        run_passes(tiny_gm, [_p("first"), _p("second"), bad], PassContext())


def test_pass_raising_is_a_pass_error_naming_it(tiny_gm) -> None:
    def boom(gm, ctx):
        raise KeyError("no such node")

    with pytest.raises(PassError, match=r"pass 'boom' failed on the model graph \(passes before it: first\): "
                                        r"KeyError") as info:
        run_passes(tiny_gm, [_p("first"), graph_pass("boom")(boom)], PassContext())
    assert isinstance(info.value.__cause__, KeyError)


def test_graphllm_error_from_a_pass_reaches_the_user_unchanged(tiny_gm) -> None:
    def refuse(gm, ctx):
        raise GraphllmError("--tp must divide num_attention_heads=12, got 5")

    with pytest.raises(GraphllmError, match="--tp must divide"):
        run_passes(tiny_gm, [graph_pass("refuse")(refuse)], PassContext())


def test_first_pass_error_says_none_ran_before(tiny_gm) -> None:
    with pytest.raises(PassError, match=r"\(passes before it: none\)"):
        run_passes(tiny_gm, [graph_pass("bad")(lambda gm, ctx: 1)], PassContext())


def test_invalid_graph_is_detected(tiny_gm) -> None:
    """A pass that uses a node before it is defined leaves a graph that fails lint."""

    def use_before_def(gm, ctx):
        relu = next(n for n in gm.graph.nodes if n.target is aten.relu.default)
        first_call = next(n for n in gm.graph.nodes if n.op == "call_function")
        with gm.graph.inserting_before(first_call):
            neg = gm.graph.call_function(aten.neg.default, (relu,))
        mul = next(iter(relu.users.keys() - {neg}))
        mul.replace_input_with(relu, neg)
        return gm

    with pytest.raises(PassError, match=r"pass 'use_before_def' left an invalid graph \(passes before it: first\)"):
        run_passes(tiny_gm, [_p("first"), graph_pass("use_before_def")(use_before_def)], PassContext())


def test_stage_mismatch_is_an_error(tiny_gm) -> None:
    with pytest.raises(PassError, match="'late' is a 'train' pass but was given to the 'model' stage"):
        run_passes(tiny_gm, [_p("late", stage="train")], PassContext())


def test_counters_are_per_pass(tiny_gm) -> None:
    def counting(n):
        def fn(gm, ctx):
            ctx.count("seen", n)
            ctx.count("seen", n)
            ctx.count("other")
            return gm
        return fn

    ctx = PassContext()
    _, records = run_passes(tiny_gm, [graph_pass("a")(counting(2)), _p("quiet"), graph_pass("b")(counting(5))], ctx)
    assert [r.counters for r in records] == [{"seen": 4, "other": 1}, {}, {"seen": 10, "other": 1}]
    assert ctx.counters == {"a": Counter(seen=4, other=1), "b": Counter(seen=10, other=1)}
    assert ctx.current_pass == ""


def test_options_are_bound_when_the_pipeline_is_built(tiny_gm) -> None:
    seen = []

    @graph_pass("opt")
    def opt(gm, ctx, *, k: int = 0):
        seen.append(k)
        return gm

    bound = opt.with_options(k=3)
    run_passes(tiny_gm, [bound], PassContext())
    run_passes(tiny_gm, [opt], PassContext())
    assert seen == [3, 0] and opt.options == {} and bound.describe()["options"] == {"k": 3}


def test_new_nodes_are_stamped_with_the_pass_name() -> None:
    class M(nn.Module):
        def forward(self, g, u):
            return torch.nn.functional.silu(g) * u + 1

    gm = capture(M(), (torch.randn(2, 4), torch.randn(2, 4)))

    @graph_pass("add_relu")
    def add_relu(gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            relu = gm.graph.call_function(aten.relu.default, (out.args[0],))
            relu.meta[PASS_META_KEY] = "kept"  # a pass may stamp its own nodes; the runner does not overwrite
            neg = gm.graph.call_function(aten.neg.default, (relu,))
        out.args = (neg,)
        return gm

    out, records = run_passes(gm, [fuse_swiglu, add_relu], PassContext())
    stamps = {n.target: n.meta.get(PASS_META_KEY) for n in out.graph.nodes if n.op == "call_function"}
    assert stamps == {gops.swiglu.default: "fuse_swiglu", aten.add.Tensor: None, aten.relu.default: "kept",
                      aten.neg.default: "add_relu"}
    assert [(r.added, r.removed) for r in records] == [(1, 2), (2, 0)]


# ---------------------------------------------------------------- user passes through graphllm.compile

def _small_model(attn: str = "sdpa") -> nn.Module:
    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, attn_implementation=attn)
    return build_model(cfg, seed=0)


def test_user_model_pass_appended_to_defaults_sees_graphllm_ops() -> None:
    seen: list[Counter] = []

    @graph_pass("count_matmuls", stage="model")
    def count_matmuls(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_function")
        seen.append(calls)
        ctx.count("matmuls", sum(calls[t] for t in (aten.linear.default, aten.matmul.default, aten.mm.default)))
        ctx.count("graphllm_ops", sum(calls[t] for t in GRAPHLLM_OPS))
        return gm

    model = _small_model()
    ids = torch.randint(0, 64, (2, 8))
    compiled = graphllm.compile(model, ids, passes=[*graphllm.default_passes(), count_matmuls], backend="eager")
    names = [r.name for r in compiled.result.records]
    assert names == ["fuse_rms_norm", "fuse_add_rms_norm", "fuse_swiglu", "fuse_rope", "fuse_attention",
                     "fold_constants", "fuse_linear_cross_entropy", "count_matmuls",
                     "lower_ops"]
    (calls,) = seen
    L = 2
    assert [calls[op] for op in GRAPHLLM_OPS] == [1, 2 * L, L, 2 * L, L]  # before lowering
    assert calls[aten.scaled_dot_product_attention.default] == 0
    rec = compiled.result.records[names.index("count_matmuls")]
    assert rec.counters == {"matmuls": 7 * L + 1, "graphllm_ops": 6 * L + 1}  # q,k,v,o,gate,up,down per layer + lm_head
    assert not rec.changed
    with torch.no_grad():
        err = rel_err(compiled(ids), model(ids))
    assert err <= FP32_RTOL


def test_user_pass_and_disable_through_compile() -> None:
    model = _small_model()
    ids = torch.randint(0, 64, (2, 8))
    compiled = graphllm.compile(model, ids, backend="eager", disable=["fuse_rope", "fuse_attention"])
    assert [r.name for r in compiled.result.records] == ["fuse_rms_norm", "fuse_add_rms_norm", "fuse_swiglu", "fold_constants",
                                                          "fuse_linear_cross_entropy", "lower_ops"]
    calls = Counter(n.target for n in compiled.result.model_graph.graph.nodes)
    assert calls[gops.rope.default] == calls[gops.attention.default] == 0
    assert calls[aten.scaled_dot_product_attention.default] == 2
    with pytest.raises(GraphllmError, match="unknown pass"):
        graphllm.compile(model, ids, backend="eager", disable=["fuse_everything"])


def test_train_pass_sees_forward_and_backward_graphs() -> None:
    kinds: list[tuple[str, str, int]] = []

    @graph_pass("spy", stage="train")
    def spy(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        n_ops = sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in GRAPHLLM_OPS)
        kinds.append((ctx.stage, ctx.graph_kind, n_ops))
        ctx.count(ctx.graph_kind)
        return gm

    model = _small_model()
    ids = torch.randint(0, 64, (2, 8))
    compiled = graphllm.compile(model, ids, passes=[*graphllm.default_passes(), spy], backend="eager")
    assert "spy" not in [r.name for r in compiled.result.records]  # not run on the model graph
    assert kinds == []  # train passes run when the step is first traced
    compiled(ids).float().pow(2).mean().backward()
    assert [k[:2] for k in kinds] == [("train", "forward"), ("train", "backward")]
    assert kinds[0][2] == 6 * 2 + 1  # the forward graph still calls the graphllm ops (eager keeps them)
    records = compiled.result.train_stage.records
    assert [(r.name, r.graph_kind) for r in records] == [("spy", "forward"), ("spy", "backward")]
    assert records[0].counters == {"forward": 1} and records[1].counters["backward"] == 1
    assert all(p.grad is not None for p in model.parameters())


def test_train_pass_records_count_one_graph_each() -> None:
    @graph_pass("count_nodes", stage="train")
    def count_nodes(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        ctx.count("nodes", len(gm.graph.nodes))
        return gm

    compiled = graphllm.compile(_Tiny(), torch.randn(3, 4), passes=[count_nodes], backend="eager")
    compiled(torch.randn(3, 4)).sum().backward()
    graphs = compiled.result.train_stage.graphs
    records = {r.graph_kind: r.counters for r in compiled.result.train_stage.records}
    assert records == {kind: {"nodes": len(graphs[kind].graph.nodes)} for kind in ("forward", "backward")}


# ---------------------------------------------------------------- the default pipeline on tiny-llama

@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_default_pipeline_on_tiny_llama(attn: str, request: pytest.FixtureRequest) -> None:
    repro = f"reproduce: python -m pytest tests/test_pass_manager.py -k '{request.node.name}'"
    model = graphllm.load_model("tiny-llama", attn_implementation=attn)
    cfg = model.config
    L = cfg.num_hidden_layers
    ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    compiled = graphllm.compile(model, ids, backend="eager")
    want = {"fuse_rms_norm": 2 * L + 1, "fuse_add_rms_norm": 2 * L, "fuse_swiglu": L, "fuse_rope": 2 * L,
            "fuse_attention": L}
    got = {r.name: r.counters.get("replaced", 0) for r in compiled.result.records if r.name in want}
    assert got == want
    gm = compiled.result.model_graph
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_function")
    # every norm but the first reads a residual add, which joins it
    assert [calls[op] for op in GRAPHLLM_OPS] == [1, 2 * L, L, 2 * L, L]
    leftovers = {op: calls[op] for op in (aten.rsqrt.default, aten.pow.Tensor_Scalar, aten.silu.default,
                                          aten.neg.default, aten.slice.Tensor, aten.softmax.int, aten.matmul.default,
                                          aten.expand.default, aten.triu.default,
                                          aten.scaled_dot_product_attention.default) if calls[op]}
    assert not leftovers, f"pattern ops left after the default pipeline: {leftovers}"
    for n in gm.graph.nodes:
        if n.target is gops.attention.default:  # GQA kept: k and v have the kv heads, causal
            q, k, v, scale, causal = n.args
            assert tuple(k.meta["val"].shape) == tuple(v.meta["val"].shape) == (2, cfg.num_key_value_heads, 32,
                                                                                  cfg.head_dim)
            assert tuple(q.meta["val"].shape) == (2, cfg.num_attention_heads, 32, cfg.head_dim)
            assert causal is True and scale == pytest.approx(cfg.head_dim**-0.5)
    # the fused model graph computes the model (run directly, no backend)
    with torch.no_grad():
        err = rel_err(gm(ids), model(ids))
    assert err <= FP32_RTOL, f"tiny-llama/{attn} fused graph rel err {err:.2e}; {repro}"
