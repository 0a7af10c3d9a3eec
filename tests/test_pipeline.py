"""Pipeline parallelism: split_pipeline's stage graphs (structure, exact sequential numerics, refusals)
and PipelineRunner on real gloo ranks (1F1B and interleaved 1F1B) against one process's full batch."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import weakref

import pytest
import torch

from dist_util import run_ranks

RTOL = 1e-5
"""fp32: the pipeline sums per-micro-batch means and gradients instead of one full-batch reduction,
which moves results by a few ulps of the largest value."""
LAYERS, MBS, SEQ = 4, 2, 16
REPRO = "reproduce: python -m pytest -q tests/test_pipeline.py -k "


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _model(tied: bool = False):
    from graphllm.models import PRESETS, build_model

    return build_model(dataclasses.replace(PRESETS["tiny-llama"](), tie_word_embeddings=tied), seed=0)


def _batch(rows: int):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 8000, (rows, SEQ), generator=g), torch.randint(0, 8000, (rows, SEQ), generator=g)


def _prepare(model, ids, labels=None):
    from graphllm.compile import plan_for, prepare_graph
    from graphllm.pass_pipeline import build_pipeline

    inputs = (ids,) if labels is None else (ids, labels)
    return prepare_graph(model, inputs, build_pipeline(plan_for(model, inputs, backend="eager")))


def _layout(**kw):
    from graphllm.planning.layout import Layout

    return Layout(**kw)


@pytest.fixture(scope="module")
def graph():
    model = _model()
    ids, labels = _batch(MBS)
    return model, _prepare(model, ids, labels).gm, ids, labels


# ---- structure and single-process numerics -------------------------------------------------------

def _io(gm):
    nodes = list(gm.graph.nodes)
    return [n for n in nodes if n.op == "placeholder"], next(n for n in nodes if n.op == "output").args[0]


SPLITS = {
    "pp2": dict(pp=2, micro_batches=2),
    "pp2_vpp2": dict(pp=2, vpp=2, micro_batches=2),
    "pp3_empty_ends": dict(pp=3, micro_batches=3, pp_layers=(0, 4, 0)),
    "pp4_empty_middle": dict(pp=4, micro_batches=4, pp_layers=(1, 0, 3, 0)),
}


@pytest.mark.parametrize("name", SPLITS)
def test_stage_inputs_are_previous_outputs(graph, name):
    from graphllm.passes.pipeline_split import split_pipeline

    model, gm, *_ = graph
    layout = _layout(**SPLITS[name])
    split = split_pipeline(gm, layout, LAYERS)
    assert len(split.stages) == layout.num_stages == len(split.layers) == len(split.param_names)
    assert [n.name for n in _io(split.stages[0])[0]] == ["input_ids"]
    for prev, g in itertools.pairwise(split.stages + [split.loss]):
        outs, ins = _io(prev)[1], _io(g)[0]
        assert isinstance(outs, tuple) and len(outs) > 0
        if g is split.loss:
            assert ins[-1].name == "labels"
            ins = ins[:-1]
        assert [n.name for n in ins] == [n.name for n in outs]
        assert [n.meta["val"].shape for n in ins] == [n.meta["val"].shape for n in outs]
    # every parameter lives in exactly one stage
    names = [p for ps in split.param_names for p in ps]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())


@pytest.mark.parametrize("name", SPLITS)
def test_sequential_stages_reproduce_unsplit(graph, name):
    """Running the stages one after another, then the loss graph, is the unsplit graph: bitwise loss."""
    from graphllm.passes.pipeline_split import split_pipeline

    model, gm, ids, labels = graph
    split = split_pipeline(gm, _layout(**SPLITS[name]), LAYERS)
    model.zero_grad()
    ref = gm(ids, labels)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    x = (ids,)
    for stage in split.stages:
        x = stage(*x)
    loss = split.loss(*x, labels)
    loss.backward()
    assert torch.equal(loss, ref), f"{loss.item()} != {ref.item()}; {REPRO}{name}"
    for n, p in model.named_parameters():
        assert rel_err(p.grad, ref_grads[n]) <= RTOL, f"{n}; {REPRO}{name}"


def test_pp_layers_assign_contiguous_chunks(graph):
    from graphllm.passes.pipeline_split import split_pipeline

    _, gm, *_ = graph
    split = split_pipeline(gm, _layout(pp=2, micro_batches=2, pp_layers=(1, 3)), LAYERS)
    assert split.layers == [[0], [1, 2, 3]]
    first, last = split.param_names
    assert "model.embed_tokens.weight" in first and all(".layers.0." in p for p in first[1:])
    assert {"model.norm.weight", "lm_head.weight"} <= set(last)
    assert {int(p.split(".")[2]) for p in last if ".layers." in p} == {1, 2, 3}


def test_flop_balanced_split_minimises_largest_stage(graph):
    """pp2: the split equals a brute-force argmin over contiguous splits; pp2×vpp2: one layer per stage."""
    from graphllm.planning.flops import node_flops
    from graphllm.passes.pipeline_split import split_pipeline

    _, gm, *_ = graph
    def stage_costs(split):
        costs = [sum(node_flops(n) for n in g.graph.nodes) for g in split.stages]
        costs[-1] += sum(node_flops(n) for n in split.loss.graph.nodes)
        return costs

    split = split_pipeline(gm, _layout(pp=2, micro_batches=2), LAYERS)
    best = min(max(stage_costs(split_pipeline(gm, _layout(pp=2, micro_batches=2, pp_layers=(c, LAYERS - c)), LAYERS)))
               for c in range(1, LAYERS))
    assert max(stage_costs(split)) == best
    assert split.layers == [[0, 1, 2], [3]]  # the 8000-word LM head weighs ~2.7 layers
    assert split_pipeline(gm, _layout(pp=2, vpp=2, micro_batches=2), LAYERS).layers == [[0], [1], [2], [3]]


def test_nodes_without_provenance_follow_their_inputs(graph):
    """An inserted op with no nn_module_stack (as a collective pass might add) lands in its input's stage."""
    import torch.fx as fx

    from graphllm.passes.pipeline_split import split_pipeline

    _, gm, ids, labels = graph
    gm2 = fx.GraphModule(gm, gm.graph.__deepcopy__())
    o_proj = next(n for n in gm2.graph.nodes if "layers.2.self_attn.o_proj" in str(n.meta.get("nn_module_stack")))
    with gm2.graph.inserting_after(o_proj):
        ident = gm2.graph.call_function(torch.ops.aten.mul.Tensor, (o_proj, 1.0))
    o_proj.replace_all_uses_with(ident, delete_user_cb=lambda u: u is not ident)
    ident.meta["val"] = o_proj.meta["val"]
    gm2.recompile()
    split = split_pipeline(gm2, _layout(pp=2, vpp=2, micro_batches=2), LAYERS)
    holders = [k for k, g in enumerate(split.stages) if any(n.target is torch.ops.aten.mul.Tensor and n.args[1] == 1.0
                                                             for n in g.graph.nodes)]
    assert holders == [2]
    x = (ids,)
    for stage in split.stages:
        x = stage(*x)
    assert torch.equal(split.loss(*x, labels), gm(ids, labels))


