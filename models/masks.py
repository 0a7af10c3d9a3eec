"""Boolean attention masks built from constants (or position_ids) once per forward, True where query i may
see key j. fuse_attention recognises these forms: change one only together with that pass."""

from __future__ import annotations

import torch


def packed_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] positions restarting at 0 per sample -> bool [B, 1, S, S]: key j visible to query i when
    both are in one sample and j ≤ i. (fuse_attention recognises this form, with the segment ids.)"""
    S = position_ids.shape[-1]
    segment_ids = torch.cumsum((position_ids == 0).to(torch.int64), dim=-1)  # [B, S]: sample of each token
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # [B, 1, S, S]
    causal = torch.ones(S, S, dtype=torch.bool, device=position_ids.device).tril()  # [S, S]
    return same & causal


def sliding_window_mask(S: int, window: int, device: torch.device) -> torch.Tensor:
    """bool [S, S]: key j visible to query i when i - window < j ≤ i (causal, the last `window` keys
    including i itself): transformers' sliding_window_overlay and causal mask functions together."""
    i = torch.arange(S, device=device)[:, None]  # [S, 1] query positions
    j = torch.arange(S, device=device)[None, :]  # [1, S] key positions
    return (j <= i) & (j > i - window)


def window_masks(windows: set[int], S: int, sample_mask: torch.Tensor | None,
                 device: torch.device) -> dict[int, torch.Tensor]:
    """Window -> its mask, for the windows shorter than S (a window ≥ S is plain causal attention, built as
    such); with `sample_mask` [B, 1, S, S] (packed rows) each band is also confined to its sample."""
    out = {}
    for w in sorted(windows):
        if w < S:
            band = sliding_window_mask(S, w, device)  # [S, S]
            out[w] = band if sample_mask is None else sample_mask & band  # [B, 1, S, S]
    return out
