"""The compile report, per rank: what each pass changed, parameters, FLOPs, memory, communication."""

from __future__ import annotations

from typing import Any

from graphllm.offload_activations import offloaded_bytes
from graphllm.planning.memory import saved_activation_bytes
from graphllm.recompute import recomputed_nodes
from graphllm.planning.flops import forward_flops
from graphllm.planning.comm import add_into, graph_collectives
from graphllm.planning.optimizer_memory import optimizer_bytes

def optimizer_accounting(built) -> dict[str, int]:
    """graphllm.planning.optimizer_memory.optimizer_bytes for this rank's trainable parameters under the plan
    (params dtype, ZeRO-1, optimizer offload): the rule the planner uses too."""
    plan = built.plan
    numel = sum(p.numel() for p in built.engine.params if p.requires_grad)
    return optimizer_bytes(numel, plan.params_dtype, zero1=plan.layout.zero1, dp=plan.layout.dp,
                           offload=plan.offload_optimizer)


def rank_memory(built) -> dict[str, Any]:
    """Bytes this rank holds for parameters, gradients and optimizer states (masters and moments; where they live
    with optimizer offload), and its activations (read off its own graphs: for its micro-batch rows and, under
    context parallelism, its seq_len / cp tokens of each)."""
    layout, params = built.plan.layout, built.engine.params
    p_bytes = sum(p.numel() * p.element_size() for p in params)  # frozen ones too (LoRA's base)
    acct = optimizer_accounting(built)
    graphs = built.result.train_stage.graphs
    saved = {name: saved_activation_bytes(g, graphs.get(name[:-len("backward")] + "forward"))
             for name, g in graphs.items() if name.endswith("backward")}
    offloaded = sum(offloaded_bytes(g) for name, g in graphs.items() if name.endswith("backward"))
    per_micro = sum(saved.values()) - offloaded  # device-resident: offloaded values wait in host memory
    # 1F1B keeps at most (pp - pp_rank) micro-batches' activations alive on a pipeline rank (times vpp chunks)
    st = built.engine.st
    in_flight = 1 if layout.pp == 1 else min(layout.micro_batches,
                                            (layout.pp - (st.coords.pp if st else 0)) * layout.vpp)
    return {"parameters": sum(p.numel() for p in params), "parameter_bytes": p_bytes,
            "gradient_bytes": acct["gradient_bytes"], "optimizer_bytes": acct["optimizer_bytes"],
            "master_weight_bytes": acct["master_bytes"], "optimizer_moment_bytes": acct["moment_bytes"],
            "optimizer_device_bytes": acct["optimizer_device_bytes"],
            "optimizer_host_bytes": acct["optimizer_host_bytes"], "optimizer_step_bytes": acct["optimizer_step_bytes"],
            "activation_bytes_per_micro_batch": per_micro,
            "activation_offloaded_bytes_per_micro_batch": offloaded,
            "activation_bytes_peak_estimate": per_micro * in_flight}


def rank_communication(built) -> dict[str, dict[str, int]]:
    """Collectives per optimizer step: in-graph ones × micro-batches, plus data-parallel gradient
    averaging, ZeRO-1's parameter all-gather, and pipeline sends (activations and their gradients)."""
    layout = built.plan.layout
    total: dict[str, dict[str, int]] = {}
    st = built.engine.st
    kinds = st.kinds_by_name() if st is not None else {}
    for name, g in built.result.train_stage.graphs.items():
        add_into(total, graph_collectives(g, kinds), layout.micro_batches)
    acct = optimizer_accounting(built)
    kind = layout.grad_kind  # the parameters' replicas: dp, or dp_cp under context parallelism
    if layout.group_size(kind) > 1 and not layout.grads_reduced_in_graph:  # else in the backward graph, counted above
        add_into(total, {f"{kind} all_reduce (gradients, after the step's micro-batches)": {"calls": 1,
                                                                                           "bytes": acct["gradient_reduce_bytes"]}})
    if layout.zero1:
        add_into(total, {"dp all_gather (ZeRO-1 parameters)": {"calls": 1, "bytes": acct["parameter_gather_bytes"]}})
    runner = built.engine.pipeline
    if runner is not None and hasattr(runner, "send_bytes_per_micro_batch"):
        sent = runner.send_bytes_per_micro_batch()
        add_into(total, {"pp send (activations, gradients)": {"calls": 2 * layout.micro_batches,
                                                             "bytes": sent * layout.micro_batches}})
    return total


