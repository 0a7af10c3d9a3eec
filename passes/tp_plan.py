"""Tensor-parallel plans: which parameter is split how, by name pattern.

A plan maps module-path patterns (`*` matches one path segment, paths relative to the model root as in
HF's `base_model_tp_plan`, e.g. "layers.*.self_attn.q_proj") to a style:

- colwise: output features split (the weight's dim 0, and the bias); the input is copied into the region.
- colwise_kv: colwise for key/value projections; when there are fewer kv heads than ranks, each rank
  keeps the whole projection and uses its kv head (the weight's gradient is all-reduced).
- rowwise: input features split (the weight's dim 1); the output is all-reduced (bias added after).
- vocab_embedding: embedding rows split by vocabulary range; out-of-range ids give zeros; all-reduced.
- vocab_head: the LM head split by vocabulary; the loss becomes vocab-parallel cross-entropy (no
  full-vocab logits); logits returned to the user are all-gathered.

HF's style names colwise/rowwise/colwise_rep/rowwise_rep/embedding are accepted in a user plan and
mapped onto these.
"""

from __future__ import annotations

import re
from typing import Mapping

from graphllm.errors import GraphllmError

STYLES = ("colwise", "colwise_kv", "rowwise", "vocab_embedding", "vocab_head", "latent_kv")
HF_STYLES = {"colwise": "colwise", "rowwise": "rowwise", "colwise_rep": "colwise", "rowwise_rep": "rowwise",
             "embedding": "vocab_embedding", "local_colwise": "colwise", "local_rowwise": "rowwise"}

LLAMA_PLAN: dict[str, str] = {
    "embed_tokens": "vocab_embedding",
    "layers.*.self_attn.q_proj": "colwise",
    "layers.*.self_attn.k_proj": "colwise_kv",
    "layers.*.self_attn.v_proj": "colwise_kv",
    "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.mlp.gate_proj": "colwise",
    "layers.*.mlp.up_proj": "colwise",
    "layers.*.mlp.down_proj": "rowwise",
    "lm_head": "vocab_head",
}
"""graphllm's plan for the Llama family (Llama 2/3, Mistral, Qwen2): Megatron-Core's layout."""

MLA_PLAN: dict[str, str] = {
    "layers.*.self_attn.q_b_proj": "colwise",
    "layers.*.self_attn.kv_b_proj": "colwise",
    "layers.*.self_attn.kv_a_proj_with_mqa": "latent_kv",
}
"""Multi-latent attention (DeepSeek-V3, models/mla.py), Megatron-Core's layout: the per-head up-projections split by
head, the down-projections (q_a_proj, kv_a_proj_with_mqa) and their norms whole on every rank. (q_proj, o_proj
and the dense MLPs are LLAMA_PLAN's names.)"""

GRAPHLLM_PLAN = {**LLAMA_PLAN, **MLA_PLAN}
"""The default plan ("graphllm"): a pattern no parameter matches is skipped."""

VOCAB_PLAN = {"embed_tokens": "vocab_embedding", "lm_head": "vocab_head"}
"""What HF's base_model_tp_plan leaves out (it covers the decoder layers only)."""


def hf_plan(model_type: str) -> dict[str, str]:
    """transformers' own `base_model_tp_plan` for a model type, plus graphllm's vocab-parallel ends."""
    from transformers import CONFIG_MAPPING  # only when asked for: models/ and passes/ run without it

    base = getattr(CONFIG_MAPPING[model_type], "base_model_tp_plan", None)
    if not base:
        raise GraphllmError(f"transformers has no base_model_tp_plan for model_type {model_type!r}; "
                            "use tensor_parallel plan='graphllm'")
    return {**_internal_names(base), **VOCAB_PLAN}


# HF modules graphllm keeps split (models/weights.py split_fused) -> the split modules' styles: Megatron's
# layout, which HF cannot use on a fused weight (it replicates the fused output and splits the next input)
_FUSED = {"self_attn.qkv_proj": {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise_kv",
                                 "self_attn.v_proj": "colwise_kv", "self_attn.o_proj": "rowwise"},
          "mlp.gate_up_proj": {"mlp.gate_proj": "colwise", "mlp.up_proj": "colwise", "mlp.down_proj": "rowwise"}}
_LEFT_WHOLE = ("replicated_with_grad_allreduce",)  # HF styles of parameters every rank keeps whole (q/k norms)


def _internal_names(base: Mapping[str, str]) -> dict[str, str]:
    """HF's plan for graphllm's parameter names: fused projections as their parts, whole parameters dropped."""
    out: dict[str, str] = {}
    for pattern, style in base.items():
        prefix, _, module = pattern.partition("layers.*.")
        if module in _FUSED:
            out.update({f"{prefix}layers.*.{part}": s for part, s in _FUSED[module].items()})
        elif style not in _LEFT_WHOLE:
            out.setdefault(pattern, style)
    return out


def resolve_plan(plan: str | Mapping[str, str] | None, model_type: str) -> dict[str, str]:
    """plan None/"graphllm": GRAPHLLM_PLAN; "hf": transformers' plan; a mapping: itself (HF style names ok)."""
    if plan is None or plan == "graphllm":
        return normalize(GRAPHLLM_PLAN)
    if plan == "hf":
        return normalize(hf_plan(model_type))
    if isinstance(plan, str):
        raise GraphllmError(f"tensor_parallel plan {plan!r}: use 'graphllm', 'hf' or a pattern → style mapping")
    return normalize(plan)


_PREFIXES = ("model.", "")  # plan paths are relative to the base model; lm_head sits at the root


def normalize(plan: Mapping[str, str]) -> dict[str, str]:
    out = {}
    for pattern, style in plan.items():
        style = HF_STYLES.get(style, style)
        if style not in STYLES:
            raise GraphllmError(f"tensor-parallel plan entry {pattern!r}: unknown style {style!r}; "
                                f"use one of {', '.join(STYLES)}")
        if pattern.endswith((".k_proj", ".v_proj")) and style == "colwise":
            style = "colwise_kv"
        out[pattern] = style
    return out


def _regex(pattern: str) -> re.Pattern:
    body = r"\.".join("[^.]+" if part == "*" else re.escape(part) for part in pattern.split("."))
    if pattern.startswith("layers.*."):  # a multi-token prediction module (model.mtp.<k>) is a decoder layer too
        body = "(?:layers|mtp)" + body.removeprefix("layers")
    return re.compile(rf"(?:{'|'.join(re.escape(p) for p in _PREFIXES if p)})?{body}\.(weight|bias)")


def style_of(param_name: str, plan: Mapping[str, str]) -> tuple[str, str] | None:
    """(style, "weight"|"bias") for a parameter path, or None when the plan leaves it whole."""
    for pattern, style in plan.items():
        m = _regex(pattern).fullmatch(param_name)
        if m:
            return style, m.group(1)
    return None
