"""Plan → compiled model, for `graphllm compile` (writes the artifact) and `graphllm run` (reads it)."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from graphllm.artifact import (FORMAT_VERSION, commit_out_dir, graphs_dir, prepare_out_dir, read_plan, versions,
                               write_json)
from graphllm import compile_cache
from graphllm.backends import get_backend
from graphllm.compile import AMP_DTYPES, CompiledModel, CompileResult, compile_graph, compile_pipeline, prepare_graph
from graphllm.dump import write_split
from graphllm.errors import GraphllmError
from graphllm.models import load_model
from graphllm.parallel import groups
from graphllm.parallel.engine import Engine, persistent_buffers
from graphllm.pass_pipeline import Pipeline, Purpose, build_pipeline, load_pass_spec, recorded_user_passes
from graphllm.passes import GraphPass
from graphllm.plan import CompilePlan
from graphllm.report import build_report, report_markdown
from graphllm.resume import weights_fingerprint
from graphllm.tasks import batch_example, build_task, graph_inputs, local_seq_len, uses_reference_graph
from graphllm.tasks.reference import reference_target
from graphllm.train_stage import StageSet

logger = logging.getLogger("graphllm")
PARAMS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""--params-dtype → the dtype the model's parameters are loaded in (graphllm.parallel.master_weights keeps the fp32
masters)."""

@dataclass(kw_only=True)
class Built:
    plan: CompilePlan
    model: torch.nn.Module
    result: CompileResult
    engine: Engine
    rank: int
    compiled: CompiledModel | None = None
    """The whole-model compiled graph (None under pipeline parallelism: the engine holds the stages)."""
    reference: CompiledModel | None = None
    """DPO's compiled reference graph (graphllm.tasks.reference): the engine runs it under `--reference graph`;
    under `--reference precompute` the trainer runs it once over the data, then drops it."""
    compile_seconds: float = 0.0
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    """Where build/load time went, in seconds: model, capture, passes, compile_cache, compile (Dynamo,
    aot_autograd, the backend and the first forward/backward)."""

    @property
    def pipeline(self) -> Pipeline:
        return self.result.pipeline


def example_batch(plan: CompilePlan, rows: int | None = None) -> tuple[torch.Tensor, ...]:
    """A step's batch of zeros (what Engine.forward_backward takes): (input_ids, labels), the task's columns
    (graphllm.tasks: DPO's precomputed reference log-probs, PRM's reward token ids), and position_ids when the
    plan resets them at packed-sample boundaries."""
    return batch_example(plan, rows)


def build(plan: CompilePlan, *, user: Sequence[GraphPass] = (), purpose: Purpose = "train",
          dump_dir: Path | None = None, warm: bool = True) -> Built:
    """Load the model, compile this rank's graph(s) per the plan; with `warm`, run one step so every
    graph is compiled. Under a layout of several ranks, joins the process group first (torchrun's env).
    `user`: user passes (placed by graphllm.pass_pipeline)."""
    t0 = time.perf_counter()
    if plan.backend == "npu":
        get_backend("npu").prepare()  # the npu device exists only once torch_npu is loaded
    layout = plan.layout
    st = join_world(plan)
    rank = st.rank if st is not None else 0
    t_model = time.perf_counter()
    model = load_model(plan.model, seed=plan.seed, attn_implementation=plan.attn_implementation,
                       dtype=PARAMS_DTYPES[plan.params_dtype],
                       mtp_layers=plan.mtp.layers).to(plan.device)  # bf16: captured with bf16 params
    set_loss_options(model, plan)
    t_model = time.perf_counter() - t_model
    cfg = model.config
    if plan.seq_len > cfg.max_position_embeddings:
        raise GraphllmError(f"--seq-len {plan.seq_len} exceeds the model's max_position_embeddings "
                            f"{cfg.max_position_embeddings}")
    layout.check_model(cfg, batch_size=plan.batch_size, seq_len=plan.seq_len)
    plan.moe.check_model(cfg)
    task = build_task(plan, model)
    # before the policy: compiling adopts tensor-parallel shards into the modules it captured
    reference = _build_reference(plan, model, st, rank, dump_dir, user) if plan.task.kind == "dpo" else None
    pipeline = build_pipeline(plan, purpose=purpose, user=user)
    inputs = graph_inputs(plan)
    compiled = None
    moe_metrics = moe_metric_names(pipeline, model)  # before compiling: a rate the plan cannot serve is refused
    if not pipeline.splits:
        compiled = compile_pipeline(task.target, inputs, pipeline, groups=st, rank=rank, dump_dir=dump_dir)
        result = compiled.result
        engine = Engine(layout=layout, st=st, named_params=dict(task.trained.named_parameters()), step_fn=compiled,
                        micro_batch_size=plan.batch_size, seq_len=plan.seq_len,
                        metric_names=task.metrics + moe_metrics,
                        reference=reference if uses_reference_graph(plan) else None,
                        offload_optimizer=plan.offload_optimizer, named_state=persistent_buffers(task.trained))
    else:
        metrics = task.metrics + moe_metrics  # (MTP's; the other tasks' metrics do not pass pp's plan checks)
        result, runner = _build_stages(pipeline, model, inputs, st, dump_dir, num_metrics=len(metrics))
        engine = Engine(layout=layout, st=st, named_params=runner.named_parameters(), pipeline=runner,
                        micro_batch_size=plan.batch_size, seq_len=plan.seq_len, metric_names=metrics,
                        offload_optimizer=plan.offload_optimizer, named_state=persistent_buffers(model))
    if plan.moe.bias_update_rate is not None:
        engine.expert_bias = (dict(model.named_buffers()), plan.moe.bias_update_rate)
    built = Built(plan=plan, model=task.trained, result=result, engine=engine, rank=rank, compiled=compiled,
                  reference=reference, timings={"model": t_model, **result.timings})
    if warm:
        warm_up(built)
    built.compile_seconds = time.perf_counter() - t0
    return built


