"""Per-backend lowering tables: what each graphllm op becomes on each backend.

A lowering is a plain-PyTorch function with the op's signature. The backend's `lower_ops` step
replaces each op call in the model graph by a call of that function, which the backend then traces
(Dynamo inlines it, so inductor sees ATen ops it can fuse and autograd derives the backward). An op
absent from a backend's table stays an opaque op with its own kernel and autograd rule.

The `npu` table calls the torch_npu kernels (ops/lowering_npu.py); NPU_KERNELS documents the mapping. An op
with no entry there (lora_linear, linear_cross_entropy: see ops/lowering_npu.py), or whose entry says it is not wired
(moe_permute / moe_unpermute: ops/lowering_npu_moe.py), runs as its decomposition on the NPU.
"""

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from graphllm.ops.add_rms_norm import add_rms_norm_decomposed
from graphllm.ops.attention import attention_decomposed, varlen_attention_decomposed, window_attention_decomposed
from graphllm.ops.attention_block import attention_block_decomposed
from graphllm.ops.linear_cross_entropy import linear_cross_entropy_decomposed, linear_cross_entropy_parts_decomposed
from graphllm.ops.lora import lora_linear_decomposed
from graphllm.ops.lowering_npu import npu_lowerings
from graphllm.ops.mc2 import (all_gather_matmul_decomposed, matmul_all_reduce_decomposed,
                              matmul_reduce_scatter_decomposed)
from graphllm.ops.moe_dispatch import moe_permute_decomposed, moe_unpermute_decomposed, router_stat_decomposed
from graphllm.ops.sequence_parts import ahead_decomposed, token_mean_decomposed
from graphllm.ops.nf4 import nf4_dequantize_recomputed
from graphllm.ops.rms_norm import rms_norm_decomposed
from graphllm.ops.rope import rope_decomposed, rope_qk_decomposed
from graphllm.ops.swiglu import swiglu_decomposed

ops = torch.ops.graphllm


@dataclass(frozen=True, slots=True)
class NpuKernel:
    """A torch_npu kernel an op lowers to, with the argument mapping the torchair backend applies."""

    kernel: str
    note: str


LOWERINGS: dict[str, dict[torch._ops.OpOverload, Callable]] = {
    # eager: keep every op, run its reference kernel and autograd rule (the debugging backend)
    "eager": {},
    # decompose: the op's reference math in plain PyTorch; inductor fuses it, and torchair converts its
    # ATen ops until the npu table below is wired to the fused kernels (the torchair issue)
    "decompose": {
        ops.rms_norm.default: rms_norm_decomposed,
        ops.add_rms_norm.default: add_rms_norm_decomposed,
        ops.swiglu.default: swiglu_decomposed,
        ops.rope.default: rope_decomposed,
        ops.rope_qk.default: rope_qk_decomposed,
        ops.attention.default: attention_decomposed,
        ops.varlen_attention.default: varlen_attention_decomposed,  # SDPA, block-diagonal causal mask
        ops.window_attention.default: window_attention_decomposed,  # SDPA, causal band mask
        # explicit masked softmax with its lse (SDPA does not return it); autograd through it is NaN-free for
        # rows that see no key of the block
        ops.attention_block.default: attention_block_decomposed,
        # NF4 → gathers + multiply-add in a checkpoint region: recomputed in the backward, never saved
        ops.nf4_dequantize.default: nf4_dequantize_recomputed,
        # three GEMMs and an add; autograd through them asks no gradient of the frozen base (requires_grad
        # False), and inductor folds the scale and the add into the GEMM epilogues
        ops.lora_linear.default: lora_linear_decomposed,
        # the fused LM-head loss: an autograd.Function around the unrolled vocabulary-chunk loop, so the joint graph
        # saves hidden, W, labels and [N] fp32 statistics, never a chunk's logits (its backward recomputes them)
        ops.linear_cross_entropy.default: linear_cross_entropy_decomposed,
        ops.linear_cross_entropy_parts.default: linear_cross_entropy_parts_decomposed,
        # MC2 → CoC: chunks along the sequence, each with its own graphllm collective (lower_collectives
        # then makes those asynchronous), which is the overlap MC2's fused kernels do on the NPU
        ops.matmul_all_reduce.default: matmul_all_reduce_decomposed,
        ops.all_gather_matmul.default: all_gather_matmul_decomposed,
        ops.matmul_reduce_scatter.default: matmul_reduce_scatter_decomposed,
        # the token permutation of a mixture of experts: argsort, index_select, index_add (autograd derives the
        # backward); the grouped matmul between them stays graphllm's op, an extern kernel for inductor
        ops.moe_permute.default: moe_permute_decomposed,
        ops.moe_unpermute.default: moe_unpermute_decomposed,
        # a marker for sequence parallelism (which replaces it with a gather): nothing left to compute
        ops.router_stat.default: router_stat_decomposed,
        # context parallelism's marks (ops/sequence_parts.py): a shift of integer ids, and nothing
        ops.ahead.default: ahead_decomposed,
        ops.token_mean.default: token_mean_decomposed,
    },
}


