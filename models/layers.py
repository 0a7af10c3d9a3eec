"""The building blocks of the decoder: RMSNorm (llama's and Gemma's unit-offset form), the gated MLP
(SwiGLU / GeGLU), RoPE rotation (rotate_half or interleaved pairs, full or partial) and repeat_kv.

Each form is written exactly as graph passes match it (fuse_rms_norm, fuse_swiglu, fuse_rope): change a
form here only together with the pass that matches it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, result cast back to the input dtype before the weight multiply."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype != torch.float32:
            x = x.to(torch.float32)
        var = x.pow(2).mean(-1, keepdim=True)  # [..., 1]
        x = x * torch.rsqrt(var + self.eps)
        if dtype != torch.float32:
            x = x.to(dtype)
        return self.weight * x

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class UnitOffsetRMSNorm(nn.Module):
    """Gemma's RMSNorm: x̂ · (1 + weight), all in float32, cast back to the input dtype last; weight starts at 0."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)  # [..., hidden]
        out = out * (1.0 + self.weight.float())
        return out.type_as(x)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, unit_offset"


def make_norm(cfg: ModelConfig, size: int) -> nn.Module:
    """The family's RMSNorm over the last `size` features."""
    return UnitOffsetRMSNorm(size, cfg.rms_norm_eps) if cfg.norm_unit_offset else RMSNorm(size, cfg.rms_norm_eps)


class GatedMLP(nn.Module):
    """SwiGLU down(silu(gate(x)) * up(x)), or GeGLU with gelu(tanh approximation) in place of silu."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        bias = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)
        self.gelu = cfg.hidden_act == "gelu_pytorch_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gelu:
            return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., D]: (x1, x2) -> (-x2, x1) on the two halves of the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., D]: each adjacent pair (x0, x1) -> (-x1, x0) (GLM's interleaved RoPE)."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = False) -> torch.Tensor:
    """x [..., D] rotated by tables cos, sin [..., R] (R ≤ D: the first R dims rotate, the rest pass)."""
    rotate = rotate_pairs if interleaved else rotate_half
    R = cos.shape[-1]
    if R == x.shape[-1]:
        return x * cos + rotate(x) * sin
    x_rot, x_pass = x[..., :R], x[..., R:]
    return torch.cat((x_rot * cos + rotate(x_rot) * sin, x_pass), dim=-1)


def rope_table(emb: torch.Tensor, fn, scale: float, index: tuple, dtype: torch.dtype) -> torch.Tensor:
    """fn(emb) (cos or sin of the angles, float32) times longrope's `scale`, indexed to broadcast, in `dtype`."""
    t = fn(emb)
    if scale != 1.0:
        t = t * scale
    return t[index].to(dtype)


def rope_angles(freqs: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """freqs [..., R/2] -> angles [..., R]: the halves repeated (rotate_half) or each one twice (pairs)."""
    if interleaved:
        return torch.stack((freqs, freqs), dim=-1).flatten(-2)
    return torch.cat((freqs, freqs), dim=-1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, Hkv * n_rep, S, D], each kv head repeated n_rep times (HF's repeat_kv)."""
    if n_rep == 1:
        return x
    B, Hkv, S, D = x.shape
    x = x[:, :, None, :, :].expand(B, Hkv, n_rep, S, D)
    return x.reshape(B, Hkv * n_rep, S, D)