def moe_metric_names(pipeline: Pipeline, model: torch.nn.Module) -> tuple[str, ...]:
    """The metrics the moe_stats step appends to the graph's output (none when the pipeline has no such step), with
    the routing-bias counts when --moe-bias-update-rate asks for them."""
    from graphllm.passes.moe_stats import METRICS, bias_count_names

    rate = pipeline.plan.moe.bias_update_rate
    if not any(step.name == "moe_stats" for step in pipeline.steps):
        if rate is not None:
            raise GraphllmError(f"--moe-bias-update-rate {rate} needs the load counts of --moe-stats on; drop the "
                                "rate or turn the statistics on")
        return ()
    if rate is None:
        return METRICS
    counts = bias_count_names(model)
    if not counts:
        raise GraphllmError(f"--moe-bias-update-rate {rate}: {model.config.model_type} has no routing bias "
                            "(e_score_correction_bias: DeepSeek-V3's aux-free balancing); leave the rate out")
    return METRICS + counts


def _build_reference(plan: CompilePlan, model: torch.nn.Module, st, rank: int, dump_dir: Path | None,
                     user: Sequence[GraphPass]) -> CompiledModel:
    """DPO's forward-only reference graph: the plan's pipeline for purpose "reference" (no adapter steps) on
    graphllm.tasks.reference's target; dumps under `dump_dir`/reference/."""
    target = reference_target(plan, model)
    pipeline = build_pipeline(plan, purpose="reference", user=user)
    with torch.no_grad():
        return compile_pipeline(target, graph_inputs(plan)[:2], pipeline, groups=st, rank=rank,
                                dump_dir=dump_dir / "reference" if dump_dir is not None else None)


def _build_stages(pipeline: Pipeline, model: torch.nn.Module, inputs, st, dump_dir,
                  num_metrics: int = 0) -> tuple[CompileResult, object]:
    """The pipeline's split step: prepare the whole graph, split it into stages, compile this rank's
    stages (and the loss graph, which returns `num_metrics` metrics beside the loss: moe_stats')."""
    from graphllm.parallel.pipeline import PipelineRunner
    from graphllm.passes.pipeline_split import split_pipeline

    plan = pipeline.plan
    prepared = prepare_graph(model, inputs, pipeline, groups=st, rank=st.rank, dump_dir=dump_dir)
    split = split_pipeline(prepared.gm, plan.layout, model.config.num_hidden_layers)
    if prepared.dump_root is not None:  # readable, beside the model graphs (not in the pass list)
        write_split(split, prepared.dump_root / "model" / "pipeline_split")
    stages = StageSet()
    amp_dtype = AMP_DTYPES[plan.amp]

    def compile_stage(gm, name: str):
        fn = compile_graph(gm, prepared.backend, stages.add(name, prepared.train_stage(name)))
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

    runner = PipelineRunner(split, plan.layout, st, compile_stage=compile_stage, micro_batch_size=plan.batch_size,
                            seq_len=local_seq_len(plan), device=plan.device,  # the tokens this cp rank holds
                            num_metrics=num_metrics, model_names={id(p): n for n, p in model.named_parameters()})
    result = CompileResult(model_graph=prepared.model_graph, lowered_graph=prepared.gm, records=prepared.records,
                           dumps=prepared.dumps, pipeline=pipeline, train_stage=stages, backend=plan.backend,
                           example_shapes=[tuple(t.shape) for t in inputs], model_graph_hash=prepared.model_hash,
                           timings=prepared.timings)
    return result, runner


