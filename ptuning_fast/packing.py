"""Packed sequences: several sequences laid one after another in one row (padding-free
training), given the way transformers' collators give them, turned into the per-token segment
bounds that the reference and the kernels read.

A row's token j belongs to the segment [start[b, j], end[b, j]); query i sees sequence key j
only inside its own segment. Computed with tensor operations only (no host sync), once per
call: a model forward converts once and every layer reuses the result.
"""
from __future__ import annotations

import torch


def boundaries_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Bool (B, L): True where a new sequence starts. As transformers detects packing, a
    sequence starts at every position whose id is not the previous id + 1 (and at j = 0)."""
    first = torch.ones_like(position_ids[:, :1], dtype=torch.bool)
    return torch.cat([first, position_ids[:, 1:] != position_ids[:, :-1] + 1], dim=1)


def boundaries_from_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Bool (B, L) from cumulative lengths (N + 1,) over the row-major flattened B * L tokens
    (FlashAttention's varlen convention: cu_seqlens[0] = 0, cu_seqlens[-1] = B * L). Every row
    start also starts a sequence."""
    flat = torch.zeros(batch * length + 1, dtype=torch.bool, device=cu_seqlens.device)
    flat[cu_seqlens.long()] = True
    starts = flat[:-1].view(batch, length).clone()
    starts[:, 0] = True
    return starts


def segment_bounds(boundaries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end), int32 (B, L): the first index of each token's segment and one past its
    last, from the bool (B, L) sequence starts."""
    B, L = boundaries.shape
    j = torch.arange(L, device=boundaries.device).expand(B, L)
    start = torch.where(boundaries, j, 0).cummax(dim=1).values
    # The next start after j (or L): a running minimum from the right.
    next_start = torch.where(boundaries, j, L)
    next_start = torch.cat([next_start[:, 1:], next_start.new_full((B, 1), L)], dim=1)
    end = next_start.flip(1).cummin(dim=1).values.flip(1)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


def packed_segments(position_ids=None, cu_seqlens=None, *, batch: int, length: int):
    """(start, end) int32 (B, L) for packed sequences, or None when neither is given."""
    if position_ids is not None:
        return segment_bounds(boundaries_from_position_ids(position_ids))
    if cu_seqlens is not None:
        return segment_bounds(boundaries_from_cu_seqlens(cu_seqlens, batch, length))
    return None
