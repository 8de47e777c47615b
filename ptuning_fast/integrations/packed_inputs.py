"""Packed sequences (padding-free batches) at the model wrapper: what transformers' and TRL's
collators give (position ids restarting inside a row, FlashAttention's `cu_seq_lens_q/k`, and
`seq_idx`, checked against them) turned once per forward into the segments every layer's prefix
attention reads; and prompt tuning / P-Tuning on packed rows (`prompt_forward`).
"""
from __future__ import annotations

import torch

from ..packing import packed_segments
from ..validation import check_cu_seqlens_values
from . import attention
from .support import ignored_in_front


def packed_segments_of(position_ids, attention_mask, past_len: int, kwargs: dict, ref):
    """Packed sequences in a forward, as transformers reads them: `cu_seq_lens_q`/`_k`
    (FlashAttention's varlen kwargs, as DataCollatorWithFlattening gives them), or position ids
    restarting inside a row with no attention mask and nothing cached. Returns (segments,
    position_ids): segments = `packed_segments(...)` once for every layer (None: not packed;
    rows that hold one sequence give one segment, the same result), and the position ids,
    restarting at each sequence (derived from cu_seq_lens when not given)."""
    segments, position_ids = _segments_and_positions(position_ids, attention_mask, past_len,
                                                     kwargs, ref)
    check_seq_idx(kwargs.get("seq_idx"), segments, *ref.shape[:2])
    return segments, position_ids


def _segments_and_positions(position_ids, attention_mask, past_len: int, kwargs: dict, ref):
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


def check_seq_idx(seq_idx, segments, batch: int, length: int) -> None:
    """`seq_idx` (B, L) — each token's sequence number, which TRL's and transformers'
    padding-free collators add for linear-attention layers — restates the packed sequences: a
    sequence starts wherever it changes. Accepted where it agrees with `segments` (None: one
    sequence per row); otherwise refused by name. Values compared on CPU now; on a GPU with a
    device-side assert (no host sync per forward), as task ids are."""
    if seq_idx is None:
        return
    if not isinstance(seq_idx, torch.Tensor) or seq_idx.is_floating_point() \
            or seq_idx.dtype == torch.bool or seq_idx.dim() != 2 \
            or seq_idx.shape[0] not in (1, batch) or seq_idx.shape[1] != length:
        got = f"shape {tuple(seq_idx.shape)}, dtype {seq_idx.dtype}" \
            if isinstance(seq_idx, torch.Tensor) else type(seq_idx).__name__
        raise ValueError(f"`seq_idx` must be an integer tensor of shape ({batch}, {length}) "
                         f"(one sequence number per token), got {got}")
    seq_idx = seq_idx.expand(batch, length)
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    positions = torch.arange(length, device=seq_idx.device)
    expected = positions == (0 if segments is None else segments[0].to(seq_idx.device))
    message = ("`seq_idx` disagrees with the packed sequences that cu_seq_lens_q/k or "
               "position_ids give (or, with neither, with one sequence per row)")
    if seq_idx.device.type == "cpu" and not torch.compiler.is_compiling():
        if not torch.equal(starts, expected.expand(batch, length)):
            raise ValueError(message)
        return
    torch._assert_async((starts == expected).all(), message)


def is_packed(position_ids, attention_mask, past_len: int, kwargs: dict) -> bool:
    """Whether a forward's inputs are packed sequences (one host sync, on this rare path)."""
    if any(kwargs.get(n) is not None for n in ("cu_seq_lens_q", "cu_seq_lens_k")):
        return True
    return position_ids is not None and attention_mask is None and not past_len \
        and position_ids.shape[-1] > 1 and bool((position_ids.diff(dim=-1) != 1).any())


def refuse_packed(position_ids, attention_mask, past_len: int, kwargs: dict, what: str) -> None:
    """NotImplementedError for packed sequences where `what` cannot keep them apart."""
    if is_packed(position_ids, attention_mask, past_len, kwargs):
        raise NotImplementedError(
            f"packed sequences (position_ids restarting inside a row, or cu_seq_lens_q/k) are "
            f"not supported with {what}. Pass one sequence per row with an attention_mask")


def prompt_forward(wrapper, input_ids, attention_mask, labels, task_ids, inputs_embeds,
                   position_ids, token_type_ids, past_len: int, kwargs: dict):
    """Prompt tuning / P-Tuning on packed sequences. PEFT puts one prompt in front of the row
    and drops the position ids, so its packed sequences see each other and only the first sees
    the prompt. Here each row is [prompt; packed sequences] as one call of the base model (so a
    forward patched onto it sees PEFT's inputs: the prompt rows, P -100 labels in front), and
    the attention function gives every sequence the prompt as a prefix and then itself only,
    numbered from P as in its own row behind the prompt: each sequence's function as one row of
    PEFT's. Its first label is predicted from the token before it in the row (the last prompt
    position only for the row's first sequence): padding-free collators ignore those labels
    (-100), as for any packed causal LM."""
    if not wrapper.uses_own_attention:
        raise NotImplementedError(
            "packed sequences (position_ids restarting inside a row, or cu_seq_lens_q/k) with "
            "prompt tuning / P-Tuning need ptuning_fast's attention function: a decoder-only "
            "causal LM whose attention goes through transformers' AttentionInterface, wrapped "
            f"with shared_prompt=True or 'auto' ({type(wrapper.base_model).__name__} was "
            "wrapped for PEFT's concatenation). Pass one sequence per row with an "
            "attention_mask")
    ref = input_ids if input_ids is not None else inputs_embeds
    batch, P = ref.shape[0], wrapper.num_virtual_tokens
    segments, position_ids = packed_segments_of(position_ids, attention_mask, past_len, kwargs,
                                                ref)
    prompt_positions = torch.arange(P, device=ref.device).expand(batch, P)
    kwargs["position_ids"] = torch.cat(
        [prompt_positions, position_ids.to(ref.device).expand(batch, -1) + P], 1)
    if token_type_ids is not None:
        kwargs["token_type_ids"] = torch.cat(
            [token_type_ids.new_zeros(batch, P), token_type_ids], 1)
    if labels is not None:
        kwargs["labels"] = ignored_in_front(labels, P)
    binding = wrapper._binding(task_ids, segments, seq_idx=kwargs.get("seq_idx"))
    binding.row_prompt = P
    kwargs[attention.PREFIX_KWARG] = binding
    return wrapper.base_model(
        inputs_embeds=wrapper._embed_with_prompt(input_ids, inputs_embeds, task_ids), **kwargs)
