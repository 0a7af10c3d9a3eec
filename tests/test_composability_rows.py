"""Pairwise composability: each generated row of features (graphllm/planning/compat_rows.py, listed in
docs/composability.md) trains like one process.

A row turns all its features on together. Its ranks (world = the row's layout: 2 or 4 gloo processes) train
STEPS steps of a small llama; the same features without the layout (tp, sp, pp, vpp, dp, cp, zero1, CoC, MC2) train
the same batches on one process here, on the eager backend. Every step's loss must agree, and each rank's
compiled graphs must carry the marks of the row's features (a feature silently not applied fails the row). The
rows of one world size run in one launch, one after another (graphllm rebuilds its parallel state per layout).
The `npu` feature runs on the npu-emulated backend (the torchair lowering on CPU, kernels emulated).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from functools import cache

import pytest
import torch

from dist_util import run_ranks
from graphllm.cli.composability_doc import rows
from graphllm.planning.compat import plan_fields
from graphllm.planning.compat_rows import world_size

STEPS = 2
SEQ = 32
GLOBAL_BATCH = 4
ADAM_EPS = 1e-6
"""As tests/parallel_harness.py: rounding-noise gradients do not turn into ±lr sign flips."""
LAYERS = 2
"""The smallest model a two-stage pipeline splits; vpp rows take 4 (two stages of two virtual chunks)."""
LOSS_RTOL = 1e-5
"""fp32, as tests/test_parallel_training.py: sharded matmuls and reduced gradients only reorder sums."""
LOSS_RTOL_COMPILED = 1e-4
"""fp32 on inductor or npu-emulated against the eager reference: fused kernels reorder sums too (measured ≤ 2e-6)."""
LOSS_RTOL_BF16 = 3e-2
"""bf16 autocast or bf16 parameters: matmuls round to 8 bits of mantissa in another order on each side
(tests/test_parallel_training.py uses 2e-2 for bf16 pipelines; a missing reduction shows as O(1))."""
LAYOUT_FEATURES = ("tp", "sp", "pp", "vpp", "dp", "cp", "zero1", "coc", "mc2")
COLLECTIVE = r"all_reduce|all_gather|reduce_scatter|matmul_all_reduce|all_gather_matmul|matmul_reduce_scatter"
FAILING: list[set[str]] = []
"""Rows found failing on the ranks (Dynamo: Attempt to trace generator) and not yet narrowed into
graphllm/planning/compat_rows.py KNOWN_BROKEN (or a refusal): each is reported as an expected failure."""
MC2_OPS = r"matmul_all_reduce|all_gather_matmul|matmul_reduce_scatter|mm_all_reduce|all_gather_base_mm|mm_reduce_scatter"
GRAPH_MARKS = {
    "tp": COLLECTIVE, "sp": r"reduce_scatter",
    "cp": r"cp_ring_shift|cp_all_to_all|all_to_all|all_gather", "lora": r"lora_linear", "qlora": r"nf4_dequantize",
"fused-loss": r"linear_cross_entropy", "amp-bf16": r"bfloat16",
    "params-bf16": r"bfloat16", "npu": r"torch\.ops\.npu\.",
}
"""What a feature leaves in a rank's compiled (partitioned) graphs' code."""


@pytest.fixture(scope="module", autouse=True)
def _own_presets():
    """The rows' short models are presets only while this module runs (other tests list the built-in presets)."""
    from graphllm.models.presets import PRESETS

    before = set(PRESETS)
    yield
    for name in set(PRESETS) - before:
        del PRESETS[name]


def _model(names) -> str:
    from graphllm.models.presets import PRESETS, tiny_llama

    layers = 4 if "vpp" in names else LAYERS
    name = f"tiny-llama-{layers}l"
    PRESETS.setdefault(name, lambda: dataclasses.replace(tiny_llama(), num_hidden_layers=layers))
    return name


def _plan(names, *, ranks: bool):
    from graphllm.plan import CompilePlan

    on = [n for n in names if ranks or n not in LAYOUT_FEATURES]
    fields = plan_fields(*on)
    if not ranks or fields["backend"] == "npu":
        fields["backend"] = {"npu": "npu-emulated"}.get(fields["backend"], "eager") if ranks else "eager"
    sections = {f.name: f.default_factory for f in dataclasses.fields(CompilePlan)
                if f.default_factory is not dataclasses.MISSING}
    kw = {k: sections[k](**v) if isinstance(v, dict) else v for k, v in fields.items()}
    layout = fields.get("layout", {})
    rows_per_step = GLOBAL_BATCH // (layout.get("dp", 1) * layout.get("micro_batches", 1))
    return CompilePlan(model=_model(names), batch_size=rows_per_step, seq_len=SEQ, **kw)


