"""Plan → compiled model, for `graphllm compile` (writes the artifact) and `graphllm run` (reads it)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from graphllm.artifact import (FORMAT_VERSION, commit_out_dir, graphs_dir, prepare_out_dir, read_plan, versions,
                               write_json)
from graphllm.backends import get_backend
from graphllm.compile import CompiledModel, compile
from graphllm.errors import GraphllmError
from graphllm.models import load_model
from graphllm.passes import GraphPass
from graphllm.plan import CompilePlan, describe_passes, pipeline_for
from graphllm.report import build_report, report_markdown


@dataclass(kw_only=True)
class Built:
    plan: CompilePlan
    model: torch.nn.Module
    compiled: CompiledModel
    compile_seconds: float


def example_batch(plan: CompilePlan) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (plan.batch_size, plan.seq_len)
    return (torch.zeros(shape, dtype=torch.long, device=plan.device),
            torch.zeros(shape, dtype=torch.long, device=plan.device))


def build(plan: CompilePlan, *, extra_passes: Sequence[GraphPass] = (), dump_dir: Path | None = None,
          warm: bool = True) -> Built:
    """Load the model, compile it per the plan; with `warm`, run one step so every graph is compiled."""
    t0 = time.perf_counter()
    if plan.backend == "npu":
        get_backend("npu").prepare()  # the npu device exists only once torch_npu is loaded
    model = load_model(plan.model, seed=plan.seed, attn_implementation=plan.attn_implementation).to(plan.device)
    cfg = model.config
    if plan.seq_len > cfg.max_position_embeddings:
        raise GraphllmError(f"--seq-len {plan.seq_len} exceeds the model's max_position_embeddings "
                            f"{cfg.max_position_embeddings}")
    passes = pipeline_for(plan, list(extra_passes))
    ids, labels = example_batch(plan)
    compiled = compile(model, ids, labels, passes=passes, backend=plan.backend, amp=plan.amp, dump_dir=dump_dir,
                       plan=plan.to_json())
    built = Built(plan=plan, model=model, compiled=compiled, compile_seconds=0.0)
    if warm:
        warm_up(built)
    built.compile_seconds = time.perf_counter() - t0
    return built


def warm_up(built: Built) -> None:
    """Compile forward and backward now (Dynamo compiles lazily) with one step on zeros; no trace left."""
    ids, labels = example_batch(built.plan)
    built.compiled(ids, labels).backward()
    built.model.zero_grad(set_to_none=True)


def compile_artifact(plan: CompilePlan, out: Path, *, extra_passes: Sequence[GraphPass] = ()) -> tuple[Built, dict]:
    """Compile per `plan` and write the artifact directory `out` (atomically)."""
    tmp = prepare_out_dir(out)
    try:
        built = build(plan, extra_passes=extra_passes, dump_dir=graphs_dir(tmp))
        plan.passes = describe_passes([p for p in built.compiled.result.passes])
        res = built.compiled.result
        report = build_report(built.compiled, plan.batch_size * plan.seq_len)
        report["compile_seconds"] = round(built.compile_seconds, 2)
        data = {
            "format": FORMAT_VERSION,
            "versions": versions(),
            "plan": plan.to_json(),
            "model": {"source": built.model.source, "config": built.model.config.to_dict(),
                      "fingerprint": built.model.config.fingerprint()},
            "graph_hash": {"rank0": res.model_graph_hash},
            "graphs": {"rank0": {"model": res.dumps, "train": res.train_stage.dumps}},
        }
        write_json(tmp / "plan.json", data)
        write_json(tmp / "report.json", report)
        (tmp / "report.md").write_text(report_markdown(report, plan.to_json()))
        commit_out_dir(tmp, out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return built, report


def load_artifact(root: Path) -> tuple[dict[str, Any], Built]:
    """Rebuild the compiled model from an artifact, refusing it when stale or foreign."""
    data = read_plan(root)
    plan = CompilePlan.from_json(data["plan"], str(root / "plan.json"))
    t0 = time.perf_counter()
    built = build(plan, warm=False)
    fp = built.model.config.fingerprint()
    if fp != data["model"]["fingerprint"]:
        raise GraphllmError(f"artifact {root} was compiled for another model (config {data['model']['fingerprint']}, "
                            f"{plan.model} now has {fp}); recompile it")
    want, got = data["graph_hash"]["rank0"], built.compiled.result.model_graph_hash
    if want != got:
        raise GraphllmError(f"artifact {root} is stale: the graph rebuilt from its plan ({got}) differs from the "
                            f"compiled one ({want}), so model code or passes changed; recompile it")
    warm_up(built)  # compile now, so training's first step is a real step
    built.compile_seconds = time.perf_counter() - t0
    return data, built
