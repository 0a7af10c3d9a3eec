"""The written conditions of torchair's partial GE converters, evaluated on a graph's node.

A partial converter (graphllm.preflight.converters: `status == "partial"`) raises NotImplementedError for
some arguments, shapes or dtypes. For the partial converters graphllm's graphs use, this module evaluates
those conditions on the node (its arguments, and its inputs' shapes and dtypes from `meta["val"]`), for an
Atlas A2/A3 device (torchair's `is_arch35()` is False there). Each rule carries the fingerprint of the
conditions it was written against (a hash of the converter's raise sites as the index records them); when
a torch_npu release changes them, the rule stops applying (the op reads `conditional` again) and
tests/test_preflight_wheel.py fails until the rule is re-read against the new source.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from graphllm.ops.lowering_npu import ROTARY_GRAD_LAST_DIM, ROTARY_GRAD_MAX_BROADCAST, rotary_grad_converts
from graphllm.preflight.converters import Converter

UNKNOWN = object()
"""`refusal` for an op without a rule (or whose converter's conditions changed): not evaluated."""


def conditions_fingerprint(conv: Converter) -> str:
    return hashlib.sha256("\n".join(conv.unsupported).encode()).hexdigest()[:12]


def arguments(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in (tensor arguments are their nodes)."""
    schema = node.target._schema
    out: dict[str, Any] = {}
    positional = list(node.args)
    for i, arg in enumerate(schema.arguments):
        if i < len(positional) and not arg.kwarg_only:
            out[arg.name] = positional[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
    return out


def _val(x: Any) -> Any:
    return x.meta.get("val") if isinstance(x, fx.Node) else x


def _shape(x: Any) -> tuple[int, ...] | None:
    v = _val(x)
    if not isinstance(v, torch.Tensor):
        return None
    return tuple(v.shape)


def _static(shape: tuple | None) -> bool:
    return shape is not None and all(isinstance(s, int) for s in shape)


# -- the rules: each returns "" when the converter takes the node, else why it raises ------------------

def _embedding(a: dict[str, Any]) -> str:
    if a.get("scale_grad_by_freq"):
        return "scale_grad_by_freq=True is not supported"
    return "sparse=True is not supported" if a.get("sparse") else ""


def _fusion_attention(a: dict[str, Any]) -> str:
    layout, keep = a.get("input_layout"), a.get("keep_prob", 1.0)
    if layout in ("BSH", "BNSD") and math.isclose(float(keep), 1.0, rel_tol=1e-9):
        return ""
    return f"input_layout {layout!r} with keep_prob {keep}: only BSH or BNSD without dropout convert"


def _rotary_mul(a: dict[str, Any]) -> str:
    if a.get("rotate") is not None and a.get("rotary_mode", "half") not in ("half", "interleave"):
        return f"rotary_mode {a.get('rotary_mode')!r} with rotate: A2/A3 take half or interleave"
    return ""


def _rotary_mul_backward(a: dict[str, Any]) -> str:
    shapes = [_shape(a.get(k)) for k in ("grad", "self", "r1", "r2")]
    if any(s is None or len(s) != 4 for s in shapes):
        return "inputs must be 4-D"
    if not all(_static(s) for s in shapes):
        return "dynamic shapes are not supported"
    x, r1 = shapes[1], shapes[2]
    if rotary_grad_converts(x, r1):
        return ""
    broadcast = math.prod(n for n, r in zip(x, r1) if n != r)
    return (f"x {list(x)} with r1 {list(r1)}: A2/A3 need the last dim a multiple of {ROTARY_GRAD_LAST_DIM} and "
            f"the broadcast dims' product at most {ROTARY_GRAD_MAX_BROADCAST} (here {x[3]} and {broadcast})")


def _apply_rotary_pos_emb(a: dict[str, Any]) -> str:
    layout, mode = a.get("layout", "BSH"), a.get("rotary_mode", "half")
    if layout not in ("BSH", "BSND", "SBND", "BNSD", "TND"):
        return f"layout {layout!r}: BSH, BSND, SBND, BNSD or TND"
    return "" if mode in ("half", "quarter", "interleave") else f"rotary_mode {mode!r}: half, quarter or interleave"


def _log_softmax_backward(a: dict[str, Any]) -> str:
    grad = _val(a.get("grad_output"))
    want = a.get("input_dtype")
    if not isinstance(grad, torch.Tensor) or grad.dtype == want:
        return ""
    if grad.dtype == torch.float32 and want == torch.float16:
        return ""
    return f"grad_output {grad.dtype} with input_dtype {want}: only equal dtypes or float32 grad for float16 input"


def _dense_layout(a: dict[str, Any]) -> str:
    """new_zeros, ones_like: the converter raises for a layout other than strided (None keeps the input's)."""
    layout = a.get("layout")
    return "" if layout in (None, torch.strided) else f"layout {layout}: dense tensors only"


@dataclass(frozen=True, slots=True)
class Rule:
    check: Callable[[dict[str, Any]], str]
    fingerprint: str
    """conditions_fingerprint of the converter this rule was written against (torch_npu 2.13.0)."""


RULES: dict[str, Rule] = {
    "aten.embedding.default": Rule(_embedding, "c7a3c316175d"),
    "npu.npu_fusion_attention.default": Rule(_fusion_attention, "508fefaa2bb9"),
    "npu.npu_fusion_attention_grad.default": Rule(_fusion_attention, "eafa387f5b47"),
    "npu.npu_rotary_mul.default": Rule(_rotary_mul, "7ac1b419d8d7"),
    "npu.npu_rotary_mul_backward.default": Rule(_rotary_mul_backward, "3ec7a91d46c2"),
    "npu.npu_apply_rotary_pos_emb.default": Rule(_apply_rotary_pos_emb, "64b02fc1fac6"),
    "aten._log_softmax_backward_data.default": Rule(_log_softmax_backward, "04cb9abcd8ef"),
    "aten.new_zeros.default": Rule(_dense_layout, "fa9a20aa5d09"),
    "aten.ones_like.default": Rule(_dense_layout, "f22d74a6207f"),  # the MoE routing counts (models/moe.py)
}


def refusal(op: str, node: fx.Node, conv: Converter) -> Any:
    """Why `conv` raises for `node` ("" when it takes it), or UNKNOWN without a current rule."""
    rule = RULES.get(op)
    if rule is None or rule.fingerprint != conditions_fingerprint(conv) or not isinstance(
            node.target, torch._ops.OpOverload):
        return UNKNOWN
    return rule.check(arguments(node))
