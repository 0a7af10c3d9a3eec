"""What graphllm supports of HF configs: model types, activations, layer types and RoPE types, the check
of a rope_scaling dict, of the mixture-of-experts fields and of DeepSeek-V3's latent-attention fields (shared by
ModelConfig and the config.json reader, models/hf_config.py), and the MoE fields read from config.json."""

from __future__ import annotations

import math
from typing import Any

from graphllm.errors import GraphllmError

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("deepseek_v3", "gemma2", "gemma3_text", "glm4", "llama", "mistral", "mixtral",
                                          "phi3", "qwen2", "qwen3", "qwen3_moe")
MOE_MODEL_TYPES: tuple[str, ...] = ("mixtral", "qwen3_moe", "deepseek_v3")
# MoE fields of config.json graphllm does not implement when set, with the value that means "off"
_MOE_UNSUPPORTED = {"router_jitter_noise": 0.0, "shared_expert_intermediate_size": 0, "n_shared_experts": 0,
                    "num_shared_experts": 0, "moe_layer_freq": 1, "first_k_dense_replace": 0, "n_group": 1,
                    "topk_group": 1, "router_z_loss_coef": 0.0, "routed_scaling_factor": 1.0}
_SCORING = ("softmax",)
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3", "longrope")
# YaRN is implemented (and tested against transformers) with latent attention's mscale only
MLA_ROPE_TYPES: tuple[str, ...] = (*SUPPORTED_ROPE_TYPES, "yarn")
SUPPORTED_ACTIVATIONS: tuple[str, ...] = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES: tuple[str, ...] = ("full_attention", "sliding_attention")
# Keys each rope_type needs in rope_scaling (besides rope_type itself).
_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings", "attention_factor"),
    "yarn": ("factor", "original_max_position_embeddings"),  # optional keys: _yarn_options
}
# DeepSeek-V3 routing as transformers implements it (config.json spells the original's choices out)
_DEEPSEEK_ROUTING = {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1}
# ModelConfig's DeepSeek-V3 MoE fields at the value that means "off", which every other family must keep
_DEEPSEEK_MOE_OFF = {"n_shared_experts": 0, "first_k_dense_replace": 0, "n_group": 1, "topk_group": 1,
                     "routed_scaling_factor": 1.0}


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 · mscale · ln(factor) + 1 (1 for factor ≤ 1), as transformers has it."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def _yarn_options(scaling: dict[str, Any], factor: float) -> dict[str, Any]:
    """YaRN's optional keys with transformers' defaults; attention_factor (the cos/sin scale) is computed here as
    transformers does when the config leaves it out: mscale(factor, mscale) / mscale(factor, mscale_all_dim) when
    both are set, else mscale(factor)."""
    out: dict[str, Any] = {"beta_fast": float(scaling.get("beta_fast") or 32),
                           "beta_slow": float(scaling.get("beta_slow") or 1),
                           "truncate": bool(scaling.get("truncate", True))}
    for key in ("mscale", "mscale_all_dim"):
        if scaling.get(key) is not None:
            out[key] = float(scaling[key])
    attention = scaling.get("attention_factor")
    if attention is None:
        m, m_all = out.get("mscale"), out.get("mscale_all_dim")
        attention = yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if m and m_all else yarn_mscale(factor)
    out["attention_factor"] = float(attention)
    return out


def check_rope_scaling(scaling: dict[str, Any] | None, rotary_dim: int, model_type: str) -> dict[str, Any] | None:
    """Validate a rope_scaling dict of `model_type`; returns it normalised (None for plain RoPE, only the keys used)."""
    if scaling is None:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type"))
    supported = MLA_ROPE_TYPES if model_type == "deepseek_v3" else SUPPORTED_ROPE_TYPES
    if rope_type not in supported:
        raise GraphllmError(f"rope_type {rope_type!r} is not supported; supported: {', '.join(supported)}")
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
    if rope_type == "yarn":
        out.update(_yarn_options(scaling, out["factor"]))
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
    if model_type == "deepseek_v3":
        return _deepseek_moe_from_hf(d, source)
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


def _deepseek_moe_from_hf(d: dict[str, Any], source: str) -> dict[str, Any]:
    """DeepSeek-V3's MoE fields, with transformers' defaults. Its config.json has no load-balancing loss (the
    balance comes from e_score_correction_bias, updated outside the gradient), so output_router_logits is not
    carried: transformers' DeepseekV3ForCausalLM adds no aux loss either."""
    for key, supported in _DEEPSEEK_ROUTING.items():
        if d.get(key) not in (None, supported):
            raise GraphllmError(f"{key}={d[key]!r} in {source} is not supported; graphllm's deepseek_v3 supports "
                                f"{key}={supported!r} only (transformers' DeepseekV3 routing)")
    return {"num_experts": d.get("n_routed_experts", d.get("num_local_experts", 256)),
            "num_experts_per_tok": d.get("num_experts_per_tok", 8),
            "moe_intermediate_size": d.get("moe_intermediate_size", 2048),
            "norm_topk_prob": bool(d.get("norm_topk_prob", True)),
            "n_shared_experts": d.get("n_shared_experts", 1),
            "first_k_dense_replace": d.get("first_k_dense_replace", 3),
            "n_group": d.get("n_group", 8),
            "topk_group": d.get("topk_group", 4),
            "routed_scaling_factor": float(d.get("routed_scaling_factor", 2.5))}


