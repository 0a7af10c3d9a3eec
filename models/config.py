"""ModelConfig: the architecture of a decoder-only causal LM (llama, qwen2, qwen3, mistral, phi3, glm4, gemma2,
gemma3_text; mixtral and qwen3_moe with mixture-of-experts MLPs, models/moe.py; deepseek_v3 with latent attention,
models/mla.py, and shared-expert group-routed MoE, models/deepseek_moe.py), parsed from and written back to a
Hugging Face config.json dict (models/hf_config.py).

One decoder implementation (models/decoder.py) serves every family; the fields below describe the forms
it builds (norm with unit offset, GeGLU, sandwich norms, soft-capping, per-layer windows and RoPE, ...), so
a family is a set of field values, not a class.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from graphllm.errors import GraphllmError

from .families import (LAYER_TYPES, SUPPORTED_ACTIVATIONS, SUPPORTED_MODEL_TYPES, SUPPORTED_ROPE_TYPES,
                       check_mla, check_moe, check_rope_scaling, yarn_mscale)

__all__ = ["LAYER_TYPES", "SUPPORTED_ACTIVATIONS", "SUPPORTED_MODEL_TYPES", "SUPPORTED_ROPE_TYPES", "ModelConfig"]

ModelType = Literal["llama", "qwen2", "qwen3", "mistral", "phi3", "glm4", "gemma2", "gemma3_text", "mixtral",
                    "qwen3_moe", "deepseek_v3"]
# Names of a layer's norms: (before attention, after attention, before the MLP, after the MLP); None: absent.
_NORM_NAMES = {
    "glm4": ("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm"),
    "gemma2": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm"),
}
_NORM_NAMES["gemma3_text"] = _NORM_NAMES["gemma2"]
_PLAIN_NORMS = ("input_layernorm", None, "post_attention_layernorm", None)
# attention_bias covers o_proj too (DeepSeek-V3: q_a_proj, kv_a_proj_with_mqa and o_proj); qwen2/glm4: q/k/v only
_O_BIAS = ("llama", "gemma2", "gemma3_text", "qwen3", "qwen3_moe", "deepseek_v3")



@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Architecture of a dense causal LM; field names follow HF config.json where HF has the field."""

    model_type: ModelType
    """HF family; decides parameter names (norms, biases) and the HF class written back."""
    vocab_size: int
    """Rows of the embedding and of lm_head."""
    hidden_size: int
    """Width of the residual stream."""
    intermediate_size: int
    """Width of the gated MLP (gate/up output)."""
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
    """RoPE base (of the full-attention layers when rope_local_theta is set)."""
    rope_scaling: dict[str, Any] | None = None
    """None for plain RoPE, else {"rope_type": "linear"|"llama3"|"longrope", ...} as HF spells it."""
    max_position_embeddings: int = 2048
    """Longest sequence the model was trained for (informational; RoPE is computed per forward)."""
    attention_bias: bool = False
    """q/k/v projections have a bias; for llama/gemma o_proj has one too; qwen2 always True (no o bias)."""
    mlp_bias: bool = False
    """gate/up/down projections have a bias (llama only)."""
    tie_word_embeddings: bool = False
    """lm_head.weight is the embedding Parameter."""
    initializer_range: float = 0.02
    """Std of the normal init of linear and embedding weights."""
    sliding_window: int | None = None
    """Attention window W: query i sees keys j with i - W < j ≤ i (HF's convention), in the layers that
    layer_types marks "sliding_attention" (every layer when layer_types is None)."""
    layer_types: tuple[str, ...] | None = None
    """Per layer "full_attention" or "sliding_attention" (Gemma 2/3); None: every layer alike."""
    hidden_act: Literal["silu", "gelu_pytorch_tanh"] = "silu"
    """Gate activation of the MLP: silu (SwiGLU) or tanh-approximated GELU (GeGLU, Gemma)."""
    norm_unit_offset: bool = False
    """RMSNorm as Gemma: x̂ · (1 + weight) in float32, then cast; else llama's weight · cast(x̂)."""
    embed_scale: bool = False
    """Embedding output times sqrt(hidden_size) rounded to the compute dtype (Gemma)."""
    sandwich_norms: bool = False
    """Norms after attention and after the MLP too, before each residual add (Gemma 2/3, GLM-4)."""
    qk_norm: bool = False
    """RMSNorm over head_dim of every query and key head before RoPE (Gemma 3, Qwen3: q_norm, k_norm)."""
    query_pre_attn_scalar: float | None = None
    """Attention scale query_pre_attn_scalar**-0.5 (Gemma); None: head_dim**-0.5."""
    attn_logit_softcapping: float | None = None
    """Scores become cap · tanh(scores / cap) before the mask (Gemma 2); such layers use eager attention."""
    final_logit_softcapping: float | None = None
    """Logits become cap · tanh(logits / cap) (Gemma 2)."""
    partial_rotary_factor: float = 1.0
    """RoPE rotates the first int(head_dim · factor) dims of each head; the rest pass through (Phi-3, GLM-4)."""
    rope_interleaved: bool = False
    """RoPE pairs adjacent dims (x0, x1), (x2, x3)... (GLM-4) instead of the two halves (rotate_half)."""
    rope_local_theta: float | None = None
    """RoPE base of the sliding-window layers (Gemma 3); None: rope_theta everywhere."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """"sdpa": F.scaled_dot_product_attention(is_causal=True); "eager": matmul + mask + softmax."""
    num_experts: int = 0
    """Routed experts E of each mixture-of-experts MLP (HF num_local_experts / num_experts); 0: a dense model."""
    num_experts_per_tok: int = 0
    """Experts k each token is routed to (top-k of the router's softmax)."""
    moe_intermediate_size: int | None = None
    """Width of one expert's gated MLP; None: intermediate_size (Mixtral)."""
    norm_topk_prob: bool = True
    """The k routing weights are renormalised to sum to 1 (Mixtral always; Qwen3-MoE per config)."""
    decoder_sparse_step: int = 1
    """Layer i has experts when (i + 1) % decoder_sparse_step == 0 and i is not in mlp_only_layers."""
    mlp_only_layers: tuple[int, ...] = ()
    """Layers that keep a dense MLP of intermediate_size (Qwen3-MoE)."""
    output_router_logits: bool = False
    """With labels the loss adds router_aux_loss_coef × the load-balancing loss (transformers' semantics)."""
    router_aux_loss_coef: float = 0.001
    """Weight of the load-balancing loss in the training loss."""
    first_k_dense_replace: int = 0
    """The first k layers keep a dense MLP of intermediate_size (DeepSeek-V3); the rest have experts."""
    n_shared_experts: int = 0
    """DeepSeek-V3: one dense gated MLP of n_shared_experts × moe_intermediate_size beside the routed experts."""
    n_group: int = 1
    """DeepSeek-V3 routing: the experts form n_group equal groups; a token picks experts in topk_group of them."""
    topk_group: int = 1
    """Groups kept per token (ranked by the sum of their two best bias-corrected scores)."""
    routed_scaling_factor: float = 1.0
    """The k routing weights (after the optional renormalisation) are multiplied by this (DeepSeek-V3)."""
    q_lora_rank: int | None = None
    """Multi-head latent attention (DeepSeek-V3): rank of the query's low-rank projection; None: one q_proj."""
    kv_lora_rank: int = 0
    """Width of the compressed key/value latent of latent attention; 0: not latent attention."""
    qk_nope_head_dim: int = 0
    """Per-head query/key dims without RoPE in latent attention (the RoPE dims are head_dim, HF's qk_rope_head_dim)."""
    v_head_dim: int = 0
    """Per-head value width in latent attention."""
    mtp_layers: int = 0
    """Multi-token prediction modules after the decoder (DeepSeek-V3's MTP, models/mtp.py; `--mtp-layers`): module k
    predicts the token k + 1 ahead. graphllm names them model.mtp.<k>.*, HF files model.layers.<L + k>.*. Not read
    from config.json's num_nextn_predict_layers: a run asks for them."""

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
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise GraphllmError(f"hidden_act {self.hidden_act!r} is not supported; supported: "
                                f"{', '.join(SUPPORTED_ACTIVATIONS)}")
        if self.model_type == "qwen2" and (not self.attention_bias or self.mlp_bias):
            raise GraphllmError("qwen2 has q/k/v biases and no MLP bias: set attention_bias=True, mlp_bias=False")
        if self.model_type == "mistral" and (self.attention_bias or self.mlp_bias):
            raise GraphllmError("mistral has no biases: set attention_bias=False, mlp_bias=False")
        self._check_window()
        self._check_rotary()
        self.mlp_only_layers = tuple(self.mlp_only_layers)
        check_moe(self)
        check_mla(self)
        if not isinstance(self.mtp_layers, int) or isinstance(self.mtp_layers, bool) or self.mtp_layers < 0:
            raise GraphllmError(f"mtp_layers must be an integer ≥ 0, got {self.mtp_layers!r}")
        self.rope_scaling = check_rope_scaling(self.rope_scaling, self.rotary_dim, self.model_type)

    def _check_window(self) -> None:
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise GraphllmError(f"sliding_window must be a positive integer or null, got {self.sliding_window!r}")
        if self.layer_types is None:
            return
        self.layer_types = tuple(self.layer_types)
        bad = [t for t in self.layer_types if t not in LAYER_TYPES]
        if bad or len(self.layer_types) != self.num_hidden_layers:
            raise GraphllmError(f"layer_types must list {self.num_hidden_layers} entries of {', '.join(LAYER_TYPES)}, "
                                f"got {list(self.layer_types)}")
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise GraphllmError("layer_types has sliding_attention layers but sliding_window is null; set it")

    def _check_rotary(self) -> None:
        if not 0.0 < self.partial_rotary_factor <= 1.0 or self.rotary_dim % 2 or self.rotary_dim == 0:
            raise GraphllmError(f"partial_rotary_factor={self.partial_rotary_factor} must give an even number of "
                                f"rotary dims in (0, head_dim={self.head_dim}]")
        if self.rope_local_theta is not None and self.rope_local_theta <= 0:
            raise GraphllmError(f"rope_local_theta must be > 0, got {self.rope_local_theta}")
        for name in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise GraphllmError(f"{name} must be > 0 or null, got {value}")

    @property
    def num_kv_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates (HF's int(head_dim * partial_rotary_factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def mla(self) -> bool:
        """The layers use multi-head latent attention (models/mla.py) instead of q/k/v projections."""
        return self.model_type == "deepseek_v3"

    @property
    def qk_head_dim(self) -> int:
        """Query/key width per head: head_dim, or in latent attention the non-RoPE plus the RoPE dims."""
        return self.qk_nope_head_dim + self.head_dim if self.mla else self.head_dim

    @property
    def attention_scale(self) -> float:
        """The factor on q·k: query_pre_attn_scalar**-0.5 or head_dim**-0.5; in latent attention
        qk_head_dim**-0.5 times YaRN's mscale(factor, mscale_all_dim)² as transformers' yarn_apply_mscale."""
        if self.mla:
            scale = self.qk_head_dim ** (-0.5)
            rope = self.rope_scaling or {}
            if rope.get("mscale_all_dim"):
                mscale = yarn_mscale(rope["factor"], rope["mscale_all_dim"])
                scale = scale * mscale * mscale
            return scale
        return (self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim) ** -0.5

    @property
    def o_bias(self) -> bool:
        """o_proj has a bias (attention_bias in llama and gemma; qwen2/glm4 bias q/k/v only)."""
        return self.attention_bias and self.model_type in _O_BIAS

    @property
    def norm_names(self) -> tuple[str | None, ...]:
        """(before attention, after attention, before MLP, after MLP) norm names of a layer; None: absent."""
        return _NORM_NAMES.get(self.model_type, _NORM_NAMES["gemma2"]) if self.sandwich_norms else _PLAIN_NORMS

    def is_moe_layer(self, layer: int) -> bool:
        """Layer `layer` has a mixture-of-experts MLP (HF's decoder_sparse_step / mlp_only_layers rule)."""
        return (self.num_experts > 0 and layer not in self.mlp_only_layers and layer >= self.first_k_dense_replace
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def expert_size(self) -> int:
        """Width of one expert's gated MLP."""
        return self.moe_intermediate_size or self.intermediate_size

    def window_of(self, layer: int) -> int | None:
        """The attention window of layer `layer`, or None for full causal attention."""
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def local_rope(self, layer: int) -> bool:
        """Layer `layer` uses the local RoPE base (a sliding layer of a model with rope_local_theta)."""
        return self.rope_local_theta is not None and self.window_of(layer) is not None

    @classmethod
    def from_hf(cls, d: dict[str, Any], source: str) -> ModelConfig:
        """Parse an HF config.json dict; `source` (a path or name) is named in every error."""
        from .hf_config import config_from_hf

        return config_from_hf(cls, d, source)

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers loads into the matching *ForCausalLM class."""
        from .hf_config import config_to_hf

        return config_to_hf(self)

    def to_dict(self) -> dict[str, Any]:
        """All fields, JSON-serialisable."""
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Short sha256 of the sorted JSON of all fields: equal configs give equal fingerprints."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
