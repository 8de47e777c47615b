"""The "torch" backend: prefix attention and prompt embedding in plain PyTorch, written for speed
where the Triton kernels cannot run (CPU without the interpreter, or inputs the kernels refuse).

Same function as `ptuning_fast.reference` (the definition of correct), computed without the
reference's copies: the prefix is expanded as a view and concatenated once (SDPA needs one K/V
tensor), grouped-query heads go to SDPA with `enable_gqa=True` (never repeated), and a boolean
mask is built only when some key is hidden — the causal part as one (Lq, P + Lk) plane shared
by every row and head, the padding part as (B, 1, 1, P + Lk). Measured on CPU against the
alternatives (a two-part softmax merged by log-sum-exp, repeated heads, an additive float
mask): bench/NOTES.md, "The torch backend".

Inputs arrive validated by `ptuning_fast.ops`. Each op's `*_not_supported_reasons` says what
this backend cannot compute (xformers' dispatch idea); `ops` refuses or skips it then.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .validation import Reasons, option_in_use, refuse_unknown_options

NAME = "torch"

# Options each op computes here. Any other keyword in use is a reason to refuse: a feature
# added to the op elsewhere is never silently dropped.
ATTENTION_OPTIONS = frozenset({"causal", "attention_mask", "scale", "prefix_index", "dropout_p"})
EMBEDDING_OPTIONS = frozenset({"prompt_index"})


def not_supported_reasons(op: str, tensors: dict, options: dict, *, auto: bool = False) -> Reasons:
    """Why this backend cannot run `op` on these validated inputs. SDPA takes every float dtype
    on every device, so only options it does not compute are refused."""
    r = Reasons(op)
    known = ATTENTION_OPTIONS if op == "prefix_attention" else EMBEDDING_OPTIONS
    if not option_in_use(options.get("window_size")):
        # prefix_in_window (default True) only says how a window treats the prefix.
        options = {n: v for n, v in options.items() if n != "prefix_in_window"}
    refuse_unknown_options(r, NAME, known, options)
    return r


def prompt_embedding(input_ids, weight, prompt, prompt_index=None):
    """(B, L) ids, (V, d) weight, (P, d) or (T, P, d) prompt -> (B, P + L, d) in weight's dtype.

    One `torch.cat` of the prompt (a stride-0 view over rows, or the rows' task prompts) and the
    embedding lookup. Measured against writing both into a preallocated output: cat is faster
    forward and 3x faster backward (slice assignment makes autograd copy the whole gradient).
    The prompt's gradient is summed over rows by the expand's backward; `weight` gets one only
    when it requires grad.
    """
    words = F.embedding(input_ids, weight)
    if prompt.dim() == 2:
        rows = prompt.unsqueeze(0).expand(input_ids.shape[0], -1, -1)
    else:
        rows = prompt.index_select(0, prompt_index)
    return torch.cat([rows.to(weight.dtype), words], dim=1)


def _per_row(prefix, prefix_index, batch):
    """(Hkv, P, D) | (B, Hkv, P, D) | (T, Hkv, P, D) + index -> (B, Hkv, P, D); a view when
    shared."""
    if prefix.dim() == 3:
        return prefix.unsqueeze(0).expand(batch, -1, -1, -1)
    if prefix_index is not None:
        return prefix.index_select(0, prefix_index)
    return prefix


def visible_mask(batch, q_len, k_len, prefix_len, *, causal, attention_mask, device):
    """Bool mask broadcastable to (B, Hq, Lq, P + Lk) — (1, 1, Lq, P + Lk) causal only,
    (B, 1, 1, P + Lk) padding only, (B, 1, Lq, P + Lk) both — or None when every key is visible.

    Prefix keys are always visible; sequence key j is visible iff the padding mask allows it
    and, when causal, j <= i + (Lk - Lq) (bottom-right aligned).
    """
    mask = None
    if causal and q_len > 1 or causal and k_len < q_len:
        i = torch.arange(q_len, device=device).view(q_len, 1)
        j = torch.arange(prefix_len + k_len, device=device).view(1, -1)
        # Over the concatenation key J = P + j: visible iff J < P or J - P <= i + Lk - Lq.
        mask = ((j < prefix_len) | (j <= i + (prefix_len + k_len - q_len))).view(
            1, 1, q_len, prefix_len + k_len)
    if attention_mask is not None:
        padding = attention_mask.bool()
        if prefix_len:
            padding = torch.cat([padding.new_ones(batch, prefix_len), padding], dim=1)
        padding = padding.view(batch, 1, 1, prefix_len + k_len)
        mask = padding if mask is None else mask & padding
    return mask


def prefix_attention(q, k, v, prefix_k=None, prefix_v=None, *, causal=True,
                     attention_mask=None, scale=None, prefix_index=None, dropout_p=0.0,
                     dropout_mask=None):
    """softmax(q [prefix_k; k]^T * scale + mask) [prefix_v; v] -> (B, Hq, Lq, D), q's dtype.

    Shapes and semantics: `ptuning_fast.reference.prefix_attention`. dropout_p > 0 needs the
    keep-mask `dropout_mask` (B, Hq, Lq, P + Lk) that `ptuning_fast.ops` draws for the seed,
    the same one the reference backend applies.
    """
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    P = 0 if prefix_k is None else prefix_k.shape[-2]
    if P:
        k = torch.cat([_per_row(prefix_k, prefix_index, B), k], dim=2)
        v = torch.cat([_per_row(prefix_v, prefix_index, B), v], dim=2)
    mask = visible_mask(B, Lq, Lk, P, causal=causal, attention_mask=attention_mask,
                        device=q.device)
    any_visible = None
    if mask is not None and P == 0:
        # Without a prefix a query may see no key at all: give it every key (finite softmax,
        # no NaN forward or backward) and zero its output, which also zeroes its gradients.
        any_visible = mask.any(dim=-1, keepdim=True)
        mask = mask | ~any_visible
    if dropout_p > 0:
        out = _attend_with_dropout(q, k, v, mask, scale, dropout_p, dropout_mask)
    else:
        out = _sdpa(q, k, v, mask, scale)
    if any_visible is not None:
        out = out * any_visible
    return out


def _sdpa(q, k, v, mask, scale):
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    scale = None if scale is None else float(scale)
    if Lq == 1 and Hq != Hkv:
        # Decoding: the group's queries stacked along the query axis of their kv head (a view,
        # since Lq = 1); a (B, 1, 1, keys) mask broadcasts over them. Faster than enable_gqa's
        # per-head loop for one query (bench/NOTES.md).
        grouped = q.reshape(B, Hkv, Hq // Hkv, D)
        out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, scale=scale)
        return out.reshape(B, Hq, 1, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=Hq != Hkv)


def _attend_with_dropout(q, k, v, mask, scale, dropout_p, keep):
    """Explicit probabilities (SDPA cannot take a given keep-mask), GQA as a broadcast over the
    group axis: q (B, Hkv, G, Lq, D) against k (B, Hkv, 1, P + Lk, D)."""
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    scale = D ** -0.5 if scale is None else float(scale)
    scores = torch.matmul(q.view(B, Hkv, group, Lq, D), k.unsqueeze(2).transpose(-1, -2))
    scores = scores * scale
    if mask is not None:
        scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1)
    probs = probs * keep.reshape(B, Hkv, group, Lq, -1) / (1.0 - dropout_p)
    out = torch.matmul(probs.to(q.dtype), v.unsqueeze(2))
    return out.reshape(B, Hq, Lq, D)
