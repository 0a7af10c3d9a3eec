"""Shared parity fixtures: tiny random HF models of each supported family, saved with save_pretrained,
and the relative-error measure the parity tests use."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

# fp32 parity: both sides compute the same math in fp32, but matmul/softmax/reduction order differs
# between HF's code path and ours (e.g. SDPA with enable_gqa vs repeat_kv), so allow 1e-5 relative.
FP32_PARITY_RTOL = 1e-5
VOCAB, BATCH, SEQ = 128, 2, 16
WINDOW = 6  # sliding window of the windowed families: shorter than SEQ
SGD_LR = 0.1

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)

# name -> (HF config class, HF model class, kwargs, save_pretrained max_shard_size or None)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(COMMON, num_key_value_heads=2), None),
    "llama-bias-rope-llama3": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                               dict(COMMON, num_key_value_heads=4, attention_bias=True, mlp_bias=True,
                                    rope_theta=50000.0,
                                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 64}),
                               "40KB"),  # sharded index path
    "qwen2-tied": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                   dict(COMMON, num_key_value_heads=2, tie_word_embeddings=True), None),
    "mistral-gqa-headdim": (transformers.MistralConfig, transformers.MistralForCausalLM,
                            dict(COMMON, num_key_value_heads=1, head_dim=24, sliding_window=None), None),
    # windows shorter than SEQ: keys outside the window must be masked exactly as transformers does
    "mistral-window": (transformers.MistralConfig, transformers.MistralForCausalLM,
                       dict(COMMON, num_key_value_heads=2, sliding_window=WINDOW), None),
    "phi3-longrope-partial": (transformers.Phi3Config, transformers.Phi3ForCausalLM,
                              dict(COMMON, num_key_value_heads=2, pad_token_id=None, partial_rotary_factor=0.5,
                                   max_position_embeddings=64, original_max_position_embeddings=8,
                                   rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.5],
                                                 "long_factor": [1.0, 2.0, 3.0, 4.0]}), None),
    "phi3-window": (transformers.Phi3Config, transformers.Phi3ForCausalLM,
                    dict(COMMON, num_key_value_heads=4, pad_token_id=None, sliding_window=WINDOW), None),
    "glm4": (transformers.Glm4Config, transformers.Glm4ForCausalLM,
             dict(COMMON, num_key_value_heads=2, head_dim=16, pad_token_id=None, eos_token_id=None), None),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               dict(COMMON, num_hidden_layers=3, num_key_value_heads=2, head_dim=16, pad_token_id=None,
                    sliding_window=WINDOW, query_pre_attn_scalar=24, attn_logit_softcapping=0.5,
                    final_logit_softcapping=2.0,
                    tie_word_embeddings=False), None),  # untied: tensor_parallel refuses a tied lm_head (tp2 test)
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
               dict(COMMON, num_hidden_layers=3, num_key_value_heads=2, head_dim=16, pad_token_id=None,
                    sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
                                     "full_attention": {"rope_type": "linear", "rope_theta": 50000.0,
                                                        "factor": 2.0}}), None),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(COMMON, num_key_value_heads=2, head_dim=16), None),
    # mixture of experts: top-2 of 4 (Mixtral), top-2 of 8 without renormalising and a dense layer (Qwen3-MoE);
    # the router aux loss is on, so a training forward adds it (tests/test_moe_models.py)
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(COMMON, num_key_value_heads=2, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                     output_router_logits=True, router_aux_loss_coef=0.02), None),
    "qwen3-moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(COMMON, num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=8,
                       num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1], output_router_logits=True,
                       router_aux_loss_coef=0.02), None),
    # latent attention (low-rank q, YaRN with mscale_all_dim, interleaved RoPE) and group-limited sigmoid routing:
    # layer 0 dense, 8 experts in 4 groups of which 2 are kept, so grouping changes the choice of some tokens
    "deepseek-v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM,
                    dict(COMMON, num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=8,
                         n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                         routed_scaling_factor=2.5, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
                         qk_rope_head_dim=8, v_head_dim=12, pad_token_id=None, bos_token_id=None, eos_token_id=None,
                         rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                       "mscale": 0.707, "mscale_all_dim": 1.0}), None),
}
MOE_FAMILIES = ("mixtral", "qwen3-moe")
SOFTCAPPED = ("gemma2",)  # transformers runs soft-capped attention eagerly only (no SDPA)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def hf_model(family: str, attn: str, seed: int = 0) -> torch.nn.Module:
    cfg_cls, model_cls, kwargs, _ = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = cfg_cls(**kwargs)
    cfg._attn_implementation = "eager" if family in SOFTCAPPED else attn
    model = model_cls(cfg).float()
    with torch.no_grad():  # HF init leaves biases 0 and norms 1: perturb everything so those paths count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def save_hf_checkpoint(model: torch.nn.Module, family: str, out: Path) -> Path:
    shard = FAMILIES[family][3]
    if shard is None:
        model.save_pretrained(out)
    else:
        model.save_pretrained(out, max_shard_size=shard)
    return out


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def sgd_step(model: torch.nn.Module, logits_fn, ids: torch.Tensor, targets: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=SGD_LR)
    logits = logits_fn(ids)
    loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad()


def parity_through_step(hf: torch.nn.Module, ours: torch.nn.Module, ours_logits, ids: torch.Tensor,
                        targets: torch.Tensor) -> tuple[float, float]:
    """Relative logits error of `ours_logits` against HF, then again after one identical SGD step on
    both (taken through `ours_logits`, so its backward must reach `ours`' parameters)."""
    hf_logits = lambda x: hf(input_ids=x).logits  # noqa: E731
    with torch.no_grad():
        err = rel_err(ours_logits(ids), hf_logits(ids))
    sgd_step(hf, hf_logits, ids, targets)
    sgd_step(ours, ours_logits, ids, targets)
    with torch.no_grad():
        err_step = rel_err(ours_logits(ids), hf_logits(ids))
    return err, err_step