def moe_to_hf(cfg: Any) -> dict[str, Any]:
    """The mixture-of-experts fields of config.json as transformers writes them ({} for a dense model)."""
    if cfg.model_type not in MOE_MODEL_TYPES:
        return {}
    if cfg.model_type == "deepseek_v3":
        return {"n_routed_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
                "moe_intermediate_size": cfg.moe_intermediate_size, "norm_topk_prob": cfg.norm_topk_prob,
                "n_shared_experts": cfg.n_shared_experts, "first_k_dense_replace": cfg.first_k_dense_replace,
                "n_group": cfg.n_group, "topk_group": cfg.topk_group,
                "routed_scaling_factor": cfg.routed_scaling_factor, "output_router_logits": False}
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
        _refuse_set(cfg, _DEEPSEEK_MOE_OFF, "deepseek_v3")
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
    if cfg.model_type == "deepseek_v3":
        _check_deepseek_moe(cfg)
    else:
        _refuse_set(cfg, _DEEPSEEK_MOE_OFF, "deepseek_v3")


def _refuse_set(cfg: Any, off: dict[str, Any], needs: str) -> None:
    for name, value in off.items():
        if getattr(cfg, name) != value:
            raise GraphllmError(f"{name}={getattr(cfg, name)!r} needs model_type {needs}; {cfg.model_type} "
                                f"supports {name}={value!r} only")


def _check_deepseek_moe(cfg: Any) -> None:
    """Group-limited routing needs equal groups of ≥ 2 experts (each group is ranked by its two best scores) and
    enough experts in the kept groups for the top-k."""
    for name in ("n_shared_experts", "n_group", "topk_group", "moe_intermediate_size"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise GraphllmError(f"{name} must be a positive integer for deepseek_v3, got {value!r}")
    E, groups = cfg.num_experts, cfg.n_group
    if E % groups or E // groups < 2:
        raise GraphllmError(f"n_group={groups} must split num_experts={E} into equal groups of at least 2 experts")
    if cfg.topk_group > groups:
        raise GraphllmError(f"topk_group={cfg.topk_group} exceeds n_group={groups}")
    if cfg.num_experts_per_tok > cfg.topk_group * (E // groups):
        kept = cfg.topk_group * (E // groups)
        raise GraphllmError(f"num_experts_per_tok={cfg.num_experts_per_tok} exceeds the {kept} experts of "
                            f"topk_group={cfg.topk_group} groups")
    if not 0 <= cfg.first_k_dense_replace <= cfg.num_hidden_layers:
        raise GraphllmError(f"first_k_dense_replace={cfg.first_k_dense_replace} must be in [0, num_hidden_layers="
                            f"{cfg.num_hidden_layers}]")
    if not cfg.routed_scaling_factor > 0:
        raise GraphllmError(f"routed_scaling_factor must be > 0, got {cfg.routed_scaling_factor}")
    if cfg.output_router_logits:
        raise GraphllmError("output_router_logits=True is not supported for deepseek_v3: it has no load-balancing "
                            "loss (transformers' DeepseekV3 neither); set it False")


def check_mla(cfg: Any) -> None:
    """Refuse inconsistent latent-attention fields (DeepSeek-V3), naming the field; other families must leave
    them unset."""
    if not cfg.mla:
        _refuse_set(cfg, {"q_lora_rank": None, "kv_lora_rank": 0, "qk_nope_head_dim": 0, "v_head_dim": 0},
                    "deepseek_v3")
        return
    for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise GraphllmError(f"{name} must be a positive integer for deepseek_v3, got {value!r}")
    if cfg.q_lora_rank is not None and (not isinstance(cfg.q_lora_rank, int) or cfg.q_lora_rank <= 0):
        raise GraphllmError(f"q_lora_rank must be a positive integer or null, got {cfg.q_lora_rank!r}")
    if cfg.num_key_value_heads != cfg.num_attention_heads:
        raise GraphllmError(f"num_key_value_heads={cfg.num_key_value_heads} is not supported for deepseek_v3: latent "
                            f"attention expands keys for every head; set it to num_attention_heads="
                            f"{cfg.num_attention_heads}")
    if cfg.partial_rotary_factor != 1.0 or cfg.sliding_window is not None or cfg.attn_logit_softcapping is not None:
        raise GraphllmError("deepseek_v3 supports neither partial_rotary_factor, sliding_window nor "
                            "attn_logit_softcapping; leave them unset")
