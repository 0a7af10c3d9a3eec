"""The npu lowering: each graphllm op as a call of its torch_npu kernel (the torchair backend's table).

`torch.ops.npu.*` is looked up when a lowering runs (while the backend traces the graph on an Ascend
machine), so importing this module needs no torch_npu. Arguments are passed by the names of torch_npu
2.13's schemas; NPU_CONTRACT lists every kernel and argument name used here, and the contract test
checks them against the torch_npu wheel's own schema file. Backward: torch_npu registers autograd for
npu_rms_norm, npu_swiglu, npu_rotary_mul and npu_fusion_attention, so autograd differentiates those
directly; npu_add_rms_norm has none, and `_AddRmsNormNpu` supplies it from kernels that exist.
attention_block needs a gradient for the lse it reads off npu_fusion_attention, which the grad kernel lacks:
`_AttentionBlockNpu` gives it graphllm's backward rule.
"""

from __future__ import annotations

import torch
from torch import Tensor

from graphllm.ops.attention_block import attention_block_grads, block_visible
from graphllm.ops.lowering_npu_mc2 import NPU_MC2_CONTRACT, npu_mc2_lowerings
from graphllm.ops.lowering_npu_moe import NPU_MOE_CONTRACT
from graphllm.ops.rope import rope_decomposed

# npu_fusion_attention's sparse_mode 2 (leftUpCausal: query i sees keys 0..i, as SDPA's is_causal) takes
# this fixed, compressed mask: 2048×2048 bool, True = masked (the upper triangle).
CAUSAL_MASK_SIZE = 2048
SPARSE_MODE_NONE, SPARSE_MODE_LEFT_UP_CAUSAL, SPARSE_MODE_BAND = 0, 2, 4

NPU_CONTRACT: dict[str, tuple[str, ...]] = {
    "npu_add_rms_norm": ("x1", "x2", "gamma", "epsilon"),
    "npu_rms_norm_backward": ("dy", "self", "gamma", "rstd"),
    "npu_rms_norm": ("self", "gamma", "epsilon"),
    "npu_swiglu": ("self", "dim"),
    "npu_rotary_mul": ("self", "r1", "r2", "rotary_mode"),
    "npu_fusion_attention": ("query", "key", "value", "head_num", "input_layout", "atten_mask", "scale",
                             "pre_tockens", "next_tockens", "sparse_mode"),
}
NPU_CONTRACT.update(NPU_MC2_CONTRACT)
NPU_CONTRACT.update(NPU_MOE_CONTRACT)  # written and tested, not in npu_lowerings: ops/lowering_npu_moe.py says why
NPU_CONTRACT["npu_apply_rotary_pos_emb"] = ("query", "key", "cos", "sin", "layout", "rotary_mode")
APPLY_ROPE_HEAD_DIMS = (64, 128)  # npu_apply_rotary_pos_emb on A2/A3: D must be 64 or 128
NPU_CONTRACT["npu_grouped_matmul"] = ("x", "weight", "group_list", "split_item", "group_type", "group_list_type")
GMM_SINGLE_TENSOR, GMM_GROUP_M, GMM_SIZES = 3, 0, 1  # split_item 3: one output; group along M; counts, not cumsum