def build_report(built, tokens_per_step: int) -> dict[str, Any]:
    res = built.result
    fwd = forward_flops(res.model_graph)
    bw = res.train_stage.graphs.get("backward")
    mem = rank_memory(built)
    return {
        "backend": res.backend,
        "rank": built.rank,
        "layout": built.plan.layout.describe(),
        "parameters": mem["parameters"],
        "parameter_bytes": mem["parameter_bytes"],
        "memory": mem,
        "communication": rank_communication(built),
        "tokens_per_step": tokens_per_step,
        "flops_per_step": 3 * fwd,
        "forward_flops": fwd,
        "saved_activation_bytes": (saved_activation_bytes(bw, res.train_stage.graphs.get("forward")) if bw is not None
                                   else mem["activation_bytes_per_micro_batch"]
                                   + mem["activation_offloaded_bytes_per_micro_batch"]),  # all saved, as above
        "passes": [
            {"name": r.name, "graph": r.graph_kind, "nodes_before": r.nodes_before, "nodes_after": r.nodes_after,
             "added": r.added, "removed": r.removed, "counters": r.counters, "seconds": round(r.seconds, 4)}
            for r in res.records + res.train_stage.records
        ],
        "train_graphs": {k: len(g.graph.nodes) for k, g in res.train_stage.graphs.items()},
        "recomputed_nodes": {k: recomputed_nodes(g) for k, g in res.train_stage.graphs.items()
                             if k.endswith("backward")},
        "compile_counts": dict(res.train_stage.compiles),
    }


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _offloaded(report: dict[str, Any]) -> str:
    """`, of which 1.2 MiB offloaded to host memory` under --offload-activations (device-resident: the rest)."""
    n = report.get("memory", {}).get("activation_offloaded_bytes_per_micro_batch", 0)
    return f", of which {_fmt_bytes(n)} offloaded to host memory (the rest device-resident)" if n else ""


def _per_rank_tokens(plan: dict[str, Any]) -> str:
    """Under context parallelism each rank's graphs (and so the figures below) see seq_len / cp tokens of a row."""
    cp = plan.get("layout", {}).get("cp", 1)
    return f" ({plan['seq_len'] // cp} per context-parallel rank)" if cp > 1 else ""


def report_markdown(report: dict[str, Any], plan: dict[str, Any], ranks: list[dict[str, Any]] | None = None) -> str:
    """report.md: rank 0's passes and figures, and a per-rank memory/communication table."""
    lines = [
        f"# graphllm compile report: {plan['model']}",
        "",
        f"- backend: {report['backend']}, amp: {plan['amp']}, params: {plan.get('params_dtype', 'fp32')}"
        f"{', optimizer offloaded' if plan.get('offload_optimizer') else ''}, micro-batch × seq: {plan['batch_size']} × "
        f"{plan['seq_len']}{_per_rank_tokens(plan)}, layout: {report['layout']}",
        f"- parameters on rank 0: {report['parameters']:,} ({_fmt_bytes(report['parameter_bytes'])})",
        f"- FLOPs per micro-batch (fwd+bwd, matmul-class) of rank 0's tensor-parallel shard of the whole model: "
        f"{report['flops_per_step'] / 1e9:.2f} GFLOP",
        f"- saved activations (forward → backward): {_fmt_bytes(report['saved_activation_bytes'])}"
        + _offloaded(report),
        "- aot graphs: " + ", ".join(f"{k} {v} nodes" for k, v in report["train_graphs"].items()),
        "",
    ]
    ranks = ranks or [report]
    lines += ["| rank | parameters | grads | optimizer | activations (peak est.) | communication per step |",
              "|---|---|---|---|---|---|"]
    for r in ranks:
        m = r["memory"]
        comm = ", ".join(f"{k} {v['calls']}× {_fmt_bytes(v['bytes'])}" for k, v in r["communication"].items()) or "none"
        host = " (host)" if m.get("optimizer_host_bytes") else ""  # --offload-optimizer
        lines.append(f"| {r['rank']} | {_fmt_bytes(m['parameter_bytes'])} | {_fmt_bytes(m['gradient_bytes'])} | "
                     f"{_fmt_bytes(m['optimizer_bytes'])}{host} | {_fmt_bytes(m['activation_bytes_peak_estimate'])} | "
                     f"{comm} |")
    lines += ["", "| pass | graph | nodes before | after | added | removed | counters |",
              "|---|---|---|---|---|---|---|"]
    for p in report["passes"]:
        counters = ", ".join(f"{k}={v}" for k, v in p["counters"].items())
        lines.append(f"| {p['name']} | {p['graph']} | {p['nodes_before']} | {p['nodes_after']} | {p['added']} | "
                     f"{p['removed']} | {counters} |")
    return "\n".join(lines) + "\n"
