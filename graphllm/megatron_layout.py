"""Megatron-Core GPT models in graphllm's terms: parameter names, the fused tensors, args <-> ModelConfig.

A "full" Megatron state dict here is what a tp=1, pp=1 Megatron-Core GPTModel (local spec) holds, with global
layer numbers N; graphllm's names are Hugging Face's:

| Megatron (full)                                        | graphllm                                        |
|--------------------------------------------------------|-------------------------------------------------|
| embedding.word_embeddings.weight [Vp, H]               | model.embed_tokens.weight [V, H] (padding cut)  |
| decoder.layers.N.input_layernorm.weight                | model.layers.N.input_layernorm.weight           |
| decoder.layers.N.self_attention.linear_qkv.weight/bias | model.layers.N.self_attn.{q,k,v}_proj.weight/bias |
| decoder.layers.N.self_attention.linear_proj.weight     | model.layers.N.self_attn.o_proj.weight          |
| decoder.layers.N.pre_mlp_layernorm.weight              | model.layers.N.post_attention_layernorm.weight  |
| decoder.layers.N.mlp.linear_fc1.weight [2F, H]         | model.layers.N.mlp.{gate,up}_proj.weight        |
| decoder.layers.N.mlp.linear_fc2.weight                 | model.layers.N.mlp.down_proj.weight             |
| decoder.final_layernorm.weight                         | model.norm.weight                               |
| output_layer.weight (untied only)                      | lm_head.weight                                  |

The Transformer Engine spec fuses each layer's norms into the linear after them
(`self_attention.linear_qkv.layer_norm_weight`, `mlp.linear_fc1.layer_norm_weight`), and torch_dist checkpoints
use those names whatever the spec; both are read as the local names above.

linear_qkv's rows, per key/value group g (of G): the group's H/G query heads, then its key head, then its value
head, head_dim rows each. A tensor-parallel shard holds G/tp whole groups, so its shards concatenate along rows.
linear_fc1 is [gate; up] in a full model, but each TP shard is [its gate rows; its up rows] (swiglu splits the
shard's output in halves), so the full tensor is not the concatenation of the shards: merge_tp/split_tp do that.
"""

from __future__ import annotations

import argparse
import dataclasses
import re

import torch

from graphllm.errors import GraphllmError
from graphllm.models import ModelConfig

ROWS, COLS, GATE_UP, WHOLE = "rows", "cols", "gate_up", "whole"
"""How a full tensor is split over tensor-parallel ranks: along dim 0, along dim 1, [gate; up] halves each split
along dim 0, or replicated."""
EXTRA_STATE = "_extra_state"
"""Suffix of Megatron's/TE's non-weight module state (fp8 metadata; None in the local spec): never converted."""
LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
TOP = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
       "decoder.final_layernorm.weight": "model.norm.weight", "output_layer.weight": "lm_head.weight"}
