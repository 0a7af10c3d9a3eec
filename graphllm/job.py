"""Plan → compiled model, for `graphllm compile` (writes the artifact) and `graphllm run` (reads it)."""

from __future__ import annotations

import dataclasses

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from graphllm.artifact import (FORMAT_VERSION, commit_out_dir, graphs_dir, prepare_out_dir, read_plan, versions,
                               write_json)
from graphllm.backends import StageSet, get_backend
from graphllm.compile import AMP_DTYPES, CompiledModel, CompileResult, compile, compile_graph, prepare_graph
from graphllm.errors import GraphllmError
from graphllm.models import load_model
from graphllm.parallel import groups
from graphllm.parallel.engine import Engine
from graphllm.passes import GraphPass
from graphllm.plan import CompilePlan, describe_passes, pipeline_for
from graphllm.report import build_report, report_markdown


@dataclass(kw_only=True)
class Built:
    plan: CompilePlan
    model: torch.nn.Module
    result: CompileResult
    engine: Engine
    rank: int
    compiled: CompiledModel | None = None
    """The whole-model compiled graph (None under pipeline parallelism: the engine holds the stages)."""
    compile_seconds: float = 0.0


def example_batch(plan: CompilePlan, rows: int | None = None) -> tuple[torch.Tensor, ...]:
    """(input_ids, labels), and position_ids when the plan resets them at packed-sample boundaries."""
    shape = (rows or plan.batch_size, plan.seq_len)
    batch = (torch.zeros(shape, dtype=torch.long, device=plan.device),
             torch.zeros(shape, dtype=torch.long, device=plan.device))
    if plan.eod_reset:
        batch += (torch.arange(plan.seq_len, device=plan.device).expand(shape).contiguous(),)
    return batch


def build(plan: CompilePlan, *, extra_passes: Sequence[GraphPass] = (), dump_dir: Path | None = None,
          warm: bool = True) -> Built:
    """Load the model, compile this rank's graph(s) per the plan; with `warm`, run one step so every
    graph is compiled. Under a layout of several ranks, joins the process group first (torchrun's env)."""
    t0 = time.perf_counter()
    if plan.backend == "npu":
        get_backend("npu").prepare()  # the npu device exists only once torch_npu is loaded
    layout = plan.layout()
    st = join_world(plan)
    rank = st.rank if st is not None else 0
    model = load_model(plan.model, seed=plan.seed, attn_implementation=plan.attn_implementation).to(plan.device)
    cfg = model.config
    if plan.seq_len > cfg.max_position_embeddings:
        raise GraphllmError(f"--seq-len {plan.seq_len} exceeds the model's max_position_embeddings "
                            f"{cfg.max_position_embeddings}")
    layout.check_model(cfg, batch_size=plan.batch_size, seq_len=plan.seq_len)
    passes = pipeline_for(plan, list(extra_passes))
    ids, labels, *extra = example_batch(plan)
    common = dict(passes=passes, backend=plan.backend, dump_dir=dump_dir, plan=plan.to_json(), rank=rank,
                  world_size=layout.world_size)
    compiled = None
    if layout.pp == 1:
        compiled = compile(model, ids, labels, amp=plan.amp, extra_inputs=extra, **common)
        result = compiled.result
        engine = Engine(layout=layout, st=st, named_params=dict(model.named_parameters()), step_fn=compiled,
                        micro_batch_size=plan.batch_size)
    else:
        result, runner = _build_pipeline(plan, model, (ids, labels), st, common)
        engine = Engine(layout=layout, st=st, named_params=runner.named_parameters(), pipeline=runner,
                        micro_batch_size=plan.batch_size)
    built = Built(plan=plan, model=model, result=result, engine=engine, rank=rank, compiled=compiled)
    if warm:
        warm_up(built)
    built.compile_seconds = time.perf_counter() - t0
    return built


def _build_pipeline(plan: CompilePlan, model: torch.nn.Module, inputs, st, common) -> tuple[CompileResult, object]:
    """Prepare the whole graph, split it into stages, compile this rank's stages (and the loss)."""
    from graphllm.parallel.pipeline import PipelineRunner
    from graphllm.passes.pipeline_split import split_pipeline

    prepared = prepare_graph(model, inputs, **common)
    layout = plan.layout()
    dump_dir = prepared.dump_root / "model" / "pipeline_split" if prepared.dump_root else None
    split = split_pipeline(prepared.gm, layout, model.config.num_hidden_layers, dump_dir=dump_dir)
    be = get_backend(plan.backend)
    stages = StageSet()

    amp_dtype = AMP_DTYPES[plan.amp]

    def compile_stage(gm, name: str):
        fn = compile_graph(gm, be, stages.add(name, prepared.train_stage(name)))
        if amp_dtype is None:
            return fn

        out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
        dtypes = [n.meta["val"].dtype for n in out_node] if isinstance(out_node, (tuple, list)) else None

        def autocast_stage(*args):  # as CompiledModel.forward does for the whole graph
            with torch.autocast(device_type=torch.device(plan.device).type, dtype=amp_dtype):
                out = fn(*args)
            if dtypes is None:
                return out
            # what crosses a stage boundary keeps the captured dtype: the receiver's buffers are sized by it
            return tuple(o.to(d) for o, d in zip(out, dtypes))
        return autocast_stage

    runner = PipelineRunner(split, layout, st, compile_stage=compile_stage, micro_batch_size=plan.batch_size,
                            seq_len=plan.seq_len, device=plan.device)
    result = CompileResult(model_graph=prepared.model_graph, lowered_graph=prepared.gm, records=prepared.records,
                           dumps=prepared.dumps, passes=prepared.passes, train_stage=stages, backend=plan.backend,
                           example_shapes=[tuple(t.shape) for t in inputs], model_graph_hash=prepared.model_hash)
    return result, runner


