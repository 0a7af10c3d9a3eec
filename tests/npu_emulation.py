"""Test-only CPU emulation of the torch_npu kernels graphllm lowers to.

Each op is defined in a `npu` torch.library namespace with the exact schema from the torch_npu 2.13.0
wheel (tests/npu_wheel.py reads it from the wheel's schema file), and implemented on CPU in plain torch
ops following the kernel's documented semantics (torch_npu/_op_plugin_docs.py): argument names, output
order, layouts and mask conventions are what the real kernels take. Kernels are CompositeImplicitAutograd,
so autograd differentiates them like the real kernels' registered backward would. Checks raise on inputs
the real kernel documents as unsupported (that is how a wrong lowering shows up here).
Importing this module registers the ops; never import it where torch_npu is loaded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from npu_wheel import npu_schemas

EMULATED = ("npu_rms_norm", "npu_rms_norm_backward", "npu_add_rms_norm", "npu_swiglu", "npu_rotary_mul",
            "npu_fusion_attention", "npu_mm_all_reduce_base", "npu_all_gather_base_mm", "npu_mm_reduce_scatter_base", "npu_grouped_matmul", "npu_apply_rotary_pos_emb")
CAUSAL_MASK_SIZE = 2048  # sparse_mode 2/3 take the compressed 2048×2048 lower-triangular-kept mask


def _traced(t: torch.Tensor) -> bool:
    """True while a compiler traces with fake tensors: values are unknown, only metadata can be checked
    (the per-op tests run the same lowerings eagerly, where values are checked too)."""
    return type(t) not in (torch.Tensor, torch.nn.Parameter)  # fake / functional / proxy tensors


def npu_rms_norm(self, gamma, epsilon=1e-06):
    if gamma.dtype != self.dtype:
        raise TypeError(f"npu_rms_norm: gamma dtype {gamma.dtype} must equal self dtype {self.dtype}")
    x32 = self.to(torch.float32)
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + epsilon)
    return (x32 * rstd * gamma.to(torch.float32)).to(self.dtype), rstd


def npu_rms_norm_backward(dy, self, gamma, rstd):
    x32, g32 = self.to(torch.float32), gamma.to(torch.float32)
    if rstd.shape != x32.shape[:-1] + (1,):
        raise ValueError(f"npu_rms_norm_backward: rstd {tuple(rstd.shape)} is not npu_rms_norm's for {tuple(self.shape)}")
    xhat = x32 * rstd
    g = dy.to(torch.float32) * g32
    dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    dgamma = (dy.to(torch.float32) * xhat).sum_to_size(gamma.shape)
    return dx.to(self.dtype), dgamma.to(gamma.dtype)


def npu_add_rms_norm(x1, x2, gamma, epsilon=1e-06):
    if not (x1.shape == x2.shape and x1.dtype == x2.dtype == gamma.dtype):
        raise ValueError("npu_add_rms_norm: x1, x2 must have one shape, and x1, x2, gamma one dtype")
    x = x1 + x2
    y, rstd = npu_rms_norm(x, gamma, epsilon)
    return y, rstd, x


def npu_swiglu(self, dim=-1):
    a, b = self.chunk(2, dim=dim)
    return F.silu(a) * b


def npu_rotary_mul(self, r1, r2, rotary_mode="half", rotate=None):
    if self.dim() != 4:
        raise ValueError(f"npu_rotary_mul: input must be 4-D (BNSD, BSND or SBND), got {tuple(self.shape)}")
    if rotary_mode != "half" or rotate is not None:
        raise NotImplementedError("emulated: rotary_mode='half' without rotate")
    for r in (r1, r2):
        if r.dim() != 4 or r.dtype != self.dtype or torch.broadcast_shapes(r.shape, self.shape) != self.shape:
            raise ValueError(f"npu_rotary_mul: r1/r2 must be 4-D, of the input's dtype, broadcasting to it; "
                             f"got {tuple(r.shape)} {r.dtype} for {tuple(self.shape)} {self.dtype}")
    x1, x2 = self.chunk(2, dim=-1)
    return r1 * self + r2 * torch.cat((-x2, x1), dim=-1)


def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None, atten_mask=None,
                         scale=1.0, keep_prob=1.0, pre_tockens=2147483647, next_tockens=2147483647,
                         inner_precise=0, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                         gen_mask_parallel=True, sync=False, softmax_layout="", sink=None, dropout_mask=None, seed=0,
                         offset=0):
    if input_layout == "BNSD":
        q, k, v = query, key, value
    elif input_layout == "BSND":
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    else:
        raise NotImplementedError(f"emulated layouts: BNSD, BSND; got {input_layout}")
    if q.shape[1] != head_num:
        raise ValueError(f"npu_fusion_attention: head_num {head_num} != query heads {q.shape[1]} ({input_layout})")
    n1, n2 = q.shape[1], k.shape[1]
    if n1 % n2 or k.shape != v.shape:
        raise ValueError(f"npu_fusion_attention: key/value heads {n2} must divide query heads {n1}")
    if keep_prob != 1.0 or pse is not None or actual_seq_qlen is not None:
        raise NotImplementedError("emulated: no dropout, pse or varlen")
    k, v = k.repeat_interleave(n1 // n2, dim=1), v.repeat_interleave(n1 // n2, dim=1)
    scores = torch.matmul(q.to(torch.float32), k.to(torch.float32).transpose(-2, -1)) * scale  # [B,N,Sq,Sk]
    sq, sk = scores.shape[-2:]
    masked = None
    if sparse_mode == 0:
        if atten_mask is not None:
            masked = atten_mask.to(torch.bool)
    elif sparse_mode in (2, 3):
        want = torch.ones(CAUSAL_MASK_SIZE, CAUSAL_MASK_SIZE, dtype=torch.bool, device=q.device).triu(1)
        if atten_mask is None or atten_mask.dtype != torch.bool or atten_mask.shape != want.shape or \
                (not _traced(atten_mask) and not torch.equal(atten_mask, want)):
            raise ValueError("npu_fusion_attention: sparse_mode 2/3 take the compressed 2048×2048 bool mask "
                             "with True above the diagonal")
        shift = 1 if sparse_mode == 2 else sk - sq + 1  # left-up vs right-down aligned causal
        masked = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(shift)
    else:
        raise NotImplementedError(f"emulated sparse_mode 0, 2, 3; got {sparse_mode}")
    if masked is not None:
        scores = scores.masked_fill(masked, float("-inf"))
    softmax_max = scores.amax(-1, keepdim=True)
    probs = torch.exp(scores - softmax_max)
    softmax_sum = probs.sum(-1, keepdim=True)
    out = torch.matmul(probs / softmax_sum, v.to(torch.float32)).to(query.dtype)
    if input_layout == "BSND":
        out = out.transpose(1, 2)
    return out, softmax_max, softmax_sum, query.new_empty(0), seed, offset, 0


# -- MC2: `hcom` is a c10d group name here (the tests map graphllm's hcom_name to it); the real kernels
# take the HCCL communicator's name. Checks follow the kernels' documented constraints.
_c10d = torch.ops._c10d_functional
MC2_WORLD_SIZES, MC2_DTYPES, MC2_K = (2, 4, 8), (torch.float16, torch.bfloat16), (256, 65535)


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
    if not _traced(group_list) and (bool((sizes < 0).any()) or int(ends[-1]) > x[0].shape[0]):
        raise ValueError("npu_grouped_matmul: group sizes must be non-negative and fit in x's rows")
    rows = torch.repeat_interleave(torch.arange(weight[0].shape[0]), sizes, output_size=x[0].shape[0])
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


_lib = torch.library.Library("npu", "DEF")  # kept alive for the process
_schemas = npu_schemas()
for _name in EMULATED:
    _lib.define(_schemas[_name])
    _lib.impl(_name, globals()[_name], "CompositeImplicitAutograd")
