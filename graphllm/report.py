"""The compile report: what each pass changed, parameters, FLOPs, and saved-activation memory."""

from __future__ import annotations

from typing import Any

from graphllm.backends import saved_activation_bytes
from graphllm.compile import CompiledModel
from graphllm.flops import forward_flops


def build_report(compiled: CompiledModel, tokens_per_step: int) -> dict[str, Any]:
    res = compiled.result
    params = {id(p): p for p in compiled.model.parameters()}
    n_params = sum(p.numel() for p in params.values())
    fwd = forward_flops(res.model_graph)
    bw = res.train_stage.graphs.get("backward")
    return {
        "backend": res.backend,
        "parameters": n_params,
        "parameter_bytes": sum(p.numel() * p.element_size() for p in params.values()),
        "tokens_per_step": tokens_per_step,
        "flops_per_step": 3 * fwd,
        "forward_flops": fwd,
        "saved_activation_bytes": saved_activation_bytes(bw) if bw is not None else None,
        "passes": [
            {"name": r.name, "graph": r.graph_kind, "nodes_before": r.nodes_before, "nodes_after": r.nodes_after,
             "added": r.added, "removed": r.removed, "counters": r.counters, "seconds": round(r.seconds, 4)}
            for r in res.records + res.train_stage.records
        ],
        "train_graphs": {k: len(g.graph.nodes) for k, g in res.train_stage.graphs.items()},
        "compile_counts": compiled.compile_counts,
    }


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return ""


def report_markdown(report: dict[str, Any], plan: dict[str, Any]) -> str:
    lines = [
        f"# graphllm compile report: {plan['model']}",
        "",
        f"- backend: {report['backend']}, amp: {plan['amp']}, batch × seq: {plan['batch_size']} × {plan['seq_len']}",
        f"- parameters: {report['parameters']:,} ({_fmt_bytes(report['parameter_bytes'])})",
        f"- FLOPs per step (fwd+bwd, matmul-class): {report['flops_per_step'] / 1e9:.2f} GFLOP "
        f"({report['flops_per_step'] / report['tokens_per_step'] / 1e6:.1f} MFLOP/token)",
        f"- saved activations (forward → backward): {_fmt_bytes(report['saved_activation_bytes'])}",
        "- aot graphs: " + ", ".join(f"{k} {v} nodes" for k, v in report["train_graphs"].items()),
        "",
        "| pass | graph | nodes before | after | added | removed | counters |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in report["passes"]:
        counters = ", ".join(f"{k}={v}" for k, v in p["counters"].items())
        lines.append(f"| {p['name']} | {p['graph']} | {p['nodes_before']} | {p['nodes_after']} | {p['added']} | "
                     f"{p['removed']} | {counters} |")
    return "\n".join(lines) + "\n"
