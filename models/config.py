"""ModelConfig: the architecture of a llama-family decoder (llama, qwen2, mistral), parsed from and
written back to a Hugging Face config.json dict.

Both config.json styles are read: the old one (top-level `rope_theta`, `rope_scaling`) and the
transformers-5 one (`rope_parameters` = {"rope_type", "rope_theta", "factor", ...}), which is what
transformers 5.x `save_pretrained` writes. `to_hf` writes the transformers-5 style.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from graphllm.errors import GraphllmError

ModelType = Literal["llama", "qwen2", "mistral"]
SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
# Keys each rope_type needs in rope_scaling (besides rope_type itself).
_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Architecture of a llama-family causal LM; field names follow HF config.json."""

    model_type: ModelType
    """HF family; decides which biases exist (qwen2: q/k/v bias, no o bias)."""
    vocab_size: int
    """Rows of the embedding and of lm_head."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the SwiGLU MLP (gate/up output)."""
    num_hidden_layers: int
    """Number of decoder layers."""
    num_attention_heads: int
    """Query heads H."""
    num_key_value_heads: int
    """Key/value heads Hkv (GQA when < H); must divide num_attention_heads."""
    head_dim: int
    """Per-head width D; HF default is hidden_size // num_attention_heads."""
    rms_norm_eps: float = 1e-6
    """Epsilon inside every RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: dict[str, Any] | None = None
    """None for plain RoPE, else {"rope_type": "linear"|"llama3", "factor": ..., ...} as HF spells it."""
    max_position_embeddings: int = 2048
    """Longest sequence the model was trained for (informational; RoPE is computed per forward)."""
    attention_bias: bool = False
    """q/k/v projections have a bias; for llama o_proj has one too; qwen2 always True (no o bias)."""
    mlp_bias: bool = False
    """gate/up/down projections have a bias (llama only)."""
    tie_word_embeddings: bool = False
    """lm_head.weight is the embedding Parameter."""
    initializer_range: float = 0.02
    """Std of the normal init of linear and embedding weights."""
    sliding_window: int | None = None
    """Mistral's attention window; sequences longer than it are refused (only full causal attention is built)."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """"sdpa": F.scaled_dot_product_attention(is_causal=True); "eager": matmul + mask + softmax."""

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise GraphllmError(
                f"model_type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise GraphllmError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise GraphllmError(
                f"num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.head_dim % 2 != 0:
            raise GraphllmError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rms_norm_eps <= 0:
            raise GraphllmError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.rope_theta <= 0:
            raise GraphllmError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise GraphllmError(f"attn_implementation must be 'sdpa' or 'eager', got {self.attn_implementation!r}")
        if self.model_type == "qwen2" and (not self.attention_bias or self.mlp_bias):
            raise GraphllmError("qwen2 has q/k/v biases and no MLP bias: set attention_bias=True, mlp_bias=False")
        if self.model_type == "mistral" and (self.attention_bias or self.mlp_bias):
            raise GraphllmError("mistral has no biases: set attention_bias=False, mlp_bias=False")
        if self.sliding_window is not None and self.model_type != "mistral":
            raise GraphllmError(f"sliding_window is only supported for mistral, got model_type {self.model_type!r}")
        self.rope_scaling = _check_rope_scaling(self.rope_scaling)

    @property
    def num_kv_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str) -> ModelConfig:
        """Parse an HF config.json dict; `source` (a path or name) is named in every error."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise GraphllmError(
                f"model_type {model_type!r} in {source} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise GraphllmError(f"{source} lacks {', '.join(missing)}; is it a complete HF config.json?")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise GraphllmError(f"hidden_act {act!r} in {source} is not supported; only 'silu' is")
        if model_type == "qwen2" and d.get("use_sliding_window", False):
            raise GraphllmError(f"use_sliding_window=true in {source} is not supported; only full attention is")

        rope_theta, rope_scaling = _rope_from_hf(d, source)
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        defaults = {"llama": 2048, "qwen2": 32768, "mistral": 131072}
        try:
            return cls(
                model_type=model_type,
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"],
                num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=d.get("num_key_value_heads") or heads,
                head_dim=head_dim,
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=d.get("max_position_embeddings", defaults[model_type]),
                attention_bias=True if model_type == "qwen2" else bool(d.get("attention_bias", False)),
                mlp_bias=bool(d.get("mlp_bias", False)) if model_type == "llama" else False,
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                initializer_range=float(d.get("initializer_range", 0.02)),
                sliding_window=d.get("sliding_window") if model_type == "mistral" else None,
            )
        except GraphllmError as e:
            raise GraphllmError(f"{source}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers loads into the matching *ForCausalLM class."""
        rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope_parameters.update(self.rope_scaling)
        d: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope_parameters,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "attention_dropout": 0.0,
        }
        if self.model_type == "llama":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = self.mlp_bias
        if self.model_type == "qwen2":
            d["use_sliding_window"] = False
            d["sliding_window"] = None
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        return d

    def to_dict(self) -> dict[str, Any]:
        """All fields, JSON-serialisable."""
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Short sha256 of the sorted JSON of all fields: equal configs give equal fingerprints."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _rope_from_hf(d: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either config.json style."""
    params = d.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            raise GraphllmError(
                f"rope_parameters in {source} must be one dict with a rope_type (per-layer RoPE is not supported), "
                f"got {params!r}"
            )
        params = dict(params)
        theta = params.pop("rope_theta", d.get("rope_theta", 10000.0))
        scaling = params
    else:
        theta = d.get("rope_theta", 10000.0)
        scaling = dict(d["rope_scaling"]) if d.get("rope_scaling") else None
    if scaling is not None:
        rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
        scaling.pop("type", None)
        partial = scaling.pop("partial_rotary_factor", 1.0)
        if partial != 1.0:
            raise GraphllmError(f"partial_rotary_factor={partial} in {source} is not supported; only 1.0 is")
        if rope_type == "default":
            scaling = None
        else:
            if rope_type == "llama3":
                # transformers fills this from max_position_embeddings when absent
                scaling.setdefault("original_max_position_embeddings", d.get("max_position_embeddings"))
            scaling = {"rope_type": rope_type, **scaling}
    try:
        return float(theta), _check_rope_scaling(scaling)
    except GraphllmError as e:
        raise GraphllmError(f"{source}: {e}") from None


def _check_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
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
        out[k] = int(scaling[k]) if k == "original_max_position_embeddings" else float(scaling[k])
    if rope_type == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise GraphllmError(
            f"llama3 rope_scaling needs high_freq_factor > low_freq_factor, "
            f"got {out['high_freq_factor']} and {out['low_freq_factor']}"
        )
    return out
