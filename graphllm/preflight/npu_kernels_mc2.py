"""CPU emulation of the torch_npu kernels torch_npu gives no autograd: MC2 (matmul fused with a collective),
npu_grouped_matmul and npu_apply_rotary_pos_emb. graphllm's lowering wraps each in its own
torch.autograd.Function (ops/lowering_npu.py, ops/lowering_npu_mc2.py), so they run with grad mode off.

MC2: `hcom` is a c10d group name here (callers map graphllm's hcom_name to it); the real kernels take the
HCCL communicator's name. Checks follow the kernels' documented constraints (torch_npu/_op_plugin_docs.py).
Registered by graphllm.preflight.npu_kernels.register_npu_kernels.
"""

from __future__ import annotations

import torch

_c10d = torch.ops._c10d_functional
MC2_WORLD_SIZES, MC2_DTYPES, MC2_K = (2, 4, 8), (torch.float16, torch.bfloat16), (256, 65535)


def traced(t: torch.Tensor) -> bool:
    """True while a compiler traces with fake tensors (or on meta tensors): values are unknown, only
    metadata can be checked (the per-op tests run the same kernels eagerly, where values are checked too)."""
    return type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type == "meta"


def _mc2_check(name, x1, x2, world_size=None):
    if x2.dim() != 2 or x1.shape[-1] != x2.shape[0] or x1.dtype != x2.dtype or x1.dtype not in MC2_DTYPES:
        raise ValueError(f"{name}: x2 must be 2-D [k, n] with k = x1's last dim, one fp16/bf16 dtype; "
                         f"got {tuple(x1.shape)} {x1.dtype}, {tuple(x2.shape)} {x2.dtype}")
    if world_size is not None:
        if x1.dim() != 2 or world_size not in MC2_WORLD_SIZES or not MC2_K[0] <= x1.shape[1] < MC2_K[1]:
            raise ValueError(f"{name}: input must be 2-D with k in [256, 65535), world_size 2/4/8; "
                             f"got {tuple(x1.shape)}, world_size {world_size}")


def npu_mm_all_reduce_base(x1, x2, hcom, reduce_op="sum", bias=None, antiquant_scale=None, antiquant_offset=None,
                           x3=None, dequant_scale=None, pertoken_scale=None, comm_quant_scale_1=None,
                           comm_quant_scale_2=None, antiquant_group_size=0, comm_turn=0, group_sizes=None,
                           y_dtype=None, x1_dtype=None, x2_dtype=None, dequant_scale_dtype=None,
                           pertoken_scale_dtype=None, comm_quant_mode=0, comm_mode=None):
    _mc2_check("npu_mm_all_reduce_base", x1, x2)
    out = _c10d.wait_tensor(_c10d.all_reduce(torch.matmul(x1, x2).contiguous(), reduce_op, hcom))
    return out if bias is None else out + bias


def npu_all_gather_base_mm(self, x2, hcom, world_size, bias=None, x1_scale=None, x2_scale=None, gather_index=0,
                           gather_output=True, comm_turn=0, output_dtype=None, comm_mode=None):
    _mc2_check("npu_all_gather_base_mm", self, x2, world_size)
    if bias is not None or gather_index != 0:
        raise ValueError("npu_all_gather_base_mm: bias must be None and gather_index 0 in this version")
    gathered = _c10d.wait_tensor(_c10d.all_gather_into_tensor(self.contiguous(), world_size, hcom))
    return torch.matmul(gathered, x2), (gathered if gather_output else self.new_empty(0))


def npu_mm_reduce_scatter_base(self, x2, hcom, world_size, reduce_op="sum", bias=None, x1_scale=None, x2_scale=None,
                               comm_turn=0, output_dtype=None, comm_mode=None):
    _mc2_check("npu_mm_reduce_scatter_base", self, x2, world_size)
    if bias is not None or self.shape[0] % world_size:
        raise ValueError("npu_mm_reduce_scatter_base: bias must be None and m divisible by world_size")
    return _c10d.wait_tensor(_c10d.reduce_scatter_tensor(torch.matmul(self, x2).contiguous(), reduce_op, world_size,
                                                         hcom))


def npu_grouped_matmul(x, weight, bias=None, scale=None, offset=None, antiquant_scale=None, antiquant_offset=None,
                       per_token_scale=None, group_list=None, activation_input=None, activation_quant_scale=None,
                       activation_quant_offset=None, split_item=0, group_type=None, group_list_type=0, act_type=0,
                       tuning_config=None, output_dtype=None, x_dtype=None, weight_dtype=None, scale_dtype=None,
                       per_token_scale_dtype=None):
    """Emulated for what graphllm uses: one x [M, K], one weight [G, K, N], grouped along M (group_type 0),
    group_list a tensor of counts (type 1) or of cumulative ends (type 0), one output (split_item 2/3)."""
    if len(x) != 1 or len(weight) != 1 or weight[0].dim() != 3 or group_type != 0 or split_item not in (2, 3):
        raise NotImplementedError("emulated: single x [M,K], single weight [G,K,N], group_type 0, split_item 2/3")
    if group_list is None or group_list.dim() != 1 or group_list.shape[0] != weight[0].shape[0]:
        raise ValueError("npu_grouped_matmul: group_list must be a 1-D tensor with one entry per weight group")
    sizes = group_list if group_list_type == 1 else torch.diff(group_list, prepend=group_list.new_zeros(1))
    ends = sizes.cumsum(0)
    # group_type 0: "the sum of the counts (type 1) / the last cumsum (type 0) equals x's first dim"; what the kernel
    # does with rows past a shorter list is undocumented, so that is refused here
    if not traced(group_list) and (bool((sizes < 0).any()) or int(ends[-1]) != x[0].shape[0]):
        raise ValueError("npu_grouped_matmul: group sizes must be non-negative and sum to x's rows")
    rows = torch.repeat_interleave(torch.arange(weight[0].shape[0], device=x[0].device), sizes,
                                   output_size=x[0].shape[0])
    out = torch.bmm(x[0].unsqueeze(1), weight[0][rows]).squeeze(1)  # row t uses its group's weight
    return [out]


def npu_apply_rotary_pos_emb(query, key, cos, sin, layout="BSND", rotary_mode="half"):
    """BSND q [B,S,N,D], k [B,S,Nk,D]; cos/sin [B,S,1,D] of the same dtype; D 64 or 128 (A2/A3)."""
    if layout != "BSND" or rotary_mode != "half":
        raise NotImplementedError("emulated: layout BSND, rotary_mode half")
    b, s, _, d = query.shape
    if (key.shape[:2] != (b, s) or key.shape[-1] != d or d not in (64, 128)
            or any(t.shape != (b, s, 1, d) for t in (cos, sin))
            or len({t.dtype for t in (query, key, cos, sin)}) != 1):
        raise ValueError(f"npu_apply_rotary_pos_emb: BSND q/k with D 64|128 and cos/sin [B,S,1,D] of one dtype; got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(cos.shape)}")

    def rot(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin
    return rot(query), rot(key)


NO_AUTOGRAD_KERNELS = {f.__name__: f for f in (npu_mm_all_reduce_base, npu_all_gather_base_mm,
                                               npu_mm_reduce_scatter_base, npu_grouped_matmul,
                                               npu_apply_rotary_pos_emb)}
"""Kernel name -> CPU emulation, for the kernels torch_npu registers no autograd for."""
