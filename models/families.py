"""What graphllm supports of HF configs: model types, activations, layer types and RoPE types, the check
of a rope_scaling dict and of the mixture-of-experts fields (shared by ModelConfig and the config.json reader,
models/hf_config.py), and the MoE fields read from config.json."""

from __future__ import annotations

from typing import Any

from graphllm.errors import GraphllmError

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("gemma2", "gemma3_text", "glm4", "llama", "mistral", "mixtral", "phi3", "qwen2",
                                          "qwen3", "qwen3_moe")
MOE_MODEL_TYPES: tuple[str, ...] = ("mixtral", "qwen3_moe")
# MoE fields of config.json graphllm does not implement when set, with the value that means "off"
_MOE_UNSUPPORTED = {"router_jitter_noise": 0.0, "shared_expert_intermediate_size": 0, "n_shared_experts": 0,
                    "num_shared_experts": 0, "moe_layer_freq": 1, "first_k_dense_replace": 0, "n_group": 1,
                    "topk_group": 1, "router_z_loss_coef": 0.0, "routed_scaling_factor": 1.0}
_SCORING = ("softmax",)
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


def moe_from_hf(d: dict[str, Any], model_type: str, source: str) -> dict[str, Any]:
    """ModelConfig's mixture-of-experts fields from an HF config.json dict ({} for a dense family).

    Fields graphllm does not implement are refused when set to anything but their "off" value, by name:
    Mixtral's training-time router_jitter_noise, shared experts, grouped or sigmoid routing, z-loss."""
    if model_type not in MOE_MODEL_TYPES:
        return {}
    for key, off in _MOE_UNSUPPORTED.items():
        if d.get(key) not in (None, off):
            raise GraphllmError(f"{key}={d[key]!r} in {source} is not supported (graphllm's {model_type} has "
                                f"plain top-k softmax routing over routed experts only); remove it or set {off}")
    scoring = d.get("scoring_func", "softmax")
    if scoring not in _SCORING:
        raise GraphllmError(f"scoring_func {scoring!r} in {source} is not supported; supported: {', '.join(_SCORING)}")
    experts = d.get("num_local_experts", d.get("num_experts", 8 if model_type == "mixtral" else 128))
    out: dict[str, Any] = {
        "num_experts": experts,
        "num_experts_per_tok": d.get("num_experts_per_tok", 2 if model_type == "mixtral" else 8),
        "output_router_logits": bool(d.get("output_router_logits", False)),
        "router_aux_loss_coef": float(d.get("router_aux_loss_coef", 0.001)),
    }
    if model_type == "qwen3_moe":
        out.update(moe_intermediate_size=d.get("moe_intermediate_size", 768),
                   norm_topk_prob=bool(d.get("norm_topk_prob", False)),
                   decoder_sparse_step=d.get("decoder_sparse_step", 1),
                   mlp_only_layers=tuple(d.get("mlp_only_layers") or ()))
    return out


def moe_to_hf(cfg: Any) -> dict[str, Any]:
    """The mixture-of-experts fields of config.json as transformers writes them ({} for a dense model)."""
    if cfg.model_type not in MOE_MODEL_TYPES:
        return {}
    out: dict[str, Any] = {"num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
                           "output_router_logits": cfg.output_router_logits,
                           "router_aux_loss_coef": cfg.router_aux_loss_coef}
    if cfg.model_type == "mixtral":
        out["router_jitter_noise"] = 0.0
    else:
        out.update(moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                   decoder_sparse_step=cfg.decoder_sparse_step, mlp_only_layers=list(cfg.mlp_only_layers))
    return out


def check_moe(cfg: Any) -> None:
    """Refuse inconsistent mixture-of-experts fields of a ModelConfig, naming the field."""
    moe = cfg.model_type in MOE_MODEL_TYPES
    if not moe:
        if cfg.num_experts:
            raise GraphllmError(f"num_experts={cfg.num_experts} needs an MoE model_type ({', '.join(MOE_MODEL_TYPES)}); "
                                f"{cfg.model_type} is dense")
        return
    if cfg.model_type == "mixtral" and not cfg.norm_topk_prob:
        raise GraphllmError("mixtral always renormalises its top-k routing weights: set norm_topk_prob=True")
    for name in ("num_experts", "num_experts_per_tok", "decoder_sparse_step"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise GraphllmError(f"{name} must be a positive integer for {cfg.model_type}, got {value!r}")
    if cfg.num_experts_per_tok > cfg.num_experts:
        raise GraphllmError(f"num_experts_per_tok={cfg.num_experts_per_tok} exceeds num_experts={cfg.num_experts}")
    if cfg.moe_intermediate_size is not None and cfg.moe_intermediate_size <= 0:
        raise GraphllmError(f"moe_intermediate_size must be > 0, got {cfg.moe_intermediate_size}")
    bad = [i for i in cfg.mlp_only_layers if not 0 <= i < cfg.num_hidden_layers]
    if bad:
        raise GraphllmError(f"mlp_only_layers names layer {bad[0]}; the model has {cfg.num_hidden_layers}")
    if cfg.router_aux_loss_coef < 0:
        raise GraphllmError(f"router_aux_loss_coef must be ≥ 0, got {cfg.router_aux_loss_coef}")