def test_dump_dir_gets_each_stage(graph, tmp_path):
    from graphllm.dump import write_split
    from graphllm.passes.pipeline_split import split_pipeline

    _, gm, *_ = graph
    write_split(split_pipeline(gm, _layout(pp=2, micro_batches=2), LAYERS), tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.py")) == ["loss.py", "stage0.py", "stage1.py"]
    assert "class PipelineStage1" in (tmp_path / "stage1.py").read_text()


def test_refusals(graph):
    from graphllm.errors import GraphllmError
    from graphllm.passes.pipeline_split import split_pipeline

    _, gm, ids, labels = graph
    with pytest.raises(GraphllmError, match="summing to the model's 4 layers"):
        split_pipeline(gm, _layout(pp=2, micro_batches=2, pp_layers=(1, 2)), LAYERS)
    with pytest.raises(GraphllmError, match="lower --pp/--vpp or give --pp-layers"):
        split_pipeline(gm, _layout(pp=4, vpp=2, micro_batches=4), LAYERS)
    with pytest.raises(GraphllmError, match="num_layers=6"):
        split_pipeline(gm, _layout(pp=2, micro_batches=2), 6)
    with pytest.raises(GraphllmError, match="compile with labels"):
        split_pipeline(_prepare(_model(), ids).gm, _layout(pp=2, micro_batches=2), LAYERS)
    tied = split_pipeline(_prepare(_model(tied=True), ids, labels).gm, _layout(pp=2, micro_batches=2), LAYERS)
    assert tied.shared == {"lm_head.weight": (0, 1)}  # the embedding is the LM head (the graph reads it by that name)


def test_runner_refuses_a_graph_captured_for_another_micro_batch(graph):
    from graphllm.errors import GraphllmError
    from graphllm.parallel.groups import ParallelState
    from graphllm.parallel.pipeline import PipelineRunner
    from graphllm.passes.pipeline_split import split_pipeline

    _, gm, *_ = graph
    layout = _layout(pp=2, micro_batches=2)
    split = split_pipeline(gm, layout, LAYERS)
    st = ParallelState(layout=layout, rank=0, coords=layout.coords(0), mesh=None)
    with pytest.raises(GraphllmError, match=r"captured for input_ids \[2, 16\] but a micro-batch is \[4, 16\]"):
        PipelineRunner(split, layout, st, compile_stage=lambda g, name: g, micro_batch_size=4, seq_len=SEQ)


# ---- PipelineRunner on 2 gloo ranks ---------------------------------------------------------------

def pipeline_steps(layouts: list[dict], compiled: bool) -> list:
    """For each layout (same world), one schedule step on this rank: the loss, the local gradients, whether
    the parameters of stages this rank does not hold were freed, and whether a second step accumulates."""
    from graphllm.parallel.groups import init_parallel
    from graphllm.parallel.pipeline import PipelineRunner
    from graphllm.passes.pipeline_split import split_pipeline

    results = []
    for layout_kw in layouts:
        tied = layout_kw.get("tied", False)
        layout = _layout(**{k: v for k, v in layout_kw.items() if k != "tied"})
        st = init_parallel(layout)
        model = _model(tied)
        ids, labels = _batch(layout.micro_batches * MBS)
        prepared = _prepare(model, ids[:MBS], labels[:MBS])
        split = split_pipeline(prepared.gm, layout, LAYERS)
        if compiled:
            from graphllm.backends import get_backend
            from graphllm.compile import compile_graph

            be = get_backend("eager")

            def compile_stage(gm, name, be=be, prepared=prepared):
                return compile_graph(gm, be, prepared.train_stage(name))
        else:
            def compile_stage(gm, name):
                return gm
        runner = PipelineRunner(split, layout, st, compile_stage=compile_stage, micro_batch_size=MBS, seq_len=SEQ,
                                model_names={id(p): n for n, p in model.named_parameters()})
        other = weakref.ref(model.model.norm.weight if st.coords.pp == 0 else model.model.layers[0].mlp.up_proj.weight)
        del model, prepared, split, compile_stage
        gc.collect()
        loss = runner.forward_backward(ids, labels)[0]  # [loss, *metrics]: this graph has none
        grads = {n: p.grad.clone() for n, p in runner.named_parameters().items()}
        again = runner.forward_backward(ids, labels)[0]  # a second step adds to .grad, leaving the first intact
        accumulates = torch.equal(again, loss) and all(
            rel_err(p.grad, 2 * grads[n]) <= RTOL for n, p in runner.named_parameters().items())
        results.append((loss, grads, other() is None, accumulates))
    return results


def _check_against_one_process(name: str, layouts: list[dict], compiled: bool = False):
    per_rank = run_ranks(pipeline_steps, 2, layouts, compiled)
    for layout_kw, outs in zip(layouts, zip(*per_rank)):
        model = _model(layout_kw.get("tied", False))
        ids, labels = _batch(layout_kw["micro_batches"] * MBS)
        ref = model(ids, labels)  # full-batch mean = mean of the equal-size micro-batch means
        ref.backward()
        ref_grads = {n: p.grad for n, p in model.named_parameters()}
        where = f"{layout_kw}; {REPRO}{name}"
        held = [set(grads) for _, grads, *_ in outs]
        shared = {"model.embed_tokens.weight"} if layout_kw.get("tied") else set()  # a tied LM head: both stages
        assert held[0] & held[1] == shared and held[0] | held[1] == set(ref_grads), where
        for rank, (loss, grads, freed, accumulates) in enumerate(outs):
            assert loss.dtype == torch.float32 and loss.dim() == 0
            assert rel_err(loss, ref.detach()) <= RTOL, f"rank {rank}: loss {loss.item()} vs {ref.item()}; {where}"
            for n, g in grads.items():
                assert rel_err(g, ref_grads[n]) <= RTOL, f"rank {rank}: grad of {n}; {where}"
            assert freed, f"rank {rank} kept a parameter of a stage it does not hold; {where}"
            assert accumulates, f"rank {rank}: a second step did not add its gradients to .grad; {where}"


def test_1f1b_matches_one_process():
    """pp2, micro-batches 2 and 4: Schedule1F1B."""
    _check_against_one_process("test_1f1b_matches_one_process",
                               [dict(pp=2, micro_batches=2), dict(pp=2, micro_batches=4)])


@pytest.mark.parametrize("pp", [2, 3])
def test_tied_model_trains_at_pp_like_one_process(tmp_path, pp):
    """A tied embedding and LM head at pp2 and pp3 (stage 0 embeds, the last stage projects): the first and last
    pipeline ranks hold the weight and end a step with the sum of both stages' gradients, summed over a group of
    just those two (pp3's middle rank holds no copy and takes no part); the clipped gradient norm counts it once,
    and 3 AdamW steps (grad clip 1.0) give one process's losses and parameters, under the model's names."""
    from hf_parity import FAMILIES, save_hf_checkpoint
    from test_expert_parallel import _check, train

    cfg_cls, model_cls, kwargs, _ = FAMILIES["llama"]
    torch.manual_seed(0)
    hf = cfg_cls(**{**kwargs, "tie_word_embeddings": True, "num_hidden_layers": pp})
    ckpt = str(save_hf_checkpoint(model_cls(hf), "llama", tmp_path))
    reference = train(ckpt, {"micro_batches": 4})  # the batch's 4 rows, one per micro-batch
    results = run_ranks(train, pp, ckpt, {"pp": pp, "micro_batches": 4})
    _check(f"tied pp{pp}", results, reference)
    holders = [r for r in results if "model.embed_tokens.weight" in r["params"]]
    assert len(holders) == 2 and all("lm_head.weight" not in r["params"] for r in results)


def test_interleaved_1f1b_matches_one_process():
    """pp2 × vpp2 (4 stages of one layer), micro-batches 2 and 4: ScheduleInterleaved1F1B."""
    _check_against_one_process("test_interleaved_1f1b_matches_one_process",
                               [dict(pp=2, vpp=2, micro_batches=2), dict(pp=2, vpp=2, micro_batches=4)])


def test_compiled_interleaved_pipeline_matches_one_process():
    """Stages compiled through graphllm's compile_graph (eager backend: Dynamo + aot_autograd)."""
    _check_against_one_process("test_compiled_interleaved", [dict(pp=2, vpp=2, micro_batches=4)], compiled=True)
