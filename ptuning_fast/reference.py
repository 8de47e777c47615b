"""Pure-PyTorch reference paths: the definition of correct for every kernel.

Written the naive way Hugging Face PEFT computes these things: the prompt/prefix is copied once
per batch row and concatenated in front of the sequence, a dense mask is built over the
concatenation, and grouped-query K/V heads are expanded. Slow and memory hungry on purpose —
every fused kernel in this library is checked against these functions.

`upcast=True` computes in float64 and returns float64 (for tests that need an exact baseline).
"""
from __future__ import annotations

import torch

from .kernels.attention_options import AttentionSpec
from .packing import packed_segments
from .validation import (
    check_attention_terms,
    check_cu_seqlens_values,
    check_dropout_mask,
    check_prefix_attention,
    check_prefix_attention_values,
    check_prompt_embedding,
    check_prompt_embedding_values,
)


def prompt_embedding(input_ids, weight, prompt, *, prompt_index=None, backend="reference",
                     upcast=False):
    """(B, L) ids, (V, d) weight, (P, d) or (T, P, d) prompt -> (B, P + L, d) in weight's dtype.

    Row b is `[prompt (or prompt[prompt_index[b]]); weight[input_ids[b]]]`.
    `backend` is accepted for signature parity with `ptuning_fast.prompt_embedding` and ignored.
    """
    check_prompt_embedding(input_ids, weight, prompt, prompt_index)
    check_prompt_embedding_values(input_ids, weight, prompt, prompt_index)
    out_dtype = torch.float64 if upcast else weight.dtype
    words = torch.nn.functional.embedding(input_ids.long(), weight).to(out_dtype)
    B = input_ids.shape[0]
    if prompt.dim() == 2:
        rows = prompt.unsqueeze(0).expand(B, -1, -1)          # PEFT repeats the prompt per row
    else:
        rows = prompt[prompt_index.long()]
    return torch.cat([rows.to(out_dtype), words], dim=1)


def _per_row_prefix(prefix, prefix_index, batch):
    """(Hkv,P,D) | (B,Hkv,P,D) | (T,Hkv,P,D)+index -> a (B, Hkv, P, D) copy, as PEFT builds it."""
    if prefix.dim() == 3:
        return prefix.unsqueeze(0).expand(batch, -1, -1, -1)
    if prefix_index is not None:
        return prefix[prefix_index.long()]
    return prefix


