"""ModelConfig <-> Hugging Face config.json, for every supported family.

Both config.json styles are read: the old one (top-level `rope_theta`, `rope_scaling`, Gemma 3's
`rope_local_base_freq`) and the transformers-5 one (`rope_parameters` = {"rope_type", "rope_theta", ...},
or for Gemma 3 one such dict per layer type), which is what transformers 5.x `save_pretrained` writes.
`config_to_hf` writes the transformers-5 style. Defaults are transformers' per family.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from graphllm.errors import GraphllmError

from .families import SUPPORTED_ACTIVATIONS, SUPPORTED_MODEL_TYPES, check_rope_scaling, moe_from_hf, moe_to_hf

if TYPE_CHECKING:
    from .config import ModelConfig

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
                  "phi3": "Phi3ForCausalLM", "glm4": "Glm4ForCausalLM", "gemma2": "Gemma2ForCausalLM",
                  "gemma3_text": "Gemma3ForCausalLM", "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM",
                  "qwen3_moe": "Qwen3MoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
_MAX_POSITIONS = {"llama": 2048, "qwen2": 32768, "mistral": 131072, "phi3": 4096, "glm4": 131072, "gemma2": 8192,
                  "gemma3_text": 131072, "qwen3": 32768, "mixtral": 131072, "qwen3_moe": 32768, "deepseek_v3": 4096}
_EPS = {"glm4": 1.5625e-07, "phi3": 1e-5, "mixtral": 1e-5}
_THETA = {"gemma3_text": 1e6, "mixtral": 1e6}  # default rope_theta where it is not 10000
_QWEN3 = ("qwen3", "qwen3_moe")  # q/k RMSNorm per head; no sliding window supported
_GEMMA = ("gemma2", "gemma3_text")
_WINDOWED = ("mistral", "mixtral", "phi3", *_GEMMA)
_LOCAL_THETA = 10000.0  # Gemma 3's default rope_local_base_freq / sliding_attention rope_theta


def config_from_hf(cls: type[ModelConfig], d: dict[str, Any], source: str) -> ModelConfig:
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
    gemma = model_type in _GEMMA
    act_key = "hidden_activation" if gemma and "hidden_activation" in d else "hidden_act"
    act = d.get(act_key, "gelu_pytorch_tanh" if gemma else "silu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise GraphllmError(f"{act_key} {act!r} in {source} is not supported; supported: "
                            f"{', '.join(SUPPORTED_ACTIVATIONS)}")
    if model_type in ("qwen2", *_QWEN3) and d.get("use_sliding_window", False):
        raise GraphllmError(f"use_sliding_window=true in {source} is not supported; only full attention is")
    if d.get("use_bidirectional_attention"):
        raise GraphllmError(f"use_bidirectional_attention=true in {source} is not supported; only causal "
                            "attention is")
    heads = d["num_attention_heads"]
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    if model_type == "deepseek_v3":  # transformers' head_dim is the RoPE part of latent attention's heads
        head_dim = d.get("qk_rope_head_dim", 64)
    moe = moe_from_hf(d, model_type, source)
    try:
        rope = _rope_from_hf(d, model_type, head_dim, source)
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", _EPS.get(model_type, 1e-6))),
            max_position_embeddings=d.get("max_position_embeddings", _MAX_POSITIONS[model_type]),
            attention_bias=True if model_type == "qwen2" else bool(d.get("attention_bias", model_type == "glm4")),
            mlp_bias=bool(d.get("mlp_bias", False)) if model_type == "llama" else False,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", gemma)),
            initializer_range=float(d.get("initializer_range", 0.02)),
            hidden_act=act,
            **_window_from_hf(d, model_type),
            **_gemma_from_hf(d, model_type),
            **_mla_from_hf(d, model_type),
            **moe,
            **rope,
        )
    except GraphllmError as e:
        raise GraphllmError(f"{source}: {e}") from None


def _window_from_hf(d: dict[str, Any], model_type: str) -> dict[str, Any]:
    if model_type not in _WINDOWED:
        return {}
    if model_type not in _GEMMA:
        return {"sliding_window": d.get("sliding_window")}
    window = d.get("sliding_window", 4096)
    layer_types = d.get("layer_types")
    if layer_types is None:  # older configs: every `pattern`-th layer is global
        pattern = 2 if model_type == "gemma2" else int(d.get("sliding_window_pattern", 6))
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                       for i in range(d["num_hidden_layers"])]
    return {"sliding_window": window, "layer_types": tuple(layer_types)}


def _gemma_from_hf(d: dict[str, Any], model_type: str) -> dict[str, Any]:
    if model_type == "glm4":
        return {"sandwich_norms": True, "rope_interleaved": True}
    if model_type in _QWEN3:
        return {"qk_norm": True}
    if model_type not in _GEMMA:
        return {}
    caps = (50.0, 30.0) if model_type == "gemma2" else (None, None)
    return {"norm_unit_offset": True, "embed_scale": True, "sandwich_norms": True,
            "qk_norm": model_type == "gemma3_text",
            "query_pre_attn_scalar": float(d.get("query_pre_attn_scalar", 256)),
            "attn_logit_softcapping": d.get("attn_logit_softcapping", caps[0]),
            "final_logit_softcapping": d.get("final_logit_softcapping", caps[1])}


def _mla_from_hf(d: dict[str, Any], model_type: str) -> dict[str, Any]:
    """DeepSeek-V3's latent-attention fields with transformers' defaults (MTP layers, num_nextn_predict_layers,
    are built only when a run asks for them, --mtp-layers: transformers' DeepseekV3ForCausalLM has none and ignores
    their weights)."""
    if model_type != "deepseek_v3":
        return {}
    return {"q_lora_rank": d.get("q_lora_rank", 1536), "kv_lora_rank": d.get("kv_lora_rank", 512),
            "qk_nope_head_dim": d.get("qk_nope_head_dim", 128), "v_head_dim": d.get("v_head_dim", 128),
            "rope_interleaved": bool(d.get("rope_interleave", True))}


def _mla_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    if not cfg.mla:
        return {}
    return {"q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
            "qk_rope_head_dim": cfg.head_dim, "v_head_dim": cfg.v_head_dim, "rope_interleave": cfg.rope_interleaved,
            "num_nextn_predict_layers": cfg.mtp_layers}  # the model.layers.<L + k>.* MTP weights written


def _rope_from_hf(d: dict[str, Any], model_type: str, head_dim: int, source: str) -> dict[str, Any]:
    """rope_theta, rope_scaling, partial_rotary_factor and rope_local_theta from either config.json style."""
    params = d.get("rope_parameters")
    local_theta = None
    if isinstance(params, dict) and "full_attention" in params:  # per layer type (Gemma 3)
        local = dict(params.get("sliding_attention") or {})
        if local.get("rope_type", "default") != "default":
            raise GraphllmError(f"rope_parameters.sliding_attention.rope_type {local['rope_type']!r} in {source} is "
                                "not supported; only 'default' is")
        local_theta = float(local.get("rope_theta", _LOCAL_THETA))
        params = params["full_attention"]
    elif model_type == "gemma3_text":
        local_theta = float(d.get("rope_local_base_freq", _LOCAL_THETA))
    if params is not None:
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            raise GraphllmError(
                f"rope_parameters in {source} must be one dict with a rope_type (or one per layer type), got {params!r}"
            )
        params = dict(params)
        theta = params.pop("rope_theta", d.get("rope_theta", _THETA.get(model_type, 10000.0)))
        scaling = params
    else:
        theta = d.get("rope_theta", _THETA.get(model_type, 10000.0))
        scaling = dict(d["rope_scaling"]) if d.get("rope_scaling") else None
    partial = d.get("partial_rotary_factor", 0.5 if model_type == "glm4" else 1.0)
    if scaling is not None:
        rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
        scaling.pop("type", None)
        partial = scaling.pop("partial_rotary_factor", partial)
        if rope_type == "default":
            scaling = None
        else:
            if rope_type in ("llama3", "longrope", "yarn"):
                # transformers fills these from the top level when absent
                scaling.setdefault("original_max_position_embeddings",
                                   d.get("original_max_position_embeddings", d.get("max_position_embeddings")))
            if rope_type == "longrope":
                scaling["attention_factor"] = _longrope_attention_factor(d, model_type, scaling)
            scaling = {"rope_type": rope_type, **scaling}
    out = {"rope_theta": float(theta), "partial_rotary_factor": float(partial), "rope_local_theta": local_theta}
    out["rope_scaling"] = check_rope_scaling(scaling, int(head_dim * float(partial)), model_type)
    return out


def _longrope_attention_factor(d: dict[str, Any], model_type: str, scaling: dict[str, Any]) -> float:
    """transformers' default: sqrt(1 + ln(factor) / ln(original)) with factor = max / original positions."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor")
    if factor is None:
        factor = d.get("max_position_embeddings", _MAX_POSITIONS[model_type]) / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A config.json dict that transformers loads into the matching *ForCausalLM class."""
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope_parameters.update(cfg.rope_scaling)
    if cfg.partial_rotary_factor != 1.0 or cfg.model_type in ("phi3", "glm4"):
        rope_parameters["partial_rotary_factor"] = cfg.partial_rotary_factor
    gemma = cfg.model_type in _GEMMA
    d: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_activation" if gemma else "hidden_act": cfg.hidden_act,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope_parameters,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range,
        "attention_dropout": 0.0,
    }
    if cfg.model_type in ("llama", "glm4", "deepseek_v3", *_GEMMA, *_QWEN3):
        d["attention_bias"] = cfg.attention_bias
    if cfg.model_type == "llama":
        d["mlp_bias"] = cfg.mlp_bias
    if cfg.model_type in ("qwen2", *_QWEN3):
        d["use_sliding_window"] = False
        d["sliding_window"] = None
    d.update(moe_to_hf(cfg))
    d.update(_mla_to_hf(cfg))
    if cfg.mtp_layers:  # DeepSeek's key; transformers keeps it as an attribute of any config
        d["num_nextn_predict_layers"] = cfg.mtp_layers
    if cfg.model_type in _WINDOWED:
        d["sliding_window"] = cfg.sliding_window
    if cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "longrope":
        d["original_max_position_embeddings"] = cfg.rope_scaling["original_max_position_embeddings"]
    if gemma:
        scalar = cfg.query_pre_attn_scalar
        scalar = int(scalar) if scalar is not None and float(scalar).is_integer() else scalar  # HF: an int
        d.update(layer_types=list(cfg.layer_types or ()), query_pre_attn_scalar=scalar,
                 attn_logit_softcapping=cfg.attn_logit_softcapping,
                 final_logit_softcapping=cfg.final_logit_softcapping)
    if cfg.model_type == "gemma3_text":
        local = cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope_theta
        d["rope_parameters"] = {"full_attention": rope_parameters,
                                "sliding_attention": {"rope_type": "default", "rope_theta": local}}
    return d
