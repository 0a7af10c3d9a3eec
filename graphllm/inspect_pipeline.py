"""`graphllm inspect ART --pipeline`: the steps that made a rank's graphs, read from the artifact.

plan.json records the pipeline (graphllm.pass_pipeline: step, stage, options, origin, why); report.json
records what each pass did to each graph on each rank. This joins the two: one row per step with the
nodes it changed on that rank (per graph for train passes, which run once per forward/backward graph).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from graphllm.errors import GraphllmError

COLUMNS = ("#", "step", "stage", "options", "origin", "why", "changed")


def _report(root: Path, rank: int) -> dict[str, Any]:
    path = root / "report.json"
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GraphllmError(f"{path} is missing or corrupt ({e}); recompile the artifact") from e
    ranks = report.get("ranks") or [report]
    mine = [r for r in ranks if r.get("rank") == rank]
    if not mine:
        raise GraphllmError(f"{root} has no report for rank {rank} (ranks 0..{len(ranks) - 1})")
    return mine[0]


def _changed(step: dict[str, Any], records: list[dict[str, Any]], report: dict[str, Any]) -> str:
    if step["stage"] == "partition":
        n = sum(report.get("recomputed_nodes", {}).values())
        return f"{n} ops recomputed in backward" if n else "nothing recomputed"
    if step["stage"] == "split":
        return f"{step['options'].get('stages')} stage graphs + loss"
    if step["stage"] == "backend":
        counts = report.get("compile_counts", {})
        return ", ".join(f"{k} ×{v}" for k, v in counts.items()) or "-"
    mine = [r for r in records if r["name"] == step["step"]]
    if not mine:
        return "-"
    parts = []
    for r in mine:
        delta = [f"+{r['added']} −{r['removed']}"] if r["added"] or r["removed"] else []
        delta += [f"{k} {v}" for k, v in r["counters"].items()]
        text = ", ".join(delta) or "no change"
        parts.append(f"{r['graph']} {text}" if step["stage"] == "train" else text)
    return "; ".join(parts)


def _options(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) if options else ""


def pipeline_rows(root: Path, rank: int = 0) -> list[dict[str, str]]:
    """One row per pipeline step: COLUMNS as strings."""
    from graphllm.artifact import read_plan

    data = read_plan(root)
    report = _report(root, rank)
    rows = []
    for i, step in enumerate(data["pipeline"]):
        rows.append({"#": str(i), "step": step["step"] + (" (user)" if step.get("user") else ""),
                     "stage": step["stage"], "options": _options(step.get("options") or {}),
                     "origin": step["origin"], "why": step["why"],
                     "changed": _changed(step, report.get("passes", []), report)})
    return rows