NPU_KERNELS: dict[torch._ops.OpOverload, NpuKernel] = {
    ops.add_rms_norm.default: NpuKernel("npu_add_rms_norm", "npu_add_rms_norm(x, residual, weight, epsilon=eps) "
                                        "-> (y, rstd, x + residual); graphllm's backward via npu_rms_norm_backward"),
    ops.rms_norm.default: NpuKernel("npu_rms_norm", "npu_rms_norm(x, weight, epsilon=eps)[0]; output 1 is rstd"),
    ops.swiglu.default: NpuKernel("npu_swiglu", "npu_swiglu(torch.cat([gate, up], -1), dim=-1)"),
    ops.rope.default: NpuKernel("npu_rotary_mul", "npu_rotary_mul(x, cos, sin, rotary_mode='half')"),
    ops.rope_qk.default: NpuKernel(
        "npu_apply_rotary_pos_emb", "inference: npu_apply_rotary_pos_emb(q, k, cos, sin, layout='BSND', "
        "rotary_mode='half') on BSND views; with gradients or outside its limits two npu_rotary_mul"),
    ops.attention.default: NpuKernel(
        "npu_fusion_attention",
        "npu_fusion_attention(q, k, v, head_num=H, input_layout='BNSD', scale=scale, "
        "atten_mask=upper-triangular bool, sparse_mode=2 when causal)[0]",
    ),
    ops.varlen_attention.default: NpuKernel(
        "npu_fusion_attention",
        "npu_fusion_attention(q, k, v, head_num=H, input_layout='BNSD', scale=scale, atten_mask=~(same sample & "
        "causal) [B,1,S,S], sparse_mode=0)[0]",
    ),
    ops.window_attention.default: NpuKernel(
        "npu_fusion_attention",
        "npu_fusion_attention(q, k, v, head_num=H, input_layout='BNSD', scale=scale, atten_mask=upper-triangular "
        "2048×2048 bool, sparse_mode=4 (band), pre_tockens=window-1, next_tockens=0)[0]",
    ),
    ops.attention_block.default: NpuKernel(
        "npu_fusion_attention",
        "npu_fusion_attention(q, k, v, head_num=H, input_layout='BNSD', scale=scale, atten_mask=~visible "
        "[B,1,Sq,Sk] and sparse_mode=0 with segments, the compressed causal mask and sparse_mode=2 without) -> "
        "(out, softmax_max, softmax_sum, ...); lse = softmax_max[..., 0] + log(softmax_sum[..., 0]); rows that "
        "see no key set to out 0, lse -inf; backward: graphllm's recomputing rule in ATen ops (the grad kernel "
        "takes no lse gradient)",
    ),
    ops.grouped_matmul.default: NpuKernel(
        "npu_grouped_matmul", "npu_grouped_matmul([x], [weight as [G, K, N]], group_list=sizes with the tail "
        "added to the last group, split_item=3, group_type=0, group_list_type=1)[0], tail rows zeroed; "
        "graphllm's backward (the kernel for dx, a masked contraction for dweight)"),
    ops.moe_permute.default: NpuKernel(
        "npu_moe_token_permute", "not wired (torchair 2.13 has no GE converter; runs as its decomposition): "
        "npu_moe_token_permute(x, key) with key = local expert id, num_experts for the tail -> (x_sorted, "
        "sorted_indices = order⁻¹ int32); group_sizes by scatter_add; graphllm's backward (index_select, sum)"),
    ops.moe_unpermute.default: NpuKernel(
        "npu_moe_token_unpermute", "not wired (as moe_permute): npu_moe_token_unpermute(y, order⁻¹ int32, "
        "probs=weights); graphllm's backward (index_select, multiply, sum)"),
    ops.matmul_all_reduce.default: NpuKernel("npu_mm_all_reduce_base", "npu_mm_all_reduce_base(x, w.t(), hcom, "
                                             "reduce_op='sum') + bias; graphllm's backward (a matmul)"),
    ops.all_gather_matmul.default: NpuKernel(
        "npu_all_gather_base_mm", "npu_all_gather_base_mm(x[S·B,K], w.t(), hcom, tp, gather_output=True) -> (y, "
        "gathered); backward npu_mm_reduce_scatter_base"),
    ops.matmul_reduce_scatter.default: NpuKernel(
        "npu_mm_reduce_scatter_base", "npu_mm_reduce_scatter_base(x[S·B,K], w.t(), hcom, tp) + bias; backward "
        "npu_all_gather_base_mm"),
}


def lowering_table(key: str) -> dict[torch._ops.OpOverload, Callable]:
    """The table a backend's `lowering` key names. For `npu`, each op whose torch_npu kernel the
    installed torch_npu lacks falls back to its decomposition, with a warning naming the kernel."""
    if key != "npu":
        return LOWERINGS[key]
    table = dict(LOWERINGS["decompose"])
    for op, fn in npu_lowerings().items():
        kernel = NPU_KERNELS[op].kernel
        if hasattr(torch.ops.npu, kernel):
            table[op] = fn
        else:
            warnings.warn(f"torch_npu has no {kernel}: {op} runs as its decomposition on the NPU", stacklevel=2)
    return table