PER_LAYER = {  # Megatron suffix -> graphllm suffix under model.layers.N (None: fused, split by to_graphllm)
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.weight": None,
    "self_attention.linear_qkv.bias": None,
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.weight": None,
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
TE_NAMES = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
            "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}
LAYER_KEYS = ("input_layernorm.weight", "self_attention.linear_proj.weight", "self_attention.linear_proj._extra_state",
              "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
              "self_attention.linear_qkv._extra_state", "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight",
              "mlp.linear_fc1._extra_state", "mlp.linear_fc2.weight", "mlp.linear_fc2._extra_state")
"""A layer's entries in a Megatron-Core (local spec) state dict, in its order; each linear has an `_extra_state`."""
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
"""graphllm model types a Megatron GPT can be: mistral without a window is llama."""
NOT_ARCHITECTURE = {"vocab_size", "model_type", "max_position_embeddings", "initializer_range", "attn_implementation"}
"""ModelConfig fields that Megatron's args do not decide (vocab padding and model_type are compared apart)."""
UNSUPPORTED = {  # Megatron arg -> what it would make the model (refused when set to anything but its default)
    "num_experts": "a mixture of experts", "multi_latent_attention": "multi-latent attention",
    "qk_layernorm": "query/key norms", "add_bias_linear": "biases on every linear layer",
    "apply_layernorm_1p": "zero-centred norm weights", "rotary_interleaved": "interleaved RoPE",
    "squared_relu": "a squared-ReLU MLP", "openai_gelu": "a GELU MLP", "quick_geglu": "a GeGLU MLP",
    "mtp_num_layers": "multi-token prediction layers", "window_size": "sliding-window attention",
    "no_rope_freq": "layers without RoPE", "heterogeneous_layers_config_path": "heterogeneous layers",
    "heterogeneous_layers_config_encoded_json": "heterogeneous layers", "hybrid_override_pattern": "a hybrid model",
    "hybrid_layer_pattern": "a hybrid model", "attention_output_gate": "gated attention output",
}
LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
"""Megatron-Core's --use-rope-scaling: HF's llama3 RoPE with these fixed (RotaryEmbedding._apply_scaling)."""


def canonical(name: str) -> str | None:
    """`name` (a Megatron-Core GPT state-dict key) in the local spec's spelling; None for `_extra_state`;
    KeyError for a key that is not part of a llama-family GPT."""
    if name.endswith(EXTRA_STATE):
        return None
    if name in TOP:
        return name
    m = LAYER.fullmatch(name)
    if m is not None:
        suffix = TE_NAMES.get(m.group(2), m.group(2))
        if suffix in PER_LAYER:
            return f"decoder.layers.{m.group(1)}.{suffix}"
    raise KeyError(name)


def tp_rule(name: str) -> str:
    """How the full tensor `name` is split over tensor-parallel ranks (ROWS, COLS, GATE_UP or WHOLE)."""
    if name.endswith(("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight", "linear_qkv.bias")):
        return ROWS  # vocab-parallel embedding and head, column-parallel qkv (whole kv groups per rank)
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return COLS  # row-parallel linears: their input dim is split
    if name.endswith(("linear_fc1.weight", "linear_fc1.bias")):
        return GATE_UP
    return WHOLE


def merge_tp(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full tensor from its tensor-parallel shards (rank order)."""
    rule = tp_rule(name)
    if rule == WHOLE or len(shards) == 1:
        return shards[0]
    if rule != GATE_UP:
        return torch.cat(shards, dim=0 if rule == ROWS else 1)
    halves = [s.chunk(2, dim=0) for s in shards]  # each shard: [its gate rows; its up rows]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


def split_tp(name: str, full: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """`full` cut into `tp` shards as Megatron's tensor-parallel rank r holds shard r. Each shard owns its
    storage (torch.save of a view would write the whole tensor into every file)."""
    rule = tp_rule(name)
    if rule == WHOLE or tp == 1:
        return [full] * tp
    if rule != GATE_UP:
        return [c.clone() for c in full.chunk(tp, dim=0 if rule == ROWS else 1)]
    gate, up = full.chunk(2, dim=0)
    return [torch.cat([g, u]) for g, u in zip(gate.chunk(tp), up.chunk(tp))]


def to_graphllm(full: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A full Megatron state dict -> graphllm's (vocab rows beyond cfg.vocab_size dropped)."""
    out: dict[str, torch.Tensor] = {}
    G, D, per = cfg.num_key_value_heads, cfg.head_dim, cfg.num_kv_groups
    for name, t in full.items():
        if name in TOP:
            out[TOP[name]] = t if name == "decoder.final_layernorm.weight" else _rows(t, cfg.vocab_size)
            continue
        layer, suffix = LAYER.fullmatch(name).groups()
        pre = f"model.layers.{layer}."
        if PER_LAYER[suffix] is not None:
            out[pre + PER_LAYER[suffix]] = t
        elif suffix.startswith("self_attention.linear_qkv."):
            kind = suffix.rpartition(".")[2]  # weight [G*(per+2)*D, H] or bias [G*(per+2)*D]
            grouped = t.reshape(G, per + 2, D, *t.shape[1:])
            for proj, rows in (("q", grouped[:, :per]), ("k", grouped[:, per]), ("v", grouped[:, per + 1])):
                out[f"{pre}self_attn.{proj}_proj.{kind}"] = rows.reshape(-1, *t.shape[1:]).clone()
        else:  # mlp.linear_fc1.weight [2F, H] = [gate; up]
            gate, up = t.chunk(2, dim=0)
            out[pre + "mlp.gate_proj.weight"], out[pre + "mlp.up_proj.weight"] = gate.clone(), up.clone()
    return out


def to_megatron(sd: dict[str, torch.Tensor], cfg: ModelConfig, padded_vocab: int) -> dict[str, torch.Tensor]:
    """graphllm's state dict -> a full Megatron one (in Megatron-Core's order), vocab rows zero-padded to
    `padded_vocab`. A tied head is not written (Megatron keeps it in the embedding)."""
    G, D, per = cfg.num_key_value_heads, cfg.head_dim, cfg.num_kv_groups
    out = {"embedding.word_embeddings.weight": _pad_rows(sd["model.embed_tokens.weight"], padded_vocab)}
    for n in range(cfg.num_hidden_layers):
        src, dst = f"model.layers.{n}.", f"decoder.layers.{n}."
        out[dst + "input_layernorm.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "self_attention.linear_proj.weight"] = sd[src + "self_attn.o_proj.weight"]
        for kind in ("weight", "bias"):
            if src + f"self_attn.q_proj.{kind}" in sd:
                q, k, v = (sd[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv")
                rest = q.shape[1:]
                out[dst + f"self_attention.linear_qkv.{kind}"] = torch.cat(
                    [q.reshape(G, per, D, *rest), k.reshape(G, 1, D, *rest), v.reshape(G, 1, D, *rest)], dim=1
                ).reshape(-1, *rest)
        out[dst + "pre_mlp_layernorm.weight"] = sd[src + "post_attention_layernorm.weight"]
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([sd[src + "mlp.gate_proj.weight"],
                                                        sd[src + "mlp.up_proj.weight"]])
        out[dst + "mlp.linear_fc2.weight"] = sd[src + "mlp.down_proj.weight"]
    out["decoder.final_layernorm.weight"] = sd["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        out["output_layer.weight"] = _pad_rows(sd["lm_head.weight"], padded_vocab)
    return out


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    return t if t.shape[0] == n else t[:n].clone()


def _pad_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.shape[0] == n:
        return t
    return torch.cat([t, t.new_zeros(n - t.shape[0], *t.shape[1:])])


# -- args <-> ModelConfig ------------------------------------------------------------------------------------
def config_from_args(args: dict, source: str) -> tuple[ModelConfig, int]:
    """(the ModelConfig, the padded vocab size) of the GPT model Megatron builds from `args` (vars of the
    checkpoint's argparse Namespace); the config's vocab_size is the padded one. One line naming the arg for a
    model graphllm does not build."""
    args = dict(args)
    if "disable_bias_linear" in args and "add_bias_linear" not in args:  # what Megatron-LM does for old args
        args["add_bias_linear"] = not args["disable_bias_linear"]
    for name, what in UNSUPPORTED.items():
        if args.get(name) not in (None, False, 0):  # False == 0: switched off
            raise GraphllmError(f"{source}: args.{name}={args[name]!r} ({what}) is not supported; graphllm converts "
                                "llama-family GPT models (RMSNorm, SwiGLU, RoPE, no linear biases but q/k/v)")
    checks = [("normalization", args.get("normalization", "LayerNorm") == "RMSNorm", "RMSNorm"),
              ("swiglu", bool(args.get("swiglu")), "True"),
              ("position_embedding_type", _rope(args), "'rope'"),
              ("rotary_percent", float(args.get("rotary_percent") or 1.0) == 1.0, "1.0")]
    for name, ok, want in checks:
        if not ok:
            raise GraphllmError(f"{source}: args.{name}={args.get(name)!r} is not supported (graphllm converts {name} "
                                f"{want} only)")
    missing = [k for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "padded_vocab_size")
               if not args.get(k)]
    if missing:
        raise GraphllmError(f"{source}: the args lack {', '.join(missing)}; pass --hf-config with the model's HF "
                            "config.json")
    heads, hidden = args["num_attention_heads"], args["hidden_size"]
    qkv_bias = bool(args.get("add_qkv_bias"))
    try:
        cfg = ModelConfig(
            model_type="qwen2" if qkv_bias else "llama", vocab_size=args["padded_vocab_size"], hidden_size=hidden,
            intermediate_size=args["ffn_hidden_size"], num_hidden_layers=args["num_layers"],
            num_attention_heads=heads,
            num_key_value_heads=(args.get("num_query_groups") or heads) if args.get("group_query_attention") else heads,
            head_dim=args.get("kv_channels") or hidden // heads,
            rms_norm_eps=float(_first(args, ("norm_epsilon", "layernorm_epsilon"), 1e-5)),
            rope_theta=float(args.get("rotary_base") or 10000), rope_scaling=_rope_scaling(args),
            max_position_embeddings=args.get("max_position_embeddings") or args.get("seq_length") or 2048,
            attention_bias=qkv_bias, tie_word_embeddings=not args.get("untie_embeddings_and_output_weights", False),
            initializer_range=float(args.get("init_method_std") or 0.02))
    except GraphllmError as e:
        raise GraphllmError(f"{source}: the args describe no model graphllm builds: {e}") from None
    return cfg, args["padded_vocab_size"]


def _first(args: dict, names: tuple[str, ...], default):
    return next((args[n] for n in names if args.get(n) is not None), default)


def _rope(args: dict) -> bool:
    kind = args.get("position_embedding_type")
    return kind == "rope" or (kind is None and bool(args.get("use_rotary_position_embeddings")))


def _rope_scaling(args: dict) -> dict | None:
    if args.get("use_rope_scaling"):
        return {"rope_type": "llama3", "factor": float(args.get("rope_scaling_factor") or 8.0), **LLAMA3_DEFAULTS}
    if args.get("rotary_seq_len_interpolation_factor"):
        return {"rope_type": "linear", "factor": float(args["rotary_seq_len_interpolation_factor"])}
    return None


def first_difference(theirs: ModelConfig, ours: ModelConfig) -> tuple[str, object, object] | None:
    """The first architecture field where two configs differ: (field, theirs, ours); None when they build the
    same model (vocab size, max_position_embeddings and such aside)."""
    family = (FAMILIES.get(theirs.model_type, theirs.model_type), FAMILIES.get(ours.model_type, ours.model_type))
    if family[0] != family[1]:
        return "model_type", theirs.model_type, ours.model_type
    for f in dataclasses.fields(ModelConfig):
        if f.name not in NOT_ARCHITECTURE and getattr(theirs, f.name) != getattr(ours, f.name):
            return f.name, getattr(theirs, f.name), getattr(ours, f.name)
    return None


def check_target(target: ModelConfig, from_args: ModelConfig, padded_vocab: int, source: str, flag: str) -> None:
    """`target` (what the user stated, `flag`) must be the model `from_args` describes, with a vocabulary that
    fits in Megatron's padded one."""
    diff = first_difference(target, from_args)
    if diff is not None:
        name, want, got = diff
        raise GraphllmError(f"{flag} sets {name}={want!r} but the Megatron checkpoint {source} has {name}={got!r}; "
                            f"give the config of the model that was trained")
    if target.vocab_size > padded_vocab:
        raise GraphllmError(f"{flag} sets vocab_size={target.vocab_size} but the Megatron checkpoint {source} has "
                            f"{padded_vocab} embedding rows; give the config of the model that was trained")


def padded_vocab_size(vocab: int, divisible_by: int, tp: int) -> int:
    """Megatron-LM's padding of the vocabulary (_vocab_size_with_padding): a multiple of divisible_by * tp."""
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


def check_split(cfg: ModelConfig, tp: int, pp: int, padded_vocab: int) -> None:
    """Megatron's own conditions for splitting the model over tp x pp ranks (evenly: no custom pipeline layout)."""
    for flag, n in (("--tp", tp), ("--pp", pp)):
        if n < 1:
            raise GraphllmError(f"{flag} must be >= 1, got {n}")
    for what, size in (("num_attention_heads", cfg.num_attention_heads), ("num_key_value_heads (query groups)",
                       cfg.num_key_value_heads), ("intermediate_size", cfg.intermediate_size),
                       ("the padded vocab size", padded_vocab)):
        if size % tp:
            raise GraphllmError(f"--tp must divide {what}={size}, got {tp}")
    if cfg.num_hidden_layers % pp:
        raise GraphllmError(f"--pp must divide num_hidden_layers={cfg.num_hidden_layers}, got {pp}")


def megatron_args(cfg: ModelConfig, *, tp: int, pp: int, padded_vocab: int, divisible_by: int, iteration: int,
                  dtype: torch.dtype) -> argparse.Namespace:
    """The args Megatron-LM (`--use-checkpoint-args`) and config_from_args read to build this model; refuses
    (one line) a model Megatron's GPT does not express."""
    scaling = cfg.rope_scaling or {}
    if scaling and not (scaling["rope_type"] == "linear" or (scaling["rope_type"] == "llama3" and all(
            scaling[k] == v for k, v in LLAMA3_DEFAULTS.items()))):
        raise GraphllmError(f"rope_scaling {scaling} has no Megatron-Core form (it has linear, and llama3 with "
                            f"{LLAMA3_DEFAULTS}); this model cannot be written for Megatron")
    theta = int(cfg.rope_theta) if float(cfg.rope_theta).is_integer() else cfg.rope_theta
    args = argparse.Namespace(
        num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads, kv_channels=cfg.head_dim,
        group_query_attention=cfg.num_key_value_heads < cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        seq_length=cfg.max_position_embeddings, position_embedding_type="rope", use_rotary_position_embeddings=True,
        add_position_embedding=False, rotary_base=theta, rotary_percent=1.0, rotary_interleaved=False,
        use_rope_scaling=scaling.get("rope_type") == "llama3", rope_scaling_factor=float(scaling.get("factor", 8.0)),
        rotary_seq_len_interpolation_factor=scaling.get("factor") if scaling.get("rope_type") == "linear" else None,
        normalization="RMSNorm", norm_epsilon=cfg.rms_norm_eps, layernorm_epsilon=cfg.rms_norm_eps,
        apply_layernorm_1p=False, swiglu=True, squared_relu=False, openai_gelu=False, add_bias_linear=False,
        add_qkv_bias=FAMILIES.get(cfg.model_type) == "qwen2", qk_layernorm=False, num_experts=None,
        untie_embeddings_and_output_weights=not cfg.tie_word_embeddings, padded_vocab_size=padded_vocab,
        make_vocab_size_divisible_by=divisible_by, init_method_std=cfg.initializer_range, attention_dropout=0.0,
        hidden_dropout=0.0, apply_query_key_layer_scaling=False, transformer_impl="local",
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=None,
        num_layers_per_virtual_pipeline_stage=None, expert_model_parallel_size=1, ckpt_format="torch",
        use_dist_ckpt=False, no_save_optim=True, no_save_rng=True, params_dtype=dtype, bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16, iteration=iteration)
    rebuilt, _ = config_from_args(vars(args), "the written args")
    diff = first_difference(cfg, rebuilt)
    if diff is not None:
        raise GraphllmError(f"the checkpoint's model has {diff[0]}={diff[1]!r}, which Megatron-Core's GPT model does "
                            f"not build (it would have {diff[2]!r}); this model cannot be written for Megatron")
    return args
