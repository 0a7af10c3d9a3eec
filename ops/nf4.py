"""graphllm::nf4_dequantize — QLoRA's frozen-base storage (Dettmers et al. 2023, arXiv:2305.14314, §3 and App. E).

A weight of n elements is stored as (bitsandbytes' `quantize_4bit(..., quant_type="nf4", compress_statistics=True)`):

- `codes`    uint8 [ceil(n/64)·32]: two 4-bit NormalFloat codes a byte, high nibble first, one block of 64
             consecutive (row-major) weights per 32 bytes; each code indexes NF4_CODE.
- `qscales`  uint8 [ceil(n/64)]: each block's absmax, minus `offset`, quantised to 8 bits ("double quantisation")
             with bitsandbytes' signed dynamic map (`dynamic_map()`), in groups of 256 blocks.
- `scales2`  fp32 [ceil(n/64/256)]: each group's absmax of the centred block absmaxes.
- `offset`   fp32 [1]: the mean of the block absmaxes.

w = NF4_CODE[code] · (dynamic_map()[qscale] · scales2[group] + offset), in fp32, then cast to the weight's dtype:
4 + 8/64 + 32/(64·256) = 4.127 bits a weight, plus 4 bytes. Rounding is to the nearest code (ties to the lower),
the published algorithm; it equals bitsandbytes' PyTorch kernels bit for bit (tests/test_qlora.py).

The op takes the two code books as inputs (`code_pairs`: NF4_CODE[b >> 4], NF4_CODE[b & 15] for every byte b, so a
byte dequantises with one gather and no bit operations; `qmap`: `dynamic_map()`) so a graph holds them once as
buffers. No autograd rule: the codes are not trained; the LoRA op that consumes the weight asks no gradient of it.
Lowerings: the decomposition below for inductor and for the NPU, where no torch_npu kernel takes NF4 (see
`NPU_WEIGHT_QUANT_MATMUL`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from graphllm.ops.autocast import register_autocast_policy

NF4_BLOCK = 64
"""Weights a block (one absmax each): QLoRA's and bitsandbytes' default blocksize."""
SCALE_BLOCK = 256
"""Block absmaxes a second-level group (one fp32 scale each): bitsandbytes' nested blocksize."""

NPU_WEIGHT_QUANT_MATMUL = "npu_weight_quant_batchmatmul"
"""torch_npu's weight-quantised matmul (2.13.0): y = x · antiquant(weight), antiquant(w) = (w + antiquant_offset) ·
antiquant_scale per tensor, channel or group of `antiquant_group_size` rows along K (a multiple of 32); weight int8,
int4 (int32-packed, or uint8 with weight_dtype int4) or the FP4 types float4_e2m1fn_x2 / float4_e1m2fn_x2. NF4 does
not map onto it: an affine map of int4 gives 16 equally spaced levels and NF4's gaps range from 0.080 to 0.304;
each FP4 type has 15 distinct values (±0) for NF4's 16; there is no code-book (lookup) argument. The block
geometry would fit (64 consecutive weights of a row of W [out, in] = a group of 64 along K for one output
column), the levels do not. Its docs also scope it to inference (no backward, and dx = g·W needs W along the other
axis). So the NPU lowers nf4_dequantize to the decomposition (gathers and a multiply-add that torchair converts)."""
NPU_NF4_CONTRACT = {NPU_WEIGHT_QUANT_MATMUL: ("x", "weight", "antiquant_scale", "antiquant_offset",
                                              "antiquant_group_size", "weight_dtype")}
"""The names the reasoning above reads in the wheel's schema (checked by tests/test_npu_contract.py)."""

NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
"""The 16 NF4 levels (QLoRA App. E; bitsandbytes `get_4bit_type("nf4")`): quantiles of N(0, 1) at 8 points of
[0.5, 0.9677083] and 7 of [0.0322917, 0.5], with an exact 0, scaled to [-1, 1]; not equally spaced."""


def dynamic_map() -> Tensor:
    """bitsandbytes' `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)` (Dettmers 2016,
    arXiv:1511.04561): 256 sorted fp32 values in [-1, 1], dense near 0, for the 8-bit block scales."""
    data: list[float] = []
    for i in range(7):  # exponent 10^(i-6); 2^i + 1 linear fraction boundaries in [0.1, 1]
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (i - 6)) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()  # fp32 products
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def code_pairs() -> Tensor:
    """[256, 2] fp32: the two NF4 values of each byte (high nibble, low nibble)."""
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    b = torch.arange(256)
    return torch.stack([code[b >> 4], code[b & 15]], dim=1)


