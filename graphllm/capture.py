"""Capture: a model (nn.Module) to one static-shape FX graph, with no graph breaks.

torch.export (non-strict) traces the model's Python at the given shapes into pre-autograd ATen ops;
`ep.module()` turns it back into a GraphModule whose parameters are the model's own Parameter objects
(so gradients and optimizer updates reach the user's model). The graph is then canonicalised: export's
input/output pytree plumbing, runtime guards and metadata asserts are dropped and no-op dtype casts
are removed, so passes and dumps see only the computation.
"""

from __future__ import annotations

import re
import traceback
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from graphllm.errors import GraphllmError

aten = torch.ops.aten
_TORCH_DIR = str(Path(torch.__file__).parent)
_THIS_FILE = str(Path(__file__))


class CaptureError(GraphllmError):
    """The model could not be captured as one static graph; the message names the source line."""


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame of the failing trace that is model code (not torch, not this module)."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if not f.filename.startswith(_TORCH_DIR) and f.filename != _THIS_FILE
            and "site-packages/torch" not in f.filename and not f.filename.startswith("<")]
    return user[-1] if user else None


def capture(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """Trace `model(*example_inputs)` into a canonical GraphModule (see module docstring)."""
    try:
        ep = torch.export.export(model, tuple(example_inputs), strict=False)
    except Exception as e:  # any trace failure becomes one error naming the model line
        frame = _user_frame(e)
        where = f"{frame.filename}:{frame.lineno} in {frame.name}: `{(frame.line or '').strip()}`" if frame else "unknown line"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaptureError(
            f"cannot capture {type(model).__name__} as one static graph at {where} — {type(e).__name__}: {reason} "
            "(graphllm needs static shapes and no data-dependent Python control flow)"
        ) from e
    gm = ep.module()
    _canonicalize(gm)
    return gm


_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line \d+, in .*$')


def _trim_stack(trace: str) -> str:
    """Drop trailing frames inside torch, so provenance names the model line (`self.q_proj(x)`), not
    `torch/nn/modules/linear.py`."""
    lines = trace.rstrip("\n").split("\n")
    starts = [i for i, line in enumerate(lines) if _FRAME.match(line)]
    keep = len(starts)
    while keep > 1 and _FRAME.match(lines[starts[keep - 1]]).group("file").startswith(_TORCH_DIR):
        keep -= 1
    if keep == len(starts):
        return trace
    return "\n".join(lines[: starts[keep]]) + "\n"


def _canonicalize(gm: fx.GraphModule) -> None:
    g = gm.graph
    for node in g.nodes:
        if node.meta.get("stack_trace"):
            node.meta["stack_trace"] = _trim_stack(node.meta["stack_trace"])
    for node in list(g.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            g.erase_node(node)
        elif node.op == "call_function" and node.target is aten._assert_tensor_metadata.default:
            g.erase_node(node)
    for node in list(g.nodes):
        # a cast to the dtype the tensor already has is an alias: drop it
        if node.op == "call_function" and node.target in (aten.to.dtype, aten._to_copy.default):
            src = node.args[0]
            sv, nv = src.meta.get("val"), node.meta.get("val")
            if isinstance(sv, torch.Tensor) and isinstance(nv, torch.Tensor) and sv.dtype == nv.dtype \
                    and sv.device == nv.device and len(node.kwargs.keys() - {"dtype"}) == 0:
                node.replace_all_uses_with(src)
                g.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    # plain calling convention: forward(*inputs) -> output (one tensor, or a tuple when several)
    g._codegen = fx.graph.CodeGen()
    out = next(n for n in reversed(g.nodes) if n.op == "output")
    flat = out.args[0]
    while isinstance(flat, (tuple, list)) and len(flat) == 1:
        flat = flat[0]
    out.args = (flat,)
    g.eliminate_dead_code()
    g.lint()
    gm.recompile()
