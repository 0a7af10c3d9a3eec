"""The Ascend pre-flight tables (graphllm.npu_preflight): `graphllm compile --backend npu [--dry-run]`
prints a summary per graph and every op that is not plainly convertible; `graphllm inspect ART
--npu-coverage` prints every op of every graph."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from graphllm.cli.console import print_table
from graphllm.preflight.check import BLOCKING, BUILTIN, CONDITIONAL, CONVERTER, FUSED

SUMMARY_STATUSES = (FUSED, CONVERTER, CONDITIONAL, BUILTIN, *BLOCKING)
STYLE = {**{s: "red" for s in BLOCKING}, CONDITIONAL: "yellow", FUSED: "green"}


def _cell(status: str) -> str:
    style = STYLE.get(status)
    return f"[{style}]{status}[/]" if style else status


def print_summary(console: Console, pre: dict[str, Any], *, rank: int | None = None) -> None:
    """Counts per status for each graph, then the ops that are conditional or blocking."""
    checks = [c for c in pre["checks"] if rank is None or c["rank"] == rank]
    table = Table("rank", "graph", "ops", *SUMMARY_STATUSES, title=f"npu pre-flight against {pre['wheel']}")
    for c in checks:
        counts = {s: sum(1 for o in c["ops"] if o["status"] == s) for s in SUMMARY_STATUSES}
        table.add_row(str(c["rank"]), c["graph"], str(len(c["ops"])), *(str(counts[s] or "") for s in SUMMARY_STATUSES))
    print_table(console, table)
    print_ops(console, pre, rank=rank, only_flagged=True)


def print_ops(console: Console, pre: dict[str, Any], *, rank: int | None = None, only_flagged: bool = False) -> None:
    """One row per (graph, op): status, count, why, the pass that made it and its source line."""
    title = "ops to look at" if only_flagged else f"every op, against {pre['wheel']}"
    table = Table("rank", "graph", "op", "count", "status", "detail", "made by", "source", title=title)
    for c in pre["checks"]:
        if rank is not None and c["rank"] != rank:
            continue
        for o in c["ops"]:
            if only_flagged and o["status"] in (FUSED, CONVERTER, BUILTIN):
                continue
            table.add_row(str(c["rank"]), c["graph"], o["op"], str(o["count"]), _cell(o["status"]), o["detail"],
                          o["made_by"], o["source"])
    if table.row_count:
        print_table(console, table)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(pre["counts"].items()))
    console.print(f"distinct ops over all graphs: {counts}", highlight=False)
