"""graphllm's own ops (torch.library): schema, fake function, autograd rule, reference kernel.

Importing this package registers them under the `torch.ops.graphllm` namespace.
"""

from graphllm.ops.add_rms_norm import add_rms_norm
from graphllm.ops.attention import attention, varlen_attention, window_attention
from graphllm.ops.attention_block import attention_block
from graphllm.ops.collectives import (sp_gather, sp_reduce_scatter, tp_copy, tp_gather, tp_reduce, tp_reduce_max,
                                      tp_split)
from graphllm.ops.cp_collectives import cp_all_to_all, cp_ring_shift
from graphllm.ops.grouped_matmul import grouped_matmul, grouped_matmul_weight_grad
from graphllm.ops.linear_cross_entropy import (linear_cross_entropy, linear_cross_entropy_backward,
                                               linear_cross_entropy_parts)
from graphllm.ops.lora import lora_linear
from graphllm.ops.moe_dispatch import moe_permute, moe_unpermute, router_stat
from graphllm.ops.mc2 import all_gather_matmul, matmul_all_reduce, matmul_reduce_scatter
from graphllm.ops.offload import offload_to_host, prefetch_to_device
from graphllm.ops.rms_norm import rms_norm
from graphllm.ops.rope import rope
from graphllm.ops.sequence_parts import ahead, token_mean
from graphllm.ops.swiglu import swiglu

__all__ = ["add_rms_norm", "ahead", "all_gather_matmul", "attention", "attention_block", "cp_all_to_all", "cp_ring_shift", "grouped_matmul", "grouped_matmul_weight_grad", "linear_cross_entropy",
           "linear_cross_entropy_backward", "linear_cross_entropy_parts", "lora_linear", "matmul_all_reduce", "matmul_reduce_scatter", "moe_permute", "moe_unpermute", "offload_to_host", "prefetch_to_device", "rms_norm", "rope", "router_stat", "sp_gather", "sp_reduce_scatter", "swiglu", "token_mean", "tp_copy",
           "tp_gather", "tp_reduce", "tp_reduce_max", "tp_split", "varlen_attention",
           "window_attention"]
