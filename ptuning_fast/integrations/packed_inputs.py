"""Packed sequences (padding-free batches) at the model wrapper: what transformers' collators
give (position ids restarting inside a row, or FlashAttention's `cu_seq_lens_q/k`) turned once
per forward into the segments every layer's prefix attention reads.
"""
from __future__ import annotations

import torch

from ..packing import packed_segments
from ..validation import check_cu_seqlens_values


def packed_segments_of(position_ids, attention_mask, past_len: int, kwargs: dict, ref):
    """Packed sequences in a forward, as transformers reads them: `cu_seq_lens_q`/`_k`
    (FlashAttention's varlen kwargs, as DataCollatorWithFlattening gives them), or position ids
    restarting inside a row with no attention mask and nothing cached. Returns (segments,
    position_ids): segments = `packed_segments(...)` once for every layer (None: not packed;
    rows that hold one sequence give one segment, the same result), and the position ids,
    restarting at each sequence (derived from cu_seq_lens when not given)."""
    batch, length = ref.shape[:2]
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        if position_ids is None or attention_mask is not None or past_len:
            return None, position_ids
        return packed_segments(position_ids.expand(batch, -1), batch=batch,
                               length=length), position_ids
    if attention_mask is not None or past_len:
        raise NotImplementedError("packed sequences (cu_seq_lens_q/k) with an attention_mask or a "
                                  "KV cache are not supported: pass one or the other")
    cu = cu_q if cu_q is not None else cu_k
    # Values compared on CPU only (elsewhere a host sync per forward), as cu_seqlens' own check.
    if cu_q is not None and cu_k is not None and cu_k is not cu_q and (
            cu_q.shape != cu_k.shape
            or (cu_q.device.type == "cpu" and not torch.equal(cu_q, cu_k.to(cu_q.device)))):
        raise ValueError(f"`cu_seq_lens_q` and `cu_seq_lens_k` must be equal for packed "
                         f"self-attention, got {cu_q.tolist()[:8]} and {cu_k.tolist()[:8]}")
    check_cu_seqlens_values(cu, batch, length)
    segments = packed_segments(cu_seqlens=cu, batch=batch, length=length)
    if position_ids is None:      # each sequence numbered from 0, as in its own row
        position_ids = torch.arange(length, device=ref.device) - segments[0].long()
    return segments, position_ids


def _is_packed(position_ids, attention_mask, past_len: int, kwargs: dict) -> bool:
    """Whether a forward's inputs are packed sequences (one host sync, on this rare path)."""
    if any(kwargs.get(n) is not None for n in ("cu_seq_lens_q", "cu_seq_lens_k")):
        return True
    return position_ids is not None and attention_mask is None and not past_len \
        and position_ids.shape[-1] > 1 and bool((position_ids.diff(dim=-1) != 1).any())


def refuse_packed(position_ids, attention_mask, past_len: int, kwargs: dict, what: str) -> None:
    """NotImplementedError for packed sequences where `what` cannot keep them apart."""
    if _is_packed(position_ids, attention_mask, past_len, kwargs):
        raise NotImplementedError(
            f"packed sequences (position_ids restarting inside a row, or cu_seq_lens_q/k) are "
            f"not supported with {what}. Pass one sequence per row with an attention_mask")


def refuse_packed_prompt(position_ids, attention_mask, past_len: int, kwargs: dict) -> None:
    """Prompt tuning / P-Tuning with packed sequences is refused: the prompt is part of the
    input, so each packed sequence would need its own copy of it inside the row (longer rows,
    moved labels and logits), and PEFT's way (one prompt per row, position ids dropped) would
    let the sequences attend to each other."""
    if _is_packed(position_ids, attention_mask, past_len, kwargs):
        raise NotImplementedError(
            "packed sequences (position_ids restarting inside a row, or cu_seq_lens_q/k) are "
            "not supported with prompt tuning / P-Tuning: the prompt would have to be inserted "
            "before every packed sequence. Pass one sequence per row with an attention_mask, "
            "or use prefix tuning, which supports packing on models whose attention goes "
            "through transformers' AttentionInterface (not Falcon)")