def set_loss_options(model, plan: CompilePlan) -> None:
    """What the plan adds to the model's training loss, set before capture: the MTP weight, the router z- and
    sequence-wise loss weights, and the context-parallel ranks the router statistics are gathered from."""
    model.mtp_loss_weight = plan.mtp.loss_weight
    model.router_z_loss_coeff = plan.moe.z_loss_coeff or 0.0
    model.seq_aux_loss_coeff = plan.moe.seq_aux_loss_coeff or 0.0
    model.seq_parts = plan.layout.cp  # captured for 1/cp of each sequence (passes/context_parallel.py)


def warm_up(built: Built) -> None:
    """Compile forward and backward now (Dynamo compiles lazily) with one step on zeros; no trace left."""
    t0 = time.perf_counter()
    built.engine.forward_backward(*example_batch(built.plan, built.plan.global_batch_size))
    for p in built.engine.params:
        p.grad = None
    if built.reference is not None and built.engine.reference is None:  # --reference precompute: its graph too
        with torch.no_grad():
            built.reference(*graph_inputs(built.plan)[:2])
    built.timings["compile"] = time.perf_counter() - t0


def join_world(plan: CompilePlan):
    """This process's parallel state for the plan (joining torchrun's world when it has several ranks)."""
    layout = plan.layout
    st = groups.state()
    if layout.world_size > 1 and (st is None or st.layout != layout):
        st = groups.init_parallel(layout, plan.device)
    elif layout.world_size == 1:
        groups.init_parallel(layout, plan.device)  # checks that no larger world was launched
        st = None
    return st


def compile_artifact(plan: CompilePlan, out: str | Path, *, user: Sequence[GraphPass] = (),
                     dry_run: bool = False) -> tuple[Built, dict]:
    """Compile per `plan` on every rank and write the artifact directory `out` (atomically, by rank 0):
    each rank dumps its own graphs under graphs/rank<r>/; plan.json holds the plan, the pipeline that ran
    and every rank's graph hash. User passes: the plan's `--pass` specs, then `user`. A plan for the npu
    backend also gets preflight.json (graphllm.npu_preflight); `dry_run` builds it on CPU with the
    kernels emulated, and the artifact still holds the npu plan."""
    from graphllm import npu_preflight

    out = Path(out)
    user = [load_pass_spec(s) for s in plan.passes] + list(user)
    built_plan = npu_preflight.emulated_plan(plan) if dry_run else plan
    st = join_world(built_plan)
    rank = st.rank if st is not None else 0
    tmp = groups.broadcast_object(prepare_out_dir(out) if rank == 0 else None)
    try:
        with compile_cache.recording():  # what inductor compiles (or finds cached) for this rank's graphs
            built = build(built_plan, user=user, dump_dir=graphs_dir(tmp, rank))
            if built_plan.backend == "inductor":
                _store_compile_cache(built, tmp)
        res = built.result
        report = build_report(built, plan.batch_size * plan.seq_len)
        report["compile_seconds"] = round(built.compile_seconds, 2)
        mine = {"hash": res.model_graph_hash, "graphs": {"model": res.dumps, "train": res.train_stage.dumps},
                "report": report}
        if plan.backend == "npu":
            mine["preflight"] = npu_preflight.rank_preflight(built, plan, generation=dry_run and rank == 0)
        everyone = groups.gather_objects(mine)
        if rank == 0:
            pipeline = build_pipeline(plan, user=user).describe() if dry_run else built.pipeline.describe()
            _write_artifact(tmp, built, report, everyone, plan=plan, pipeline=pipeline)
            if plan.backend == "npu":
                report["preflight"] = npu_preflight.merge([e["preflight"] for e in everyone], dry_run=dry_run)
                write_json(tmp / npu_preflight.PREFLIGHT_FILE, report["preflight"])
            commit_out_dir(tmp, out)
        groups.barrier()
    except BaseException:
        if rank == 0 and plan.layout.world_size == 1:  # other ranks may still be writing their dumps into it:
            import shutil                              # then the next compile of `out` removes it

            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return built, report