@dataclass(frozen=True)
class NF4Weight:
    """One weight in NF4 storage (the op's per-weight inputs), with its logical shape and dtype."""

    codes: Tensor
    qscales: Tensor
    scales2: Tensor
    offset: Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype

    BUFFERS = ("codes", "qscales", "scales2", "offset")

    @property
    def nbytes(self) -> int:
        """Bytes held for this weight (the four buffers; the shared code books are not counted)."""
        return sum(getattr(self, b).nbytes for b in self.BUFFERS)

    def dequantize(self, pairs: Tensor | None = None, qmap: Tensor | None = None) -> Tensor:
        dev = self.codes.device
        pairs = code_pairs().to(dev) if pairs is None else pairs
        qmap = dynamic_map().to(dev) if qmap is None else qmap
        return nf4_dequantize(self.codes, self.qscales, self.scales2, self.offset, pairs, qmap, list(self.shape),
                              self.dtype)


def _blockwise(values: Tensor, code: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Absmax-scale each block of `block` consecutive values (the last block zero-padded, which leaves its absmax
    as it is) and round each scaled value to the nearest entry of the sorted `code`: (uint8 indices, absmax)."""
    n = values.numel()
    blocks = torch.nn.functional.pad(values, (0, -n % block)).view(-1, block)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1)
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8), absmax


@torch.no_grad()
def quantize_nf4(w: Tensor) -> NF4Weight:
    """`w` (any shape, fp32/bf16/fp16) in NF4 storage, double-quantised; deterministic, on w's device."""
    if not w.is_floating_point():
        raise TypeError(f"quantize_nf4: a floating-point weight is needed, got {w.dtype}")
    flat = w.detach().reshape(-1).to(torch.float32)
    codes, absmax = _blockwise(flat, torch.tensor(NF4_CODE, dtype=torch.float32, device=w.device), NF4_BLOCK)
    codes = codes.view(-1)
    packed = (codes[0::2] << 4) | codes[1::2]
    offset = absmax.mean()
    qscales, scales2 = _blockwise(absmax - offset, dynamic_map().to(w.device), SCALE_BLOCK)
    return NF4Weight(codes=packed.contiguous(), qscales=qscales.view(-1)[:absmax.numel()].contiguous(),
                     scales2=scales2.contiguous(), offset=offset.reshape(1), shape=tuple(w.shape), dtype=w.dtype)


def nf4_dequantize_decomposed(codes: Tensor, qscales: Tensor, scales2: Tensor, offset: Tensor, code_pairs: Tensor,
                              qmap: Tensor, shape: list[int], dtype: torch.dtype) -> Tensor:
    """The op's math in plain PyTorch (the reference kernel and the inductor / npu lowering): gathers, a
    broadcast multiply-add, views; in the order bitsandbytes computes (scale · code, then + offset, then · code)."""
    blocks = qscales.numel()
    group_scale = scales2.unsqueeze(1).expand(-1, SCALE_BLOCK).reshape(-1)[:blocks]
    absmax = torch.index_select(qmap, 0, qscales.to(torch.int32)) * group_scale
    absmax = absmax + offset
    pairs = torch.index_select(code_pairs, 0, codes.to(torch.int32))  # [blocks·32, 2]
    w = pairs.reshape(blocks, NF4_BLOCK) * absmax.unsqueeze(1)
    numel = 1
    for s in shape:
        numel *= s
    return w.reshape(-1)[:numel].reshape(shape).to(dtype)


@torch.library.custom_op("graphllm::nf4_dequantize", mutates_args=())
def nf4_dequantize(codes: Tensor, qscales: Tensor, scales2: Tensor, offset: Tensor, code_pairs: Tensor, qmap: Tensor,
                   shape: list[int], dtype: torch.dtype) -> Tensor:
    return nf4_dequantize_decomposed(codes, qscales, scales2, offset, code_pairs, qmap, shape, dtype).contiguous()


@nf4_dequantize.register_fake
def _(codes: Tensor, qscales: Tensor, scales2: Tensor, offset: Tensor, code_pairs: Tensor, qmap: Tensor,
      shape: list[int], dtype: torch.dtype) -> Tensor:
    torch._check(codes.dtype == torch.uint8 and qscales.dtype == torch.uint8, lambda: "nf4_dequantize: uint8 codes")
    torch._check(codes.numel() == qscales.numel() * (NF4_BLOCK // 2), lambda: "nf4_dequantize: 32 code bytes a block")
    return codes.new_empty(shape, dtype=dtype)


def nf4_dequantize_recomputed(codes: Tensor, qscales: Tensor, scales2: Tensor, offset: Tensor, code_pairs: Tensor,
                              qmap: Tensor, shape: list[int], dtype: torch.dtype) -> Tensor:
    """The inductor / npu lowering: the decomposition inside a non-reentrant checkpoint region. Dynamo traces the
    region as a `tag_activation_checkpoint` whose ops aot_autograd tags PREFER_RECOMPUTE, so the partitioner
    recomputes the weight in the backward instead of saving it (the op's own node carries the same request as
    node metadata, which a decomposition traced by Dynamo loses)."""
    return checkpoint(nf4_dequantize_decomposed, codes, qscales, scales2, offset, code_pairs, qmap, shape, dtype,
                      use_reentrant=False)


# fp32: the scales and code books must not be cast to bf16 under autocast (the result has the op's `dtype`)
register_autocast_policy("graphllm::nf4_dequantize", torch.float32)