def rms_norm_npu(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # output 0 is y; output 1 is rstd (saved by torch_npu's own backward)
    return torch.ops.npu.npu_rms_norm(x, weight.to(x.dtype), epsilon=eps)[0]


class _AddRmsNormNpu(torch.autograd.Function):
    """npu_add_rms_norm has no autograd in torch_npu: the backward is the norm's (npu_rms_norm_backward,
    which reuses the kernel's rstd output) plus the gradient arriving at the sum, for both addends."""

    @staticmethod
    def forward(ctx, x: Tensor, residual: Tensor, weight: Tensor, eps: float):
        y, rstd, s = torch.ops.npu.npu_add_rms_norm(x, residual, weight, epsilon=eps)
        ctx.save_for_backward(s, weight, rstd)
        return y, s

    @staticmethod
    def backward(ctx, grad_y: Tensor, grad_s: Tensor):
        s, weight, rstd = ctx.saved_tensors
        grad_norm, grad_w = torch.ops.npu.npu_rms_norm_backward(grad_y.contiguous(), s, weight, rstd)
        grad_sum = grad_norm + grad_s
        return grad_sum, grad_sum, grad_w, None


def add_rms_norm_npu(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return _AddRmsNormNpu.apply(x, residual.to(x.dtype), weight.to(x.dtype), eps)


def swiglu_npu(gate: Tensor, up: Tensor) -> Tensor:
    # the kernel splits one tensor into [A | B] along `dim` and returns silu(A) * B
    return torch.ops.npu.npu_swiglu(torch.cat([gate, up], dim=-1), dim=-1)


ROTARY_GRAD_LAST_DIM, ROTARY_GRAD_MAX_BROADCAST = 64, 1024
"""torchair's GE converter of npu_rotary_mul_backward on A2/A3 raises NotImplementedError unless the last dim is
a multiple of 64 and the product of the dims r1 broadcasts over (B·N for 11SD) is at most 1024
(graphllm.preflight.conditions checks the same on every backward graph)."""


def rotary_grad_converts(x_shape: tuple[int, ...], r_shape: tuple[int, ...]) -> bool:
    broadcast = 1
    for n, r in zip(x_shape, r_shape):  # a loop, not math.prod over a generator: Dynamo traces this
        broadcast *= n if n != r else 1
    return x_shape[-1] % ROTARY_GRAD_LAST_DIM == 0 and broadcast <= ROTARY_GRAD_MAX_BROADCAST


def rope_npu(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # 'half' mode is rotate_half: x * r1 + cat(-x2, x1) * r2; x is BNSD and r1/r2 are 11SD
    if x.requires_grad and not rotary_grad_converts(tuple(x.shape), tuple(cos.shape)):
        return rope_decomposed(x, cos, sin)  # its backward would be a kernel GE cannot build: ATen ops instead
    return torch.ops.npu.npu_rotary_mul(x, cos.to(x.dtype), sin.to(x.dtype), rotary_mode="half")


def attention_npu(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> Tensor:
    # BNSD; head_num is the query's head count; fewer kv heads (GQA) are native to the kernel
    if causal:
        mask = torch.ones(CAUSAL_MASK_SIZE, CAUSAL_MASK_SIZE, dtype=torch.bool, device=q.device).triu(1)
        out = torch.ops.npu.npu_fusion_attention(q, k, v, head_num=q.shape[1], input_layout="BNSD", atten_mask=mask,
                                                 scale=scale, sparse_mode=SPARSE_MODE_LEFT_UP_CAUSAL)
    else:
        out = torch.ops.npu.npu_fusion_attention(q, k, v, head_num=q.shape[1], input_layout="BNSD", scale=scale,
                                                 sparse_mode=SPARSE_MODE_NONE)
    return out[0]  # outputs: attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, numels


def window_attention_npu(q: Tensor, k: Tensor, v: Tensor, scale: float, window: int) -> Tensor:
    # sparse_mode 4 (band) masks key j for query i unless i - pre_tockens <= j <= i + next_tockens; with the
    # compressed causal mask it keeps the window's keys: i - (window - 1) <= j <= i
    mask = torch.ones(CAUSAL_MASK_SIZE, CAUSAL_MASK_SIZE, dtype=torch.bool, device=q.device).triu(1)
    out = torch.ops.npu.npu_fusion_attention(q, k, v, head_num=q.shape[1], input_layout="BNSD", atten_mask=mask,
                                             scale=scale, pre_tockens=window - 1, next_tockens=0,
                                             sparse_mode=SPARSE_MODE_BAND)
    return out[0]


def varlen_attention_npu(q: Tensor, k: Tensor, v: Tensor, segment_ids: Tensor, scale: float) -> Tensor:
    # packed rows, BNSD with an explicit [B, 1, S, S] mask (True = masked: another sample, or a later key) and
    # sparse_mode 0: static shapes, so torchair keeps one graph. The TND form with actual_seq_qlen /
    # actual_seq_kvlen (cumulative sample ends as host lists) skips the masked blocks but needs the
    # boundaries on the host per step; see docs/data.md.
    from graphllm.ops.attention import segment_causal_mask

    mask = ~segment_causal_mask(segment_ids)
    out = torch.ops.npu.npu_fusion_attention(q, k, v, head_num=q.shape[1], input_layout="BNSD", atten_mask=mask,
                                             scale=scale, sparse_mode=SPARSE_MODE_NONE)
    return out[0]


class _AttentionBlockNpu(torch.autograd.Function):
    """graphllm::attention_block on the NPU: npu_fusion_attention forward, graphllm's backward rule.

    The lse comes from the kernel's softmax statistics (fp32 [B, N, Sq, 8], each row's value repeated 8 times):
    lse = softmax_max + log(softmax_sum). npu_fusion_attention_grad rebuilds the probabilities from those
    statistics but takes no gradient for them, and ring attention differentiates through lse (the merge), so the
    backward is attention_block_grads: the same recomputing rule as the op's, in ATen ops torchair converts
    (matmul, exp, masked_fill, sum). An autograd.Function because Dynamo traces both of its halves into the
    joint graph torchair compiles, as for _AddRmsNormNpu; a lowering that let autograd differentiate the kernel
    would get torch_npu's grad kernel, which drops the lse term.

    A row that sees no key (segments only) gets out 0 and lse −inf whatever the kernel left there: torch_npu
    documents such "invalid rows" as losing precision unless inner_precise=2 (slower), and the lowering never
    reads them."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, q_segment: Tensor | None, k_segment: Tensor | None,
                scale: float, causal: bool):
        visible = block_visible(q_segment, k_segment, causal, q.shape[-2], k.shape[-2], q.device)
        if q_segment is not None:  # [B, 1, Sq, Sk] explicit mask, True = masked (another sample, or a later key)
            out, softmax_max, softmax_sum = torch.ops.npu.npu_fusion_attention(
                q, k, v, head_num=q.shape[1], input_layout="BNSD", atten_mask=~visible, scale=scale,
                sparse_mode=SPARSE_MODE_NONE)[:3]
        elif causal:
            mask = torch.ones(CAUSAL_MASK_SIZE, CAUSAL_MASK_SIZE, dtype=torch.bool, device=q.device).triu(1)
            out, softmax_max, softmax_sum = torch.ops.npu.npu_fusion_attention(
                q, k, v, head_num=q.shape[1], input_layout="BNSD", atten_mask=mask, scale=scale,
                sparse_mode=SPARSE_MODE_LEFT_UP_CAUSAL)[:3]
        else:
            out, softmax_max, softmax_sum = torch.ops.npu.npu_fusion_attention(
                q, k, v, head_num=q.shape[1], input_layout="BNSD", scale=scale, sparse_mode=SPARSE_MODE_NONE)[:3]
        lse = softmax_max[..., 0] + torch.log(softmax_sum[..., 0])  # [B, N, Sq] fp32
        if q_segment is not None:
            seen = visible.any(-1)  # [B, 1, Sq]
            lse = torch.where(seen, lse, float("-inf"))
            out = torch.where(seen[..., None], out, 0.0)
        ctx.save_for_backward(q, k, v, q_segment, k_segment, lse)
        ctx.scale, ctx.causal = scale, causal
        return out.contiguous(), lse

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_lse: Tensor):
        q, k, v, q_segment, k_segment, lse = ctx.saved_tensors
        grads = attention_block_grads(q, k, v, q_segment, k_segment, lse, grad_out, grad_lse, ctx.scale, ctx.causal)
        return (*grads, None, None, None, None)


def attention_block_npu(q: Tensor, k: Tensor, v: Tensor, q_segment: Tensor | None, k_segment: Tensor | None,
                        scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    return _AttentionBlockNpu.apply(q, k, v, q_segment, k_segment, scale, causal)


def rope_qk_npu(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Inference: one npu_apply_rotary_pos_emb for q and k. The kernel takes BSND q/k and [B, S, 1, D]
    cos/sin of their dtype and rotates in place, so it gets fresh BSND copies (graphllm's q/k are BNSD
    views of the projections). With gradients (it has no backward) or another head size: two
    npu_rotary_mul."""
    if q.requires_grad or k.requires_grad or q.shape[-1] not in APPLY_ROPE_HEAD_DIMS:
        return rope_npu(q, cos, sin), rope_npu(k, cos, sin)
    b, _, s, d = q.shape
    q_bsnd, k_bsnd = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
    cos_bs1d = cos.to(q.dtype).reshape(-1, s, 1, d).expand(b, s, 1, d).contiguous()  # [1|B, 1, S, D] -> [B, S, 1, D]
    sin_bs1d = sin.to(q.dtype).reshape(-1, s, 1, d).expand(b, s, 1, d).contiguous()
    q_out, k_out = torch.ops.npu.npu_apply_rotary_pos_emb(q_bsnd, k_bsnd, cos_bs1d, sin_bs1d, layout="BSND",
                                                          rotary_mode="half")
    return q_out.transpose(1, 2), k_out.transpose(1, 2)


def _gmm(x: Tensor, weight: Tensor, counts: Tensor) -> Tensor:
    return torch.ops.npu.npu_grouped_matmul([x], [weight], group_list=counts, split_item=GMM_SINGLE_TENSOR,
                                            group_type=GMM_GROUP_M, group_list_type=GMM_SIZES)[0]


def _kernel_counts(group_sizes: Tensor, rows: int) -> Tensor:
    """npu_grouped_matmul's counts must sum to x's rows (documented for group_type 0; what it does with rows past a
    shorter list is not): the tail past sum(group_sizes) joins the last group, and the lowering zeroes it after."""
    tail = rows - group_sizes.sum(0, keepdim=True)  # [1]
    return torch.cat([group_sizes[:-1], group_sizes[-1:] + tail])


def _group_masks(group_sizes: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """(row in a group [T] bool, row t in group g [T, G] bool): compares of arange against the cumsum of the sizes,
    ops GE converts (repeat_interleave's converter is a stub). Tail rows are in no group."""
    ends = torch.cumsum(group_sizes, 0)
    row = torch.arange(rows, device=group_sizes.device).unsqueeze(1)  # [T, 1]
    onehot = (row >= ends - group_sizes) & (row < ends)  # [T, G]
    return row.squeeze(1) < ends[-1], onehot


class _GroupedMatmulNpu(torch.autograd.Function):
    """npu_grouped_matmul has no autograd. Rows past sum(group_sizes) (the MoE tail: other ranks' or dropped pairs)
    come out zero and get no gradient, as graphllm's op: the kernel computes them with the last group's weight
    (_kernel_counts) and a where zeroes them. dx is the same kernel on the masked dy and wᵀ; the weight gradient is
    grouped along the contraction (rows), which the kernel cannot group on A2 (group_type -1/0 only), so it is a
    one-hot-masked contraction in ATen ops GE converts: G× the FLOPs of a grouped kernel."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, group_sizes: Tensor):
        ctx.save_for_backward(x, weight, group_sizes)
        in_groups, _ = _group_masks(group_sizes, x.shape[0])
        out = _gmm(x, weight, _kernel_counts(group_sizes, x.shape[0]))
        return torch.where(in_groups.unsqueeze(1), out, torch.zeros_like(out))

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, group_sizes = ctx.saved_tensors
        in_groups, onehot = _group_masks(group_sizes, x.shape[0])
        grad = torch.where(in_groups.unsqueeze(1), grad, torch.zeros_like(grad)).contiguous()
        dx = _gmm(grad, weight.transpose(1, 2).contiguous(), _kernel_counts(group_sizes, x.shape[0]))
        dw = torch.einsum("tgk,tn->gkn", onehot.to(x.dtype).unsqueeze(-1) * x.unsqueeze(1), grad)
        return dx, dw.to(weight.dtype), None


def grouped_matmul_npu(x: Tensor, weight: Tensor, group_sizes: Tensor,
                       transpose_weight: bool = False) -> Tensor:
    """A [G, N, K] weight (transpose_weight) goes to the kernel as its [G, K, N] transpose, copied: whether
    npu_grouped_matmul reads a transposed-stride weight in place is not documented for torch_npu 2.13."""
    if transpose_weight:
        weight = weight.transpose(1, 2).contiguous()
    return _GroupedMatmulNpu.apply(x, weight, group_sizes)


# graphllm::nf4_dequantize has no entry either: torch_npu 2.13's npu_weight_quant_batchmatmul dequantises affinely
# ((w + antiquant_offset)·antiquant_scale; int8/int4/FP4 weights; groups of 32k along K) and has no backward; NF4's
# 16 levels are not equally spaced (gaps 0.080–0.304) and each FP4 type has 15 distinct values, so it runs as its
# decomposition (ops/nf4.py NPU_WEIGHT_QUANT_MATMUL; its ATen ops' GE converters are checked in
# tests/test_npu_contract.py).
# graphllm::lora_linear has no entry here on purpose: torch_npu 2.13 has no LoRA kernel (its fused matmuls are
# the quantised-weight ones, npu_weight_quant_batchmatmul / npu_quant_matmul, and the MC2 matmul+collective
# ones), so lowering_table("npu") keeps the decomposition from the decompose table: three aten.linear calls and
# an add, which torchair converts to the Cube unit's MatMulV2 (the rank-r pair is tiny next to the base GEMM).
# MindSpeed's CCLoRA fuses LoRA's *communication* with its matmuls under TP; in graphllm that overlap belongs
# to the mc2/coc passes (which match plain linears today, not lora_linear), not to a device kernel.
# graphllm::linear_cross_entropy (and its vocabulary-parallel linear_cross_entropy_parts) has no entry either: it runs
# as its decomposition, whose ATen ops torchair converts (mm, max.dim — not amax, whose GE converter is a stub —, exp,
# log, sum, gather, scatter_add, where, cat; tests/test_fused_loss.py checks them against the wheel's converter index).
# torch_npu 2.13 does have MindSpeed's fused vocab-parallel pair: npu_fused_linear_online_max_sum(input, weight,
# target, vocab_start_index, vocab_end_index, return_logits=False) -> (logits_max, sum_exp_logits, predicted_logits,
# target_mask, masked_target, logits) and npu_fused_linear_cross_entropy_loss_with_max_sum_backward(grad, input,
# weight, target_mask, masked_target, logits_max=, sum_exp_logits=) -> (input_grad, weight_grad), in a memory-saving
# mode that recomputes the logits — the parts op's forward and the op's backward. Not wired: fp16/bf16 only (fp32
# plans would need the decomposition anyway), the backward takes one per-token gradient (no lse gradient), its
# sum_exp_logits input is "processed" without saying how, and target_mask is a bit mask; with no Ascend device to
# check those semantics against the decomposition, a wrong guess would train silently wrong.


def npu_lowerings() -> dict:
    ops = torch.ops.graphllm
    return {
        ops.rms_norm.default: rms_norm_npu,
        ops.add_rms_norm.default: add_rms_norm_npu,
        ops.swiglu.default: swiglu_npu,
        ops.rope.default: rope_npu,
        ops.rope_qk.default: rope_qk_npu,
        ops.attention.default: attention_npu,
        ops.varlen_attention.default: varlen_attention_npu,
        ops.window_attention.default: window_attention_npu,
        ops.attention_block.default: attention_block_npu,
        ops.grouped_matmul.default: grouped_matmul_npu,
        **npu_mc2_lowerings(),
        # moe_permute / moe_unpermute: not here, so they run as their ATen decompositions; their torch_npu kernels
        # have no GE converter in torchair 2.13 (ops/lowering_npu_moe.py npu_moe_lowerings, ready for when they do)
    }
