"""Readable graph dumps: python code with provenance comments, and a one-line-per-node table."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from graphllm.passes.manager import PASS_META_KEY

INPUT_META_KEY = "graphllm_input"  # placeholder meta: the parameter path or argument an aot input is
# `inputs`: the node's input node names, comma-separated (the graph's edges, for `graphllm inspect --render`)
TABLE_COLUMNS = ("idx", "name", "op", "target", "shape", "dtype", "pass", "module", "source", "inputs")


def _shape(v: Any) -> tuple[str, str]:
    if isinstance(v, torch.Tensor):
        return "[" + ",".join(str(s) for s in v.shape) + "]", str(v.dtype).removeprefix("torch.")
    if isinstance(v, (tuple, list)):
        parts = [_shape(x) for x in v]
        return "(" + ";".join(p[0] for p in parts) + ")", "(" + ";".join(p[1] for p in parts) + ")"
    return "", type(v).__name__ if v is not None else ""


def _target(node: fx.Node) -> str:
    t = node.target
    if node.op != "call_function":
        return str(t)
    if isinstance(t, torch._ops.OpOverload):
        return str(t)
    return f"{getattr(t, '__module__', '')}.{getattr(t, '__name__', repr(t))}".lstrip(".")


def _source(node: fx.Node) -> str:
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+)', trace)
    # the innermost frame outside torch itself is the model line that produced the node
    own = [f for f in frames if f"{os.sep}torch{os.sep}" not in f[0]] or frames
    if not own:
        return ""
    path, line = own[-1]
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{short}:{line}"


def _module(node: fx.Node) -> str:
    if INPUT_META_KEY in node.meta:
        return node.meta[INPUT_META_KEY]
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return str(path).removeprefix("L['self'].").removeprefix("L__self__.")


def node_rows(gm: fx.GraphModule, default_pass: str = "capture") -> list[dict[str, str]]:
    rows = []
    for i, node in enumerate(gm.graph.nodes):
        shape, dtype = _shape(node.meta.get("val"))
        rows.append({
            "idx": str(i), "name": node.name, "op": node.op, "target": _target(node), "shape": shape,
            "dtype": dtype, "pass": node.meta.get(PASS_META_KEY, default_pass if node.op != "output" else ""),
            "module": _module(node), "source": _source(node),
            "inputs": ",".join(n.name for n in node.all_input_nodes),
        })
    return rows


def graph_code(gm: fx.GraphModule) -> str:
    """Python code of the graph, with `# File: ...` provenance comments and tensor shapes."""
    try:
        return gm.print_readable(print_output=False, include_stride=False, include_device=False)
    except Exception:  # graphs whose nodes carry no tensor metadata (e.g. after a user pass)
        return gm.code


def write_graph(gm: fx.GraphModule, stem: Path, *, title: str, default_pass: str = "capture") -> dict[str, Any]:
    """Write `stem.py` (code) and `stem.tsv` (table); return a summary for the artifact index."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    rows = node_rows(gm, default_pass)
    ops = [r for r in rows if r["op"] == "call_function"]
    header = f"# graphllm graph dump: {title}\n# nodes: {len(rows)} ({len(ops)} calls)\n"
    named = [(n.name, n.meta[INPUT_META_KEY]) for n in gm.graph.nodes if INPUT_META_KEY in n.meta]
    if named:
        header += "# inputs:\n" + "".join(f"#   {a} = {b}\n" for a, b in named)
    stem.with_suffix(".py").write_text(header + graph_code(gm))
    lines = ["\t".join(TABLE_COLUMNS)] + ["\t".join(r[c] for c in TABLE_COLUMNS) for r in rows]
    stem.with_suffix(".tsv").write_text("\n".join(lines) + "\n")
    return {"title": title, "file": stem.name, "nodes": len(rows), "calls": len(ops)}


def write_split(split, where: Path) -> None:
    """Readable dumps of a pipeline split (passes/pipeline_split.py): stage<i> and loss under `where`."""
    for k, g in enumerate(split.stages):
        write_graph(g, Path(where) / f"stage{k}", title=f"pipeline stage {k} (layers {split.layers[k]})")
    write_graph(split.loss, Path(where) / "loss", title="pipeline loss (last stage outputs, labels)")
