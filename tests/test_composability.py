"""Composability: the refusal rules (graphllm/planning/compat.py), the coverage registry
(graphllm/planning/compat_coverage.py) and docs/composability.md, generated from both.

The registry is checked statically — each named test exists — and never run here.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

from graphllm.cli.composability_doc import build_plan, matrix, render
from graphllm.errors import GraphllmError
from graphllm.pass_pipeline import build_pipeline
from graphllm.planning.compat import FEATURE_NAMES, FEATURES, PLAN_RULES, RULES, Refusal, rule_pairs
from graphllm.planning.compat_coverage import COVERED
from graphllm.planning.layout import Layout

ROOT = Path(__file__).resolve().parents[1]
NEEDED_OFF = {"tp": {"tp": 1}, "dp": {"dp": 1}, "pp": {"pp": 1}}
"""A `needs` rule's needed dimension, turned off."""


@cache
def cells():
    return matrix()


def test_docs_composability_md_is_generated() -> None:
    assert (ROOT / "docs" / "composability.md").read_text() == render(), \
        "docs/composability.md is out of date: python -m graphllm.cli.composability_doc > docs/composability.md"


@cache
def _test_functions(path: str) -> tuple[set[str], str]:
    source = (ROOT / path).read_text()
    tree = ast.parse(source)
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}, source


@pytest.mark.parametrize("pair", sorted(COVERED), ids=lambda p: "+".join(p))
def test_registered_test_exists(pair) -> None:
    node_id, kind = COVERED[pair]
    m = re.fullmatch(r"(tests/test_\w+\.py)::(\w+)(?:\[([^\]]+)\])?", node_id)
    assert m, f"{pair}: {node_id!r} is not a pytest node id tests/test_x.py::test_name[param]"
    path, name, param = m.groups()
    assert (ROOT / path).is_file(), f"{pair}: {path} does not exist"
    functions, source = _test_functions(path)
    assert name in functions, f"{pair}: {path} defines no {name}"
    # a parametrized id: a key written in the file, or each of its dash-separated values is
    assert not param or param in source or all(p in source for p in param.split("-")), \
        f"{pair}: {path} has no parameter {param!r} of {name}"
    assert kind in ("parity", "compile", "structure")
    assert set(pair) <= set(FEATURE_NAMES), f"{pair}: unknown feature (FEATURES: {', '.join(FEATURE_NAMES)})"


def test_registry_lists_no_refused_or_implied_pair() -> None:
    bad = {pair: cells()[frozenset(pair)].status for pair in COVERED
           if cells()[frozenset(pair)].status != "tested"}
    assert not bad, f"registered as covered but {bad}"


def test_every_rule_refuses_its_pairs_with_its_message() -> None:
    for rule in PLAN_RULES:
        for pair in rule_pairs(rule):
            c = cells()[pair]
            assert c.status == "refused" and c.rule is rule, (sorted(pair), c.status, c.rule and c.rule.features)
    for rule in (r for r in RULES if r.kind == "needs"):
        feature, needed = rule.features
        enable = dict(next(f for f in FEATURES if f.name == feature).enable["layout"], **NEEDED_OFF[needed])
        with pytest.raises(Refusal, match=re.escape(rule.message(None))) as e:
            Layout(**enable)
        assert e.value.rule is rule


def _steps(plan) -> dict[str, dict]:
    return {s.name: dict(s.options or (s.graph_pass.options if s.graph_pass else {}))
            for s in build_pipeline(plan).steps}


@cache
def _plan_json(*names: str) -> dict:
    return build_plan(*names).to_json()


MARKERS = {
    "tp": "tensor_parallel", "sp": "sequence_parallel", "pp": "pipeline_split", "vpp": "pipeline_split",
    "cp": "context_parallel", "mc2": "mc2", "lora": "lora", "qlora": "quantize_base", "inductor": "inductor",
    "npu": "npu",
}
"""The pipeline step each feature adds (the others act in the capture, the partition or the engine: checked below)."""


def test_every_allowed_pair_builds_its_pipeline_with_both_features() -> None:
    """Every pair the rules allow makes a plan and a pipeline that hold both features: a refusal that fires later
    than the plan (in a pass, at run time) belongs in graphllm/planning/compat.py. This builds, it runs nothing."""
    failures = []
    for pair, c in cells().items():
        if c.status in ("refused", "alternatives"):
            continue
        names = sorted(pair)
        try:
            plan = build_plan(*names)
            steps = _steps(plan)
        except GraphllmError as e:
            failures.append(f"{'+'.join(names)}: {e}")
            continue
        for name in names:
            marker = MARKERS.get(name)
            if name == "coc":
                ok = "coc" in steps or steps.get("mc2", {}).get("chunks") == 2  # MC2 takes CoC's chunks
            elif name.startswith("recompute-"):
                ok = steps["partition"]["recompute"].startswith(name.split("-")[1])
            elif name == "offload-activations":
                ok = steps["partition"].get("offload_activations", "").startswith("attention")
            elif name == "fused-loss":
                ok = steps.get("fuse_linear_cross_entropy", {}).get("min_bytes") == 0
            elif marker is not None:
                ok = marker in steps
            else:  # capture, engine and optimizer options: the plan carries them to the job
                ours, base, got = _plan_json(name), _plan_json(), plan.to_json()
                changed = {k: v for k, v in ours.items() if v != base[k] and k != "layout"}
                ok = bool(changed or ours["layout"] != base["layout"]) and all(got[k] == v for k, v in changed.items())
            if not ok:
                failures.append(f"{'+'.join(names)}: the pipeline or plan lost {name}")
    assert not failures, "\n".join(failures)


def test_a_refused_combination_exits_2_and_writes_nothing(tmp_path) -> None:
    from graphllm.cli.main import main

    out = tmp_path / "art"
    assert main(["compile", "--model", "tiny-llama", "--backend", "npu", "--offload-activations", "all",
                 "--out", str(out)]) == 2
    assert not out.exists()


def test_pairwise_rows_build_and_hold_the_pairs_they_cover() -> None:
    """The generated rows (graphllm/planning/compat_rows.py, trained by tests/test_composability_rows.py) are
    allowed plans of at most MAX_WORLD ranks, and each pair the docs mark covered by a row is in that row."""
    from graphllm.cli.composability_doc import builds, rows
    from graphllm.planning.compat_coverage import ROW_KIND
    from graphllm.planning.compat_rows import MAX_WORLD, row_pairs, world_size

    assert rows(), "no pairwise rows"
    for row in rows():
        assert builds(row) and world_size(row) <= MAX_WORLD, row
    for pair, c in cells().items():
        if c.kind == ROW_KIND:
            i = int(re.fullmatch(r".*\[row(\d+)\]", c.test).group(1))
            assert pair in row_pairs(rows()[i]), (sorted(pair), c.test)
