"""What graphllm supports of HF configs: model types, activations, layer types and RoPE types, and the check
of a rope_scaling dict (shared by ModelConfig and the config.json reader, models/hf_config.py)."""

from __future__ import annotations

from typing import Any

from graphllm.errors import GraphllmError

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("gemma2", "gemma3_text", "glm4", "llama", "mistral", "phi3", "qwen2")
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3", "longrope")
SUPPORTED_ACTIVATIONS: tuple[str, ...] = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES: tuple[str, ...] = ("full_attention", "sliding_attention")
# Keys each rope_type needs in rope_scaling (besides rope_type itself).
_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings", "attention_factor"),
}


def check_rope_scaling(scaling: dict[str, Any] | None, rotary_dim: int) -> dict[str, Any] | None:
    """Validate a rope_scaling dict; returns it normalised (None for plain RoPE, only the keys used)."""
    if scaling is None:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise GraphllmError(
            f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return None
    needed = _ROPE_KEYS[rope_type]
    missing = [k for k in needed if scaling.get(k) is None]
    if missing:
        raise GraphllmError(f"rope_scaling of type {rope_type!r} lacks {', '.join(missing)}")
    out: dict[str, Any] = {"rope_type": rope_type}
    for k in needed:
        if k == "original_max_position_embeddings":
            out[k] = int(scaling[k])
        elif k in ("short_factor", "long_factor"):
            out[k] = [float(x) for x in scaling[k]]
            if len(out[k]) != rotary_dim // 2:
                raise GraphllmError(f"rope_scaling {k} has {len(out[k])} entries; the rotary dims need "
                                    f"{rotary_dim // 2}")
        else:
            out[k] = float(scaling[k])
    if rope_type == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise GraphllmError(
            f"llama3 rope_scaling needs high_freq_factor > low_freq_factor, "
            f"got {out['high_freq_factor']} and {out['low_freq_factor']}"
        )
    return out
