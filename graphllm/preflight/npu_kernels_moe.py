"""CPU emulation of torch_npu's MoE token permutation kernels, npu_moe_token_permute / npu_moe_token_unpermute,
as torch_npu 2.13's docs describe them (torch_npu/_op_plugin_docs.py, the later of the two docstrings each has: it
is the one the wheel installs, and the earlier one's unpermute example contradicts its own permute example).

    npu_moe_token_permute(tokens [T, H], indices [T, k] | [T], num_out_tokens=None, padded_mode=False)
        -> permuted_tokens [n, H] (tokens' dtype), sorted_indices [T·k] int32
    npu_moe_token_unpermute(permuted_tokens [T·k, H], sorted_indices [T·k] int32, probs [T, k] = None,
                            padded_mode=False, restore_shape=None) -> [T, H] (permuted_tokens' dtype)

Pair i = t·k + j is token t's j-th index. The permute sorts the pairs by index value, stably (the docs' example
keeps token order inside an index); `sorted_indices[i]` is the row pair i went to, so
`permuted_tokens[sorted_indices[i]] = tokens[i // k]` (the docs' words). n = T·k, or the first num_out_tokens rows
(a negative value counts from the end). The unpermute reads row sorted_indices[t·k + j] for each pair of token t,
weights it by probs[t, j] and sums over j (in float32 here; the kernel's accumulation precision is not documented).

Checks are the documented constraints: 2-D tokens of float16/bfloat16/float32, indices 1-D/2-D int32/int64 with
fewer than 16777215 elements of values in [0, 16777215), k ≤ 512, padded_mode False (the only mode supported),
restore_shape None; sorted_indices int32, a permutation of 0..T·k−1 ("no repeated index").

Autograd: torch_npu registers an autograd kernel for npu_moe_token_unpermute (AutogradPrivateUse1 in the wheel's
yaml; backward npu_moe_token_unpermute_grad) and none for npu_moe_token_permute. graphllm's lowering wraps both in
its own autograd.Function (ops/lowering_npu_moe.py), so neither emulation registers one.
"""

from __future__ import annotations

import torch

from graphllm.preflight.npu_kernels_mc2 import traced

MOE_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MOE_INDEX_DTYPES = (torch.int32, torch.int64)
MOE_INDEX_LIMIT = 16777215  # indices: element count and values below it (float-exact integer range of the sort)
MOE_MAX_TOPK = 512


def _check_tokens(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2 or t.dtype not in MOE_FLOAT_DTYPES:
        raise ValueError(f"{name}: tokens must be 2-D float16/bfloat16/float32, got {tuple(t.shape)} {t.dtype}")


def npu_moe_token_permute(tokens, indices, num_out_tokens=None, padded_mode=False):
    name = "npu_moe_token_permute"
    _check_tokens(name, tokens)
    if padded_mode:
        raise ValueError(f"{name}: padded_mode must be False (the only mode supported)")
    if indices.dim() not in (1, 2) or indices.dtype not in MOE_INDEX_DTYPES or indices.shape[0] != tokens.shape[0]:
        raise ValueError(f"{name}: indices must be [T] or [T, k] int32/int64 with T = tokens' rows, got "
                         f"{tuple(indices.shape)} {indices.dtype} for {tuple(tokens.shape)}")
    topk = 1 if indices.dim() == 1 else indices.shape[1]
    n = indices.numel()
    if topk > MOE_MAX_TOPK or n >= MOE_INDEX_LIMIT:
        raise ValueError(f"{name}: topK {topk} must be <= {MOE_MAX_TOPK} and indices hold < {MOE_INDEX_LIMIT} elements")
    flat = indices.reshape(-1)
    if not traced(indices) and n and (int(flat.min()) < 0 or int(flat.max()) >= MOE_INDEX_LIMIT):
        raise ValueError(f"{name}: index values must lie in [0, {MOE_INDEX_LIMIT})")
    pair_of_row = torch.sort(flat, stable=True).indices  # row r holds pair pair_of_row[r]
    positions = torch.arange(n, device=flat.device)
    sorted_indices = positions.scatter(0, pair_of_row, positions)  # pair i -> its row
    rows = n if not num_out_tokens else (min(num_out_tokens, n) if num_out_tokens > 0 else n + num_out_tokens)
    permuted = tokens.index_select(0, torch.div(pair_of_row[:rows], topk, rounding_mode="floor"))
    return permuted, sorted_indices.to(torch.int32)


def npu_moe_token_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None):
    name = "npu_moe_token_unpermute"
    _check_tokens(name, permuted_tokens)
    if padded_mode or restore_shape is not None:
        raise ValueError(f"{name}: padded_mode must be False and restore_shape None (the only mode supported)")
    n = sorted_indices.shape[0] if sorted_indices.dim() == 1 else -1
    if sorted_indices.dtype != torch.int32 or n != permuted_tokens.shape[0]:
        raise ValueError(f"{name}: sorted_indices must be 1-D int32 with one entry per permuted row, got "
                         f"{tuple(sorted_indices.shape)} {sorted_indices.dtype} for {tuple(permuted_tokens.shape)}")
    topk = 1 if probs is None else probs.shape[-1]
    if probs is not None and (probs.dim() != 2 or probs.numel() != n or probs.dtype not in MOE_FLOAT_DTYPES):
        raise ValueError(f"{name}: probs must be [T, k] float with T·k = {n}, got {tuple(probs.shape)} {probs.dtype}")
    if topk > MOE_MAX_TOPK:
        raise ValueError(f"{name}: topK {topk} must be <= {MOE_MAX_TOPK}")
    if not traced(sorted_indices) and not torch.equal(torch.sort(sorted_indices.long()).values,
                                                      torch.arange(n, device=sorted_indices.device)):
        raise ValueError(f"{name}: sorted_indices must be a permutation of 0..{n - 1} (no repeated index)")
    rows = permuted_tokens.index_select(0, sorted_indices.long()).to(torch.float32)  # pair i's row
    rows = rows.reshape(n // topk, topk, permuted_tokens.shape[1])
    if probs is not None:
        rows = rows * probs.to(torch.float32).unsqueeze(-1)
    return rows.sum(1).to(permuted_tokens.dtype)


MOE_KERNELS = {f.__name__: f for f in (npu_moe_token_permute, npu_moe_token_unpermute)}
"""Kernel name -> CPU emulation (registered without autograd by graphllm.preflight.npu_kernels)."""