def _write_artifact(tmp: Path, built: Built, report: dict, everyone: list[dict], *, plan: CompilePlan,
                    pipeline: list) -> None:
    from graphllm.data.tokenizer_match import model_tokenizer

    data = {
        "format": FORMAT_VERSION,
        "versions": versions(),
        "plan": plan.to_json(),
        "pipeline": pipeline,
        "model": {"source": built.model.source, "config": built.model.config.to_dict(),
                  "fingerprint": built.model.config.fingerprint(),
                  "weights_fingerprint": weights_fingerprint(built.model.config),
                  # what `graphllm run` checks --data against: an HF directory's own tokenizer (None without
                  # one), the built-in tokenizer for a preset
                  "tokenizer": model_tokenizer(built.model.source)},
        "graph_hash": {f"rank{r}": e["hash"] for r, e in enumerate(everyone)},
        "graphs": {f"rank{r}": e["graphs"] for r, e in enumerate(everyone)},
    }
    ranks = [e["report"] for e in everyone]
    write_json(tmp / "plan.json", data)
    write_json(tmp / "report.json", {**report, "ranks": ranks})
    (tmp / "report.md").write_text(report_markdown(report, plan.to_json(), ranks))


def _store_compile_cache(built: Built, tmp: Path) -> None:
    """This rank's compiled kernels into the artifact (graphllm/compile_cache.py), keyed by its graph hash."""
    libraries = list(built.result.train_stage.libraries)
    if built.reference is not None:
        libraries += built.reference.result.train_stage.libraries
    path = compile_cache.rank_file(tmp, built.rank)
    stored = compile_cache.store(path, compile_cache.cache_key(built.result.model_graph_hash), libraries)
    if stored is not None:
        logger.info("rank%d: stored %d compiled graphs and %d libraries (%.1f MB) in %s", built.rank,
                    stored["graphs"], stored["libraries"], stored["bytes"] / 1e6, path.relative_to(tmp))


def _load_compile_cache(root: Path, built: Built, enabled: bool | None) -> str:
    """Load this rank's stored kernels into the local inductor cache before anything compiles; one warning
    line when the artifact's cache cannot be used. Returns what happened: loaded, off, fallback or none."""
    if built.plan.backend != "inductor":
        return "none"
    if (compile_cache.disabled() if enabled is None else not enabled):
        return "off"
    t0 = time.perf_counter()
    why = compile_cache.load(compile_cache.rank_file(root, built.rank),
                             compile_cache.cache_key(built.result.model_graph_hash), what=f"rank{built.rank}")
    built.timings["compile_cache"] = time.perf_counter() - t0
    if why is not None:
        logger.warning("%s", why)
    return "fallback" if why is not None else "loaded"


def load_artifact(root: str | Path, *, purpose: Purpose = "train",
                  use_compile_cache: bool | None = None) -> tuple[dict[str, Any], Built]:
    """Rebuild this rank's compiled graphs from an artifact, refusing it when stale or foreign.
    `purpose="profile_layers"` compiles the same model graph with profiler ranges on the eager backend
    (inductor drops the ranges), for `graphllm profile --by-layer`. `use_compile_cache`: use the kernels the
    artifact holds (graphllm/compile_cache.py); None: unless $GRAPHLLM_NO_COMPILE_CACHE is set."""
    root = Path(root)
    data = read_plan(root)
    plan = CompilePlan.from_json(data["plan"], str(root / "plan.json"))
    if purpose == "profile_layers":
        plan = dataclasses.replace(plan, backend="eager")
    t0 = time.perf_counter()
    built = build(plan, user=recorded_user_passes(data["pipeline"]), purpose=purpose, warm=False)  # joins the world
    fp = built.model.config.fingerprint()
    if fp != data["model"]["fingerprint"]:
        raise GraphllmError(f"artifact {root} was compiled for another model (config {data['model']['fingerprint']}, "
                            f"{plan.model} now has {fp}); recompile it")
    key = f"rank{built.rank}"
    want, got = data["graph_hash"].get(key), built.result.model_graph_hash
    if want != got:
        raise GraphllmError(f"artifact {root} is stale: {key}'s graph rebuilt from its plan ({got}) differs from the "
                            f"compiled one ({want}), so model code or passes changed; recompile it")
    cache = _load_compile_cache(root, built, use_compile_cache)
    warm_up(built)  # compile now, so training's first step is a real step
    built.compile_seconds = time.perf_counter() - t0
    logger.info("rank%d: compiled in %.1f s (compile cache: %s): %s", built.rank, built.compile_seconds, cache,
                ", ".join(f"{k} {v:.2f} s" for k, v in built.timings.items()))
    return data, built
