"""build_pipeline: the one place that decides a plan's steps, their stages, order and reasons.

- the steps for the default plan and for tp2 × pp2 + SP + recompute (the README's example), dp, overlap;
- generation and by-layer profiling add their steps; every step says why it sits where it does;
- user passes: placed at the end of their stage's user slot, moved only by their own after=/before=
  (a user `before=["fuse_swiglu"]` used to push the built-in fuse_swiglu down instead);
- --disable: unknown names and steps the plan needs are refused with one line.
"""

from __future__ import annotations

import pytest
import torch.fx as fx

from graphllm.errors import GraphllmError
from graphllm.pass_pipeline import build_pipeline
from graphllm.passes import PassContext, graph_pass
from graphllm.plan import CompilePlan
from graphllm.planning import Layout
from graphllm.planning.recompute_config import RecomputeConfig

FUSIONS = ["fuse_rms_norm", "fuse_add_rms_norm", "fuse_swiglu", "fuse_rope", "fuse_attention", "fold_constants",
           "fuse_linear_cross_entropy"]


def _steps(plan: CompilePlan, **kw) -> list[tuple[str, str]]:
    return [(s.name, s.stage) for s in build_pipeline(plan, **kw).steps]


def _user(name: str, stage: str = "model", **kw):
    def fn(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        return gm
    fn.__module__ = "my_passes"  # defined outside graphllm: a user pass
    return graph_pass(name, stage=stage, **kw)(fn)


def test_default_plan() -> None:
    assert _steps(CompilePlan(backend="eager")) == [(n, "model") for n in FUSIONS] + [
        ("lower_ops", "lower"), ("partition", "partition"), ("eager", "backend")]


def test_tp2_pp2_sp_recompute() -> None:
    plan = CompilePlan(backend="inductor", batch_size=1, layout=Layout(tp=2, pp=2, sequence_parallel=True,
                                                                        micro_batches=2),
                       recompute=RecomputeConfig(policy="full"))
    pipeline = build_pipeline(plan)
    assert [(s.name, s.stage) for s in pipeline.steps] == [(n, "model") for n in FUSIONS] + [
        ("tensor_parallel", "model"), ("sequence_parallel", "model"), ("lower_ops", "lower"),
        ("pipeline_split", "split"), ("partition", "partition"), ("lower_collectives", "train"),
        ("inductor", "backend")]
    described = {d["step"]: d for d in pipeline.describe()}
    assert described["partition"]["options"] == {"recompute": "full uniform 1"}
    assert described["lower_ops"]["options"] == {"lowering": "decompose"}
    assert described["tensor_parallel"]["origin"] == "graphllm.passes.tensor_parallel"
    assert all(d["why"] for d in described.values())


def test_data_parallel_and_overlap_steps() -> None:
    dp = _steps(CompilePlan(backend="eager", layout=Layout(dp=2)))
    assert ("dp_grad_reduce", "train") in dp and ("lower_collectives", "train") not in dp  # eager keeps the ops
    coc = _steps(CompilePlan(backend="eager", layout=Layout(tp=2, coc_parallel_num=2)))
    assert coc.index(("coc", "model")) == coc.index(("tensor_parallel", "model")) + 1
    assert ("lower_collectives", "train") in coc  # chunked overlap needs async collectives, even on eager
    mc2 = build_pipeline(CompilePlan(backend="eager", layout=Layout(tp=2, mc2=True, coc_parallel_num=4)))
    assert [s.graph_pass.options for s in mc2.steps if s.name == "mc2"] == [{"chunks": 4}]
    assert "coc" not in [s.name for s in mc2.steps]


def test_generation_and_profiling_steps() -> None:
    gen = _steps(CompilePlan(backend="eager"), purpose="generate")
    assert gen.index(("pair_rope", "model")) == len(FUSIONS)
    tp = _steps(CompilePlan(backend="eager", layout=Layout(tp=2)), purpose="generate", cache_shapes={2: [4, 1, 1, 8, 4]})
    assert tp.index(("tp_cache_inputs", "model")) + 1 == tp.index(("tensor_parallel", "model"))
    prof = _steps(CompilePlan(backend="eager", layout=Layout(dp=2)), purpose="profile_layers")
    assert prof.index(("layer_markers", "train")) < prof.index(("dp_grad_reduce", "train"))


def test_user_before_constraint_moves_the_user_pass_not_the_builtin() -> None:
    early = _user("early", before=["fuse_swiglu"])
    names = [s.name for s in build_pipeline(CompilePlan(backend="eager"), user=[early]).steps]
    assert names[:8] == ["fuse_rms_norm", "fuse_add_rms_norm", "early", "fuse_swiglu", "fuse_rope", "fuse_attention",
                         "fold_constants", "fuse_linear_cross_entropy"]


def test_user_passes_default_slot_and_after_constraint() -> None:
    plan = CompilePlan(backend="eager", layout=Layout(tp=2))
    a, b, late = _user("a"), _user("b"), _user("late", after=["tensor_parallel"])
    names = [s.name for s in build_pipeline(plan, user=[a, late, b]).steps if s.stage == "model"]
    # unconstrained user passes: after the fusions, before sharding, in list order
    assert names == FUSIONS + ["a", "b", "tensor_parallel", "late"]
    tr = _user("count", stage="train")
    steps = build_pipeline(CompilePlan(backend="eager", layout=Layout(dp=2)), user=[tr]).steps
    assert [s.name for s in steps if s.stage == "train"] == ["count", "dp_grad_reduce"]
    assert [s.user for s in steps if s.stage == "train"] == [True, False]


def test_user_pass_given_in_the_passes_list_counts_as_user() -> None:
    from graphllm.passes import default_passes

    mine = _user("mine")
    pipeline = build_pipeline(CompilePlan(backend="eager"), passes=default_passes() + [mine])
    assert [s.name for s in pipeline.steps if s.user] == ["mine"]


def test_impossible_user_constraints_are_refused() -> None:
    bad = _user("bad", after=["fuse_attention"], before=["fuse_rms_norm"])
    with pytest.raises(GraphllmError, match="must run after fuse_attention and before fuse_rms_norm"):
        build_pipeline(CompilePlan(backend="eager"), user=[bad])


def test_disable() -> None:
    names = [s.name for s in build_pipeline(CompilePlan(backend="eager", disable=["fuse_rope"])).steps]
    assert "fuse_rope" not in names and "fuse_attention" in names
    with pytest.raises(GraphllmError, match=r"unknown pass\(es\) fuse_nothing"):
        build_pipeline(CompilePlan(backend="eager", disable=["fuse_nothing"]))
    with pytest.raises(GraphllmError, match="--disable tensor_parallel: the plan needs it"):
        build_pipeline(CompilePlan(backend="eager", layout=Layout(tp=2), disable=["tensor_parallel"]))
