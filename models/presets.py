"""Named model configs; each preset is a function returning a fresh ModelConfig."""

from __future__ import annotations

from typing import Callable

from .config import ModelConfig


def tiny_llama() -> ModelConfig:
    """~7.0M-parameter llama for tests and smoke runs (GQA 8/4, head_dim 32)."""
    return ModelConfig(
        model_type="llama",
        vocab_size=8000,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def small_llama() -> ModelConfig:
    """~134M-parameter llama (GPT-2-small width, 12 layers, MHA, untied)."""
    return ModelConfig(
        model_type="llama",
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny-llama": tiny_llama,
    "small-llama": small_llama,
}