def _batch_at(eod_reset: bool):
    def batch_at(step: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(1000 + step)
        ids = torch.randint(0, 8000, (GLOBAL_BATCH, SEQ), generator=g)
        batch = (ids, torch.randint(0, 8000, (GLOBAL_BATCH, SEQ), generator=g))
        if eod_reset:  # two packed samples per row, positions restarting at the second
            pos = torch.cat([torch.arange(SEQ // 2 - 3), torch.arange(SEQ // 2 + 3)])
            batch += (pos.expand(GLOBAL_BATCH, SEQ).contiguous(),)
        return batch
    return batch_at


def _marks(built, names) -> dict[str, bool]:
    """Whether each feature of the row shows in what this rank built (a pipeline rank holds its stage's graphs
    only: the test asks that some rank shows each feature)."""
    from graphllm.recompute import recomputed_nodes

    graphs = built.result.train_stage.graphs
    code = "\n".join([built.result.lowered_graph.code, *(g.code for g in graphs.values())])
    steps = {s.name: dict(s.options or (s.graph_pass.options if s.graph_pass else {})) for s in built.pipeline.steps}
    lay = built.engine.st.layout if built.engine.st else built.plan.layout
    out = {}
    for n in names:
        if n in ("offload-activations", "mc2") and built.result.backend == "inductor":
            # inductor partitions (and offloads) inside its own compile, after the graphs kept here, and lowers
            # MC2 to its matmuls and collectives: the step that asks for the feature is what can be checked
            out[n] = ("offload_activations" in steps.get("partition", {})) if n != "mc2" else "mc2" in steps
        elif n == "fused-loss" and "task-rm" in names:  # the reward model has no LM-head cross-entropy to fuse
            out[n] = "fuse_linear_cross_entropy" in steps
        elif n in GRAPH_MARKS:
            out[n] = re.search(GRAPH_MARKS[n], code) is not None
        elif n == "mc2":
            out[n] = re.search(MC2_OPS, code) is not None
        elif n.startswith("recompute-"):
            out[n] = sum(recomputed_nodes(g) for k, g in graphs.items() if "backward" in k) > 0
        elif n == "coc":
            out[n] = "coc" in steps or steps.get("mc2", {}).get("chunks") == 2
        elif n in ("pp", "vpp"):
            out[n] = bool(built.pipeline.splits) and lay.vpp == (2 if n == "vpp" else lay.vpp)
        elif n == "offload-activations":  # full recompute saves no attention output: nothing to offload
            out[n] = "recompute-full" in names or re.search(r"offload_to_host", code) is not None
        elif n == "eod-reset":
            out[n] = any("position" in s for s in getattr(built.result.train_stage, "input_names", ["position"]))
        else:
            out[n] = {"dp": lambda: lay.dp == 2, "zero1": lambda: lay.zero1,
                      "offload-optimizer": lambda: built.engine.offload_optimizer,
                      "task-dpo": lambda: built.reference is not None,
                      "task-rm": lambda: type(built.model).__name__ == "RewardModel",
                      "inductor": lambda: built.result.backend == "inductor"}[n]()
    return out


def train_row(names: tuple[str, ...], *, ranks: bool) -> dict:
    """STEPS steps of the row (with its layout on these ranks, or without it on one process)."""
    from graphllm.job import build
    from graphllm.train import TrainConfig, train_steps

    torch._dynamo.reset()
    t0 = time.perf_counter()
    plan = _plan(names, ranks=ranks)
    built = build(plan)
    cfg = TrainConfig(steps=STEPS, lr=1e-3, warmup_steps=1, grad_clip=1.0, eps=ADAM_EPS)
    opt = built.engine.make_optimizer(cfg)
    losses = [r["loss"] for r in train_steps(built.engine, _batch_at(plan.eod_reset), cfg, optimizer=opt)]
    return {"losses": losses, "marks": _marks(built, names) if ranks else {}, "seconds": time.perf_counter() - t0}


def train_rows(rows_to_run: list[tuple[str, ...]]) -> list[dict | str]:
    """Each row in turn on this rank (one launch for the rows of a world size); a failing row gives its error."""
    out: list[dict | str] = []
    for names in rows_to_run:
        try:
            out.append(train_row(names, ranks=True))
        except Exception as e:  # noqa: BLE001 - reported by the row's test
            chain, c = [], e
            while c is not None:  # the root cause: a pipeline stage wraps the error of its graph
                chain.append(f"{type(c).__name__}: {str(c).strip()[:600]}")
                c = c.__cause__ or c.__context__
            out.append(" <- ".join(chain))
    return out


@cache
def launched(world: int) -> dict[tuple[str, ...], list]:
    """Every rank's result of each row of this world size."""
    todo = [r for r in rows() if world_size(r) == world]
    per_rank = run_ranks(train_rows, world, todo, timeout=900.0)
    return {r: [per_rank[k][i] for k in range(world)] for i, r in enumerate(todo)}


def _rtol(names) -> float:
    if "amp-bf16" in names or "params-bf16" in names:
        return LOSS_RTOL_BF16
    return LOSS_RTOL_COMPILED if {"inductor", "npu"} & set(names) else LOSS_RTOL


@pytest.mark.parametrize("i", range(len(rows())), ids=lambda i: f"row{i}")
def test_row_trains_like_one_process(i) -> None:
    names = rows()[i]
    per_rank = launched(world_size(names))[names]
    errors = [r for r in per_rank if isinstance(r, str)]
    if errors and set(names) in FAILING:
        pytest.xfail(f"row{i} {'+'.join(names)}: known failure ({errors[0][:200]})")
    assert not errors, f"row{i} {'+'.join(names)} failed on the ranks: {errors[0]}"
    want = train_row(names, ranks=False)["losses"]
    assert len(want) == STEPS and all(math.isfinite(x) for x in want)
    missing = [n for n in names if not any(r["marks"][n] for r in per_rank)]
    assert not missing, f"row{i}: no rank's compiled graphs show {missing}"
    for rank, r in enumerate(per_rank):
        for step, (got, exp) in enumerate(zip(r["losses"], want), 1):
            assert abs(got - exp) <= _rtol(names) * abs(exp), \
                f"row{i} {'+'.join(names)} rank {rank} step {step}: loss {got} vs one process {exp}"
