"""The Ascend pre-flight of a compile: every graph the NPU would compile, checked against torchair.

`graphllm compile --backend npu --dry-run` builds the plan on CPU with the `npu-emulated` backend (the npu
lowering, torch_npu's kernels emulated with their exact schemas: graphllm.preflight.npu_kernels), so each
rank's forward, backward, pipeline-stage and DPO reference graphs are the graphs torchair would get, then
checks every op (graphllm.preflight.check). Rank 0 also compiles the generation graphs (a prefill and the
decode graph, fp32 and tp 1 as `graphllm generate` runs them) and checks them with ACL-graph capture's rules.
The artifact written is the npu plan's (backend npu), so the same directory runs on an Ascend machine.
A compile with `--backend npu` on an Ascend machine runs the same check on its graphs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any

from graphllm.errors import GraphllmError
from graphllm.plan import CompilePlan
from graphllm.preflight.check import (GraphCheck, blocking_line, check_graph, coverage_counts, first_blocking,
                                      model_origins)
from graphllm.preflight.wheel import WHEEL_ENV

EMULATED_BACKEND = "npu-emulated"
PREFLIGHT_FILE = "preflight.json"
GENERATION_PREFILL = 16
"""The prefill length checked (one bucket: every bucket's graph has the same ops)."""


@contextlib.contextmanager
def wheel_env(path: Path | None):
    """`--torch-npu-wheel` for one command: where the torch_npu sources come from, for this process and the ranks
    it launches (through the environment), restored afterwards (a CLI called in-process leaves nothing behind)."""
    before = os.environ.get(WHEEL_ENV)
    if path is not None:
        os.environ[WHEEL_ENV] = str(Path(path).resolve())
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(WHEEL_ENV, None)
        else:
            os.environ[WHEEL_ENV] = before


def emulated_plan(plan: CompilePlan) -> CompilePlan:
    """The plan a dry run builds: the npu lowering on CPU with emulated kernels."""
    if plan.backend != "npu":
        raise GraphllmError(f"--dry-run checks graphs for the Ascend backend: add --backend npu "
                            f"(got --backend {plan.backend})")
    return dataclasses.replace(plan, backend=EMULATED_BACKEND, device="cpu")


def converter_index_and_label(wheel: Path | None = None) -> tuple[dict, str]:
    """The converter index and "torch_npu X.Y.Z" of `wheel` (the --torch-npu-wheel flag, named in errors), else
    of the sources graphllm.preflight.wheel finds (WHEEL_ENV carries the flag to the ranks)."""
    from graphllm.preflight.converters import converter_index
    from graphllm.preflight.wheel import sources_version, torch_npu_sources

    root = torch_npu_sources(wheel)
    return converter_index(root), f"torch_npu {sources_version(root)}"


def capture_training(plan: CompilePlan) -> bool:
    """Training graphs are ACL-graph captured under `--npu-mode reduce-overhead`."""
    return plan.npu.mode == "reduce-overhead"


def built_checks(built, plan: CompilePlan, index) -> list[GraphCheck]:
    """This rank's training (and DPO reference) graphs, checked."""
    origins = model_origins(built.result.lowered_graph)
    capture = capture_training(plan)
    checks = [check_graph(g, index, rank=built.rank, graph=name, capture=capture, origins=origins)
              for name, g in built.result.train_stage.graphs.items()]
    if built.reference is not None:
        ref = built.reference.result
        ref_origins = model_origins(ref.lowered_graph)
        checks += [check_graph(g, index, rank=built.rank, graph=f"reference/{name}", capture=capture,
                               origins=ref_origins) for name, g in ref.train_stage.graphs.items()]
    return checks


def generation_checks(plan: CompilePlan, index) -> list[GraphCheck]:
    """The prefill and decode graphs `graphllm generate` compiles for this model, checked (decode with
    ACL-graph capture rules: serving stacks capture decode)."""
    import torch

    from graphllm.generate.engine import StaticGenerator
    from graphllm.models import load_model

    model = load_model(plan.model, seed=plan.seed, attn_implementation=plan.attn_implementation)
    max_len = min(model.config.max_position_embeddings, max(2 * GENERATION_PREFILL, plan.seq_len))
    gen = StaticGenerator(model, batch_size=plan.batch_size, max_len=max_len, backend=EMULATED_BACKEND,
                          min_bucket=GENERATION_PREFILL)
    checks = []
    with torch.no_grad():
        for name, graph in (("generate/prefill", gen.prefill_graph(GENERATION_PREFILL)),
                            ("generate/decode", gen.decode_graph())):
            result = graph.fn.result
            origins = model_origins(result.lowered_graph)
            for kind, g in result.train_stage.graphs.items():
                checks.append(check_graph(g, index, rank=0, graph=f"{name}" + ("" if kind == "inference" else f"/{kind}"),
                                          capture=name.endswith("decode") or capture_training(plan), origins=origins))
    return checks


def rank_preflight(built, plan: CompilePlan, *, generation: bool) -> dict[str, Any]:
    """What one rank contributes to preflight.json."""
    index, label = converter_index_and_label()
    checks = built_checks(built, plan, index)
    if generation:
        checks += generation_checks(plan, index)
    return {"wheel": label, "checks": [c.to_json() for c in checks]}


def merge(per_rank: list[dict[str, Any]], *, dry_run: bool) -> dict[str, Any]:
    """preflight.json: every rank's checks, the first blocking op's line, distinct-op counts per status."""
    checks = [GraphCheck.from_json(c) for r in per_rank for c in r["checks"]]
    wheel = per_rank[0]["wheel"]
    found = first_blocking(checks)
    return {"wheel": wheel, "dry_run": dry_run, "counts": coverage_counts(checks),
            "blocking": blocking_line(*found, wheel) if found else None,
            "checks": [c.to_json() for c in checks]}


def read_preflight(root: Path) -> dict[str, Any]:
    path = Path(root) / PREFLIGHT_FILE
    if not path.is_file():
        raise GraphllmError(f"{root} has no {PREFLIGHT_FILE}: it was not compiled for the Ascend backend; "
                            f"compile it with --backend npu (add --dry-run on a machine without an NPU)")
    import json

    return json.loads(path.read_text())
