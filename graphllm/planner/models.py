"""Config-only models for `graphllm plan --model`: shapes of public checkpoints, never built (their weights would
not fit this machine). Each maps to the Hub id whose config.json it copies; `--emit` names that id."""

from __future__ import annotations

import os

from graphllm.models.config import ModelConfig


def llama2_70b() -> ModelConfig:
    """Llama-2-70B (meta-llama/Llama-2-70b-hf config.json): 80 layers, hidden 8192, GQA 64/8, MLP 28672."""
    return ModelConfig(model_type="llama", vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                       num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                       rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False)


def llama2_7b() -> ModelConfig:
    """Llama-2-7B (meta-llama/Llama-2-7b-hf config.json): 32 layers, hidden 4096, MHA 32, MLP 11008."""
    return ModelConfig(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                       rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False)


CONFIG_PRESETS = {"llama2-70b": ("meta-llama/Llama-2-70b-hf", llama2_70b),
                  "llama2-7b": ("meta-llama/Llama-2-7b-hf", llama2_7b)}
"""name → (the Hub id it stands for, its config)."""


def plan_model(name: str | os.PathLike) -> tuple[ModelConfig, str]:
    """(config, the --model `graphllm compile` takes) of a config-only preset, a graphllm preset, an HF directory
    or a Hub id (graphllm.models.load_config: reads config.json only)."""
    from graphllm.models import load_config

    name = os.fspath(name)
    if name in CONFIG_PRESETS:
        hub, make = CONFIG_PRESETS[name]
        return make(), hub
    return load_config(name), name