def warm_up(built: Built) -> None:
    """Compile forward and backward now (Dynamo compiles lazily) with one step on zeros; no trace left."""
    built.engine.forward_backward(*example_batch(built.plan, built.plan.global_batch_size))
    for p in built.engine.params:
        p.grad = None


def join_world(plan: CompilePlan):
    """This process's parallel state for the plan (joining torchrun's world when it has several ranks)."""
    layout = plan.layout()
    st = groups.state()
    if layout.world_size > 1 and (st is None or st.layout != layout):
        st = groups.init_parallel(layout, plan.device)
    elif layout.world_size == 1:
        groups.init_parallel(layout, plan.device)  # checks that no larger world was launched
        st = None
    return st


def compile_artifact(plan: CompilePlan, out: Path, *, extra_passes: Sequence[GraphPass] = ()) -> tuple[Built, dict]:
    """Compile per `plan` on every rank and write the artifact directory `out` (atomically, by rank 0):
    each rank dumps its own graphs under graphs/rank<r>/; plan.json holds every rank's graph hash."""
    st = join_world(plan)
    rank = st.rank if st is not None else 0
    tmp = groups.broadcast_object(prepare_out_dir(out) if rank == 0 else None)
    try:
        built = build(plan, extra_passes=extra_passes, dump_dir=graphs_dir(tmp, rank))
        res = built.result
        plan.passes = describe_passes(list(res.passes))
        report = build_report(built, plan.batch_size * plan.seq_len)
        report["compile_seconds"] = round(built.compile_seconds, 2)
        mine = {"hash": res.model_graph_hash, "graphs": {"model": res.dumps, "train": res.train_stage.dumps},
                "report": report}
        everyone = groups.gather_objects(mine)
        if rank == 0:
            data = {
                "format": FORMAT_VERSION,
                "versions": versions(),
                "plan": plan.to_json(),
                "model": {"source": built.model.source, "config": built.model.config.to_dict(),
                          "fingerprint": built.model.config.fingerprint()},
                "graph_hash": {f"rank{r}": e["hash"] for r, e in enumerate(everyone)},
                "graphs": {f"rank{r}": e["graphs"] for r, e in enumerate(everyone)},
            }
            ranks = [e["report"] for e in everyone]
            write_json(tmp / "plan.json", data)
            write_json(tmp / "report.json", {**report, "ranks": ranks})
            (tmp / "report.md").write_text(report_markdown(report, plan.to_json(), ranks))
            commit_out_dir(tmp, out)
        groups.barrier()
    except BaseException:
        if rank == 0:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return built, report


def load_artifact(root: Path, *, extra_passes: Sequence[GraphPass] = (),
                  backend: str | None = None) -> tuple[dict[str, Any], Built]:
    """Rebuild this rank's compiled graphs from an artifact, refusing it when stale or foreign.
    `extra_passes` (train-stage ones) and `backend` change how the same model graph is compiled
    (`graphllm profile --by-layer` adds profiler ranges and runs them on the eager backend)."""
    data = read_plan(root)
    plan = CompilePlan.from_json(data["plan"], str(root / "plan.json"))
    if backend is not None:
        plan = dataclasses.replace(plan, backend=backend)
    t0 = time.perf_counter()
    built = build(plan, extra_passes=extra_passes, warm=False)  # joins the plan's world
    fp = built.model.config.fingerprint()
    if fp != data["model"]["fingerprint"]:
        raise GraphllmError(f"artifact {root} was compiled for another model (config {data['model']['fingerprint']}, "
                            f"{plan.model} now has {fp}); recompile it")
    key = f"rank{built.rank}"
    want, got = data["graph_hash"].get(key), built.result.model_graph_hash
    if want != got:
        raise GraphllmError(f"artifact {root} is stale: {key}'s graph rebuilt from its plan ({got}) differs from the "
                            f"compiled one ({want}), so model code or passes changed; recompile it")
    warm_up(built)  # compile now, so training's first step is a real step
    built.compile_seconds = time.perf_counter() - t0
    return data, built
