"""RoPE inverse frequencies, computed exactly as transformers does (default, linear, llama3, longrope, yarn).

The same float32 ops in the same order as `transformers.modeling_rope_utils`, so the buffer is
bitwise equal to HF's `rotary_emb.inv_freq` and logits match to fp32 reduction order.
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig


def rope_inv_freq(cfg: ModelConfig, *, local: bool = False, long: bool = False) -> torch.Tensor:
    """Inverse frequencies, float32 [rotary_dim // 2], with cfg.rope_scaling applied.

    `local`: those of the sliding-window layers (base rope_local_theta, no scaling; Gemma 3).
    `long`: longrope's long factors (used when the sequence exceeds original_max_position_embeddings)."""
    dim = cfg.rotary_dim
    base = cfg.rope_local_theta if local else cfg.rope_theta
    scaling = None if local else cfg.rope_scaling
    if scaling is not None and scaling["rope_type"] == "longrope":
        ext = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
        return 1.0 / (ext * base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    # [D/2]: base^(-2i/D)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    if scaling is None:
        return inv_freq
    rope_type = scaling["rope_type"]
    if rope_type == "linear":
        # Scaling positions by 1/factor is the same as scaling the frequencies.
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3(inv_freq, scaling)
    if rope_type == "yarn":
        return _yarn(base, dim, scaling)
    raise AssertionError(f"rope_type {rope_type!r} passed ModelConfig validation but has no implementation")


def _llama3(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 frequency-dependent scaling: long wavelengths / factor, short kept, smooth in between."""
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]

    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def _yarn(base: float, dim: int, scaling: dict) -> torch.Tensor:
    """YaRN (DeepSeek-V3): frequencies above the correction range kept (extrapolation), below it divided by
    `factor` (interpolation), a linear ramp between; the cos/sin scale is rope_scaling's attention_factor."""
    factor = scaling["factor"]
    original = scaling["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times in original
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(scaling["beta_fast"]), correction_dim(scaling["beta_slow"])
    if scaling["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers: avoid dividing by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)  # [D/2]
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)  # [D/2]
    extrapolation = 1 - ramp  # 1: keep the frequency, 0: interpolate it
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