def visible_keys(batch, q_len, k_len, prefix_len, *, causal, attention_mask, device,
                 window_size=(-1, -1), prefix_in_window=True, segments=None):
    """Bool (B, 1, Lq, P + Lk): which of the concatenated keys each query sees.

    Sequence key j is visible to query i iff the padding mask allows it and, when causal,
    j <= i + (Lk - Lq) (bottom-right aligned, so a decode step sees its cache); a sliding
    window (left, right) (-1: unbounded) also needs i + shift - left <= j <= i + shift + right;
    packed `segments` (start, end) (B, L) need j in query i's own segment. Every prefix key is
    visible, except that with a left window and `prefix_in_window` the prefix sits just before
    the sequence (at positions -P .. -1, as in PEFT's cache; before the query's own segment when
    packed): prefix key c is visible iff c - P >= (i - segment start) + shift - left.
    """
    shift = k_len - q_len
    left, right = window_size
    i = torch.arange(q_len, device=device).view(1, 1, q_len, 1)
    j = torch.arange(k_len, device=device).view(1, 1, 1, k_len)
    seq = torch.ones(batch, 1, q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        seq = seq & (j <= i + shift)
    if left >= 0:
        seq = seq & (j >= i + shift - left)
    if right >= 0:
        seq = seq & (j <= i + shift + right)
    if attention_mask is not None:
        seq = seq & attention_mask.bool().view(batch, 1, 1, k_len)
    local = i.expand(batch, 1, q_len, 1)
    if segments is not None:
        start, end = (s.long().view(batch, 1, k_len, 1) for s in segments)
        seq = seq & (j >= start) & (j < end)          # Lq == Lk when packed
        local = local - start
    c = torch.arange(prefix_len, device=device).view(1, 1, 1, prefix_len)
    pre = torch.ones(batch, 1, q_len, prefix_len, dtype=torch.bool, device=device)
    if left >= 0 and prefix_in_window:
        pre = pre & (c - prefix_len >= local + shift - left)
    return torch.cat([pre, seq], dim=-1)


def prefix_attention(q, k, v, prefix_k=None, prefix_v=None, *, causal=True, attention_mask=None,
                     scale=None, prefix_index=None, backend="reference", upcast=False,
                     dropout_p=0.0, dropout_mask=None, bias=None, window_size=(-1, -1),
                     prefix_in_window=True, softcap=0.0, sinks=None, position_ids=None,
                     cu_seqlens=None):
    """softmax(q [prefix_k; k]^T * scale + mask) [prefix_v; v], per (batch row, query head).

    q (B, Hq, Lq, D); k, v (B, Hkv, Lk, D); prefix_k/v (Hkv, P, D) shared, (B, Hkv, P, D) per row,
    or (T, Hkv, P, D) with prefix_index (B,). Returns (B, Hq, Lq, D) in q's dtype (float64 with
    `upcast`). A query row with no visible key (hidden by the mask, causality, the window, or
    a -inf bias on each) returns zeros (and passes zero gradient). Keys that
    `attention_mask` hides are never read: NaN or inf there changes nothing.
    Scores are computed in the inputs' dtype and softmax in float32, as transformers' eager
    attention does. `backend` is accepted for signature parity and ignored.

    Dropout (dropout_p > 0) needs the explicit keep-mask `dropout_mask`, bool (B, Hq, Lq, P + Lk)
    over the concatenated [prefix; sequence] keys: probabilities become probs * mask / (1 - p)
    (as torch's SDPA and FlashAttention drop them). `ptuning_fast.kernels.attention_dropout.
    dropout_keep_mask` gives the mask the Triton kernels draw for a seed.
    """
    check_prefix_attention(q, k, v, prefix_k, prefix_v, attention_mask, scale, prefix_index,
                           dropout_p, causal=causal)
    check_attention_terms(q, k, prefix_k, bias=bias, window_size=window_size,
                          prefix_in_window=prefix_in_window, softcap=softcap, sinks=sinks,
                          position_ids=position_ids, cu_seqlens=cu_seqlens)
    check_prefix_attention_values(prefix_k, prefix_index)
    check_cu_seqlens_values(cu_seqlens, q.shape[0], q.shape[2])
    segments = packed_segments(position_ids, cu_seqlens, batch=q.shape[0], length=q.shape[2])
    spec = AttentionSpec(attention_mask=attention_mask, prefix_index=prefix_index,
                         causal=causal, scale=scale, dropout_p=dropout_p, bias=bias,
                         sinks=sinks, segments=segments, window_size=tuple(window_size),
                         prefix_in_window=prefix_in_window, softcap=softcap)
    return attend(q, k, v, prefix_k, prefix_v, spec, upcast=upcast, dropout_mask=dropout_mask)


def attend(q, k, v, prefix_k=None, prefix_v=None, spec: AttentionSpec = AttentionSpec(), *,
           upcast=False, dropout_mask=None):
    """`prefix_attention` on inputs and an `AttentionSpec` already validated (by
    `ptuning_fast.ops`); dropout applies the keep-mask `dropout_mask` (spec.dropout_seed is
    not read here)."""
    attention_mask, prefix_index, causal = spec.attention_mask, spec.prefix_index, spec.causal
    scale, dropout_p, bias, sinks = spec.scale, spec.dropout_p, spec.bias, spec.sinks
    softcap = spec.softcap
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else float(scale)
    P = 0
    if attention_mask is not None:
        # Padding is never read, as FlashAttention removes it before attending: whatever k and
        # v hold there (NaN, inf) reaches neither the output (0 * NaN is NaN) nor a gradient.
        kept = attention_mask.bool().view(B, 1, Lk, 1)
        k, v = k.masked_fill(~kept, 0), v.masked_fill(~kept, 0)
    if prefix_k is not None and prefix_k.shape[-2] > 0:
        P = prefix_k.shape[-2]
        k = torch.cat([_per_row_prefix(prefix_k, prefix_index, B), k], dim=2)
        v = torch.cat([_per_row_prefix(prefix_v, prefix_index, B), v], dim=2)
    group = Hq // Hkv
    k = k.repeat_interleave(group, dim=1)           # expanded GQA heads, as PEFT's eager path
    v = v.repeat_interleave(group, dim=1)
    compute = torch.float64 if upcast else q.dtype
    softmax_dtype = torch.float64 if upcast else torch.float32
    q, k, v = q.to(compute), k.to(compute), v.to(compute)

    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)          # Gemma 2's logit soft-capping
    if bias is not None:
        scores = scores + bias.to(compute)
    allowed = visible_keys(B, Lq, Lk, P, causal=causal, attention_mask=attention_mask,
                           device=q.device, window_size=spec.window_size,
                           prefix_in_window=spec.prefix_in_window, segments=spec.segments)
    # A key whose logit is -inf (a bias hiding it) is hidden too, so a row that a bias hides
    # entirely sees no key (zeros, as FlashAttention gives a row of -inf logits). A NaN logit
    # stays visible: it makes its row NaN.
    allowed = allowed & (scores != float("-inf"))
    any_visible = allowed.any(dim=-1, keepdim=True)
    # Masked keys get -inf; a row with no visible key gets finite zeros instead (softmax of an
    # all -inf row is NaN, and NaN * 0 would still poison the backward), then is zeroed below.
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~any_visible, 0.0)
    scores = scores.to(softmax_dtype)
    if sinks is not None:
        # GPT-OSS's sink logits: one extra softmax column per head, with no value.
        sink = sinks.to(softmax_dtype).view(1, Hq, 1, 1).expand(B, Hq, Lq, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1] * allowed
    else:
        probs = torch.softmax(scores, dim=-1) * allowed
    if dropout_p > 0:
        check_dropout_mask(dropout_mask, (B, Hq, Lq, P + Lk), q.device)
        probs = probs * dropout_mask / (1.0 - dropout_p)
    out = torch.matmul(probs.to(compute), v)
    return out if upcast else out.to(q.dtype)

