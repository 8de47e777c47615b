"""The "torch" backend: prefix attention and prompt embedding in plain PyTorch, written for speed
where the Triton kernels cannot run (CPU without the interpreter, or inputs the kernels refuse).

Same function as `ptuning_fast.reference` (the definition of correct), every attention term
included, computed without the reference's copies: the prefix is expanded as a view and
concatenated once (SDPA needs one K/V tensor), grouped-query heads go to SDPA with
`enable_gqa=True` (never repeated), and a boolean mask is built only when some key is hidden —
causal and sliding-window parts as one (Lq, P + Lk) plane shared by every row and head, padding
as (B, 1, 1, P + Lk), packed sequences per row; keys that no query's window reaches are left out
(a decode step past the window: no prefix concatenated, no mask). An additive `bias` joins
that mask as SDPA's float mask (-inf where hidden). Soft-capping, sink logits and dropout (a
given keep-mask) are what SDPA cannot compute: they take explicit scores, each kv head's group
of query heads stacked on the query axis (one batched matmul; heads never repeated). Measured
on CPU against the alternatives and the reference: bench/NOTES.md, "The torch backend".

Inputs arrive validated by `ptuning_fast.ops`. Each op's `*_not_supported_reasons` says what
this backend cannot compute (xformers' dispatch idea); `ops` refuses or skips it then.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels.attention_options import ATTENTION_OPTIONS, AttentionSpec
from .validation import Reasons, refuse_unknown_options

NAME = "torch"

# Options each op computes here: every option of prefix attention's spec. Any other keyword in
# use is a reason to refuse: a feature added to the op elsewhere is never silently dropped.
EMBEDDING_OPTIONS = frozenset({"prompt_index"})


def not_supported_reasons(op: str, tensors: dict, options: dict, *, auto: bool = False) -> Reasons:
    """Why this backend cannot run `op` on these validated inputs. SDPA and the explicit-scores
    path take every float dtype on every device and every attention term `ops` knows, so only
    an option added to the op but not computed here is refused."""
    r = Reasons(op)
    known = ATTENTION_OPTIONS if op == "prefix_attention" else EMBEDDING_OPTIONS
    refuse_unknown_options(r, NAME, known, options)
    return r


def prompt_embedding(input_ids, weight, prompt, prompt_index=None):
    """(B, L) ids, (V, d) weight, (P, d) or (T, P, d) prompt -> (B, P + L, d) in weight's dtype.

    One `torch.cat` of the prompt (a stride-0 view over rows, or the rows' task prompts) and the
    embedding lookup. Measured against writing both into a preallocated output (bench/NOTES.md,
    "The torch backend"): cat is faster, the backward most (slice assignment makes autograd copy
    the whole gradient).
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


def visible_mask(batch, q_len, k_len, prefix_len, *, causal, attention_mask, device,
                 window_size=(-1, -1), prefix_in_window=True, segments=None):
    """Bool mask broadcastable to (B, Hq, Lq, P + Lk), or None when every key is visible; the
    same keys as `ptuning_fast.reference.visible_keys`, with only the axes that vary:
    (1, 1, Lq, P + Lk) for causal and window (every row and head alike), (B, 1, 1, P + Lk) for
    padding alone, (B, 1, Lq, P + Lk) for padding with those, or packed `segments` (start, end)
    (B, L).

    Over the concatenation, key J sits at position j = J - P (the prefix at -P .. -1, as in
    PEFT's cache). Sequence keys (j >= 0) need j <= i + s when causal (s = Lk - Lq: bottom-right
    aligned) and i + s - left <= j <= i + s + right under a window; prefix keys are visible,
    except that with a left window and `prefix_in_window` they need j >= i' + s - left too,
    i' being the query's position in its own packed sequence (i itself when not packed).
    """
    left, right = window_size
    shift = k_len - q_len
    lowest = -prefix_len if prefix_in_window else 0    # the first key a left window reaches
    # Each condition only where it hides some key (a 4096-token window over 128 keys hides
    # none, and SDPA without a mask is faster).
    causal = causal and (q_len > 1 or k_len < q_len)
    left_hides = left >= 0 and (k_len - 1 - left > lowest or segments is not None)
    right_hides = right >= 0 and right < q_len - 1
    mask = None
    if causal or left_hides or right_hides:
        # Each condition keeps a band of diagonals of the plane: one tril / triu each (half
        # the time of building it from aranges and comparisons).
        seq = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
        if causal or right_hides:
            seq = seq.tril(shift if causal else shift + right)   # causal: right adds nothing
        if left_hides:
            seq = seq.triu(shift - left)
        pre = torch.ones(q_len, prefix_len, dtype=torch.bool, device=device)
        if left_hides and prefix_in_window and segments is None:
            pre = pre.triu(prefix_len + shift - left)   # column c at c - P >= i + s - left
        # (Packed, the prefix's window depends on each row's segments: set below.)
        mask = torch.cat([pre, seq], dim=1).view(1, 1, q_len, prefix_len + k_len)
    if segments is not None:
        start, end = (s.view(batch, 1, q_len, 1) for s in segments)    # Lq == Lk when packed
        j = torch.arange(-prefix_len, k_len, device=device).view(1, 1, 1, -1)
        own = (j < 0) | ((j >= start) & (j < end))
        if left_hides and prefix_in_window:
            i = torch.arange(q_len, device=device).view(1, 1, q_len, 1)
            own &= (j >= 0) | (j >= i - start - left)
        mask = own if mask is None else mask & own
    if attention_mask is not None:
        padding = attention_mask.bool()
        if prefix_len:
            padding = torch.cat([padding.new_ones(batch, prefix_len), padding], dim=1)
        padding = padding.view(batch, 1, 1, prefix_len + k_len)
        mask = padding if mask is None else mask & padding
    return mask


def prefix_attention(q, k, v, prefix_k=None, prefix_v=None,
                     spec: AttentionSpec = AttentionSpec(), *, dropout_mask=None):
    """softmax(q [prefix_k; k]^T * scale + mask) [prefix_v; v] -> (B, Hq, Lq, D), q's dtype.

    Shapes and semantics (every term of `spec`): `ptuning_fast.reference.attend`.
    spec.dropout_p > 0 needs the keep-mask `dropout_mask` (B, Hq, Lq, P + Lk) that
    `ptuning_fast.dropout_seeds` draws for the seed, the same one the reference backend
    applies. `bias` (broadcastable, B and Hq may be 1) and `sinks` (Hq,) get no gradient (ops
    refuses them requiring one).
    """
    causal, attention_mask, scale = spec.causal, spec.attention_mask, spec.scale
    prefix_index, dropout_p, bias, sinks = spec.prefix_index, spec.dropout_p, spec.bias, spec.sinks
    prefix_in_window, softcap, segments = spec.prefix_in_window, spec.softcap, spec.segments
    window_size = spec.window_size
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    P = 0 if prefix_k is None else prefix_k.shape[-2]
    drop_p, drop_s = _unreached(Lq, Lk, P, window_size[0], prefix_in_window, segments)
    if drop_p == P and P and torch.is_grad_enabled() and (prefix_k.requires_grad
                                                         or prefix_v.requires_grad):
        # A prefix left out entirely would get no gradient (None) instead of the reference's
        # zeros; in training it stays (and then every key, the window counting from it).
        drop_p = drop_s = 0
    if drop_p or drop_s:
        # Keys no query's window reaches are left out before anything is built: a decode step
        # past the window concatenates no prefix and needs no mask. Their gradients are the
        # slices' zeros, as the reference's.
        bias, dropout_mask = (_keep_columns(t, P, drop_p, drop_s) for t in (bias, dropout_mask))
        if drop_p:
            prefix_k, prefix_v = prefix_k[..., drop_p:, :], prefix_v[..., drop_p:, :]
        k, v = k[:, :, drop_s:], v[:, :, drop_s:]
        if attention_mask is not None:
            attention_mask = attention_mask[:, drop_s:]
        P, Lk = P - drop_p, Lk - drop_s

    def attend(k, v):
        if _merged_applies(q, k, v, prefix_k, prefix_v, causal, window_size, segments, bias,
                           softcap, sinks, dropout_p):
            return _merged(q, k, v, prefix_k, prefix_v, prefix_index, attention_mask, scale)
        if P:
            k = torch.cat([_per_row(prefix_k, prefix_index, B), k], dim=2)
            v = torch.cat([_per_row(prefix_v, prefix_index, B), v], dim=2)
        mask = visible_mask(B, Lq, Lk, P, causal=causal, attention_mask=attention_mask,
                            device=q.device, window_size=window_size,
                            prefix_in_window=prefix_in_window, segments=segments)
        any_visible = None
        if mask is not None and (P == 0 or window_size[0] >= 0 and prefix_in_window):
            # A query may see no key at all (the prefix is hidden only by a window over it):
            # give it every key (finite softmax, no NaN forward or backward) and zero its
            # output, which also zeroes its gradients — the reference's zeros.
            any_visible = mask.any(dim=-1, keepdim=True)
            mask = mask | ~any_visible
        if bias is not None:
            # One additive float mask: the bias where visible, -inf where hidden.
            mask = bias.to(q.dtype) if mask is None else torch.where(mask, bias.to(q.dtype),
                                                                     float("-inf"))
            # A bias of -inf on every key a query sees hides them all: the same zeros (the
            # explicit path's softmax of a row of -inf would be NaN).
            seen = (mask != float("-inf")).any(dim=-1, keepdim=True)
            mask = mask.masked_fill(~seen, 0.0)
            any_visible = seen if any_visible is None else any_visible & seen
        if softcap > 0 or sinks is not None or dropout_p > 0:
            keep = dropout_mask if dropout_p > 0 else None
            out = _explicit_attention(q, k, v, mask, scale, softcap=softcap, sinks=sinks,
                                      dropout_p=dropout_p, keep=keep)
        else:
            out = _sdpa(q, k, v, mask, scale)
        if any_visible is not None:
            out = out * any_visible
        return out

    if attention_mask is None:
        return attend(k, v)
    # Padding is never read (the reference's rule), but SDPA adds its mask to the logits
    # (NaN + -inf is NaN) and weighs the values by exact zeros (0 * NaN is NaN): padded keys
    # that are not finite must be zeroed first. Without gradients on CPU the output tells:
    # such a key makes it NaN, and nothing else it holds can change it (a decoding step's
    # merged path exists to copy no cache). Elsewhere the check would wait for the device,
    # break a compiled graph, or miss a NaN that only a gradient would meet: zeroed always.
    if q.device.type == "cpu" and not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                            for t in (q, k, v, prefix_k, prefix_v))):
        out = attend(k, v)
        if bool(torch.isfinite(out).all()):
            return out
    hidden = ~attention_mask.bool().view(B, 1, Lk, 1)
    return attend(k.masked_fill(hidden, 0), v.masked_fill(hidden, 0))


# On CPU, without gradients, the prefix and the sequence are attended separately and merged
# (`_merged`) instead of concatenated: a decoding step (one query) with at least this many
# cached key elements (B * Hkv * Lk * D; the concatenation copies the whole cache every step),
# and a causal prefill of at least MERGED_PREFILL_MIN_QUERIES queries (the sequence part then
# runs under `is_causal`, which lets the flash kernel skip the blocks above the diagonal; an
# explicit mask skips none). The thresholds are where the merged route started to win, measured
# per call on a CPU (bench/cpu_merged_attention.py; the figures are in bench/NOTES.md).
MERGED_DECODE_MIN_ELEMENTS = 1 << 17
MERGED_PREFILL_MIN_QUERIES = 512


def _merged_applies(q, k, v, prefix_k, prefix_v, causal, window_size, segments, bias, softcap,
                    sinks, dropout_p) -> bool:
    """CPU, a prefix, no gradient, nothing beside the padding mask (a window, bias, cap, sinks
    or dropout take the general path), not float64 (SDPA computes it exactly, the flash kernel
    to ~1e-7); then a long cache for one query, or a long causal prefill (Lq == Lk).

    Never an empty tensor: `_merged` calls the CPU flash kernel itself, without SDPA's guard
    for empty inputs, and that kernel divides by its numbers of queries and keys (SIGFPE, the
    process dies) — so no P = 0 prefix, no Lk = 0, no B = 0."""
    B, Hkv, Lk, D = k.shape
    Lq = q.shape[2]
    if not (q.device.type == "cpu" and prefix_k is not None and q.dtype != torch.float64
            and q.numel() and k.numel() and prefix_k.numel()
            and window_size[0] < 0 and segments is None and bias is None
            and not softcap and sinks is None and not dropout_p
            and not (torch.is_grad_enabled()
                     and any(t.requires_grad for t in (q, k, v, prefix_k, prefix_v)))):
        return False
    if Lq == 1:
        return B * Hkv * Lk * D >= MERGED_DECODE_MIN_ELEMENTS
    return causal and Lq == Lk and Lq >= MERGED_PREFILL_MIN_QUERIES


def _merged(q, k, v, prefix_k, prefix_v, prefix_index, attention_mask, scale):
    """Attention over [prefix; sequence] without concatenating them: one flash call over the
    prefix, one over the sequence, merged by their log-sum-exps l1, l2 as
    o2 + (o1 - o2) sigmoid(l1 - l2) (the softmax over both, split in two). Every query sees the
    whole prefix; a shared one is read once, all rows' queries of a kv head forming one batch
    against it. The sequence part: one query sees every key (bottom-right causality), a prefill
    (Lq == Lk) runs under `is_causal` with its kv heads repeated (the kernel takes no groups);
    padding masks the sequence only."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    scale = None if scale is None else float(scale)
    rows = q.reshape(B, Hkv, group * Lq, D)            # a kv head's queries, group-major
    if prefix_k.dim() == 3:
        batch = rows.transpose(0, 1).reshape(1, Hkv, B * group * Lq, D)
        o1, l1 = flash(batch, prefix_k.unsqueeze(0), prefix_v.unsqueeze(0), scale=scale)[:2]
        o1, l1 = o1.view(Hkv, B, -1, D).transpose(0, 1), l1.view(Hkv, B, -1).transpose(0, 1)
    else:
        o1, l1 = flash(rows, _per_row(prefix_k, prefix_index, B),
                       _per_row(prefix_v, prefix_index, B), scale=scale)[:2]
    o1, l1 = o1.reshape(B, Hq, Lq, D), l1.reshape(B, Hq, Lq)
    mask = seen = None
    if attention_mask is not None:
        visible = attention_mask.bool()
        mask = _additive(visible, q.dtype).view(B, 1, 1, -1)
        # Queries that see no sequence key (all padding up to them): their flash output and
        # log-sum-exp are not -inf-aware, so l2 = -inf below gives the prefix weight exactly 1.
        seen = visible.any(-1, keepdim=True) if Lq == 1 else visible.cumsum(-1) > 0
    if Lq == 1:
        o2, l2 = flash(rows, k, v, attn_mask=mask, scale=scale)[:2]
    else:
        o2, l2 = flash(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                       is_causal=True, attn_mask=mask, scale=scale)[:2]
    o2, l2 = o2.reshape(B, Hq, Lq, D), l2.reshape(B, Hq, Lq)
    if seen is not None:
        l2 = l2.masked_fill(~seen.view(B, 1, Lq), float("-inf"))
    return torch.lerp(o2, o1, torch.sigmoid(l1 - l2).unsqueeze(-1).to(o1.dtype))


def _additive(visible, dtype):
    """A bool mask (True = visible) as an additive one of its own shape: 0 or -inf."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(
        ~visible, float("-inf"))


def _unreached(q_len, k_len, prefix_len, left, prefix_in_window, segments):
    """(prefix keys, sequence keys) at the start of each that no query's left window reaches.
    Query i reaches sequence position i + (Lk - Lq) - left, so the first query's bound holds
    for all; with `prefix_in_window` prefix column c sits at c - P, and sequence keys go only
    with the whole prefix (the window's count from the prefix must not move). None when packed
    (each sequence has its own start) or without a left window."""
    if left < 0 or segments is not None:
        return 0, 0
    first = k_len - q_len - left
    if not prefix_in_window:
        return 0, max(first, 0)
    if first < 0:
        return max(first + prefix_len, 0), 0
    return prefix_len, first


def _keep_columns(t, prefix_len, drop_p, drop_s):
    """`t` (..., P + Lk) without its first drop_p prefix and first drop_s sequence columns."""
    if t is None:
        return None
    if drop_s == 0:
        return t[..., drop_p:]
    if drop_p == prefix_len:
        return t[..., prefix_len + drop_s:]
    return torch.cat([t[..., drop_p:prefix_len], t[..., prefix_len + drop_s:]], dim=-1)


def _sdpa(q, k, v, mask, scale):
    """SDPA with `mask` (bool: True = visible, or additive float) broadcastable to
    (B, Hq, Lq, keys)."""
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    scale = None if scale is None else float(scale)
    if Lq == 1 and Hq != Hkv:
        # Decoding: the group's queries stacked along the query axis of their kv head (a view,
        # since Lq = 1), the mask's head axis likewise. Faster than enable_gqa's per-head loop
        # for one query (bench/NOTES.md).
        grouped = q.reshape(B, Hkv, Hq // Hkv, D)
        if mask is not None:
            mask = _grouped(mask, Hkv).squeeze(3)
        out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, scale=scale)
        return out.reshape(B, Hq, 1, D)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=Hq != Hkv)


def _grouped(t, kv_heads):
    """(B | 1, Hq | 1, Lq, keys) -> (B | 1, Hkv | 1, group | 1, Lq, keys), a view: the query
    heads' axis split as (kv head, group) for the grouped-query broadcast."""
    heads = t.shape[1]
    if heads == 1:
        return t.unsqueeze(2)
    return t.view(t.shape[0], kv_heads, heads // kv_heads, *t.shape[2:])


def _explicit_attention(q, k, v, mask, scale, *, softcap=0.0, sinks=None, dropout_p=0.0,
                        keep=None):
    """Attention with explicit scores, for what SDPA cannot take: a logit soft-cap, sink logits,
    a given dropout keep-mask (B, Hq, Lq, keys). Grouped-query heads never repeated: each kv
    head's group of query heads stacked along the query axis, (B, Hkv, G * Lq, D) against
    (B, Hkv, keys, D), one batched matmul; the mask broadcast over the group axis.

    The reference's function: soft-cap, then the additive `mask`, softmax with the sink (Hq,) as
    one more logit in the denominator and no value, then dropout. From the scores on in float32
    (float64 for float64): 16-bit inputs are capped and masked more precisely than by the
    reference, which does it in their dtype (and 16-bit inputs take a cheaper cap, below).
    Scalars go where the tensor is smallest: scale and the cap's 1 / softcap into q (Lq x D,
    not Lq x keys), 1 / (1 - p) into the output.
    """
    B, Hq, Lq, D = q.shape
    Hkv, keys = k.shape[1], k.shape[2]
    group = Hq // Hkv
    scale = D ** -0.5 if scale is None else float(scale)
    compute = torch.promote_types(q.dtype, torch.float32)
    # c tanh(x / c) = 2c sigmoid(2x / c) - c, and softmax ignores the constant -c (moved onto
    # the sink's logit, the one term without it): sigmoid is far cheaper than tanh on CPU. Its
    # price: logits rounded at 2c rather than at their size, an error of ~c * 2^-24 in float32,
    # far below a 16-bit reference's rounding but past the float32 tolerance on some draws
    # (both measured: bench/NOTES.md, "The torch backend"): float32 and
    # float64 inputs take tanh.
    sigmoid_cap = softcap > 0 and q.dtype.itemsize == 2
    q = q * ((2 if sigmoid_cap else 1) * scale / softcap if softcap > 0 else scale)
    scores = torch.matmul(q.reshape(B, Hkv, group * Lq, D), k.transpose(-1, -2))
    scores = scores.view(B, Hkv, group, Lq, keys).to(compute)
    sink_shift = 0.0
    if sigmoid_cap:
        scores = torch.sigmoid(scores) * (2 * softcap)
        sink_shift = softcap
    elif softcap > 0:
        scores = torch.tanh(scores) * softcap
    if mask is not None:
        if mask.dtype == torch.bool:
            # An additive mask of the mask's own (small) shape: adding it broadcast is faster
            # than masked_fill over the scores (bench/NOTES.md, "The torch backend").
            mask = _additive(mask, compute)
        # In place: neither the product's nor the cap's backward reads this tensor.
        scores.add_(_grouped(mask.to(compute), Hkv))
    if sinks is not None:
        # One softmax over [scores, sink] (fused forward and backward: faster than
        # exp(scores - logaddexp(logsumexp(scores), sink)), bench/NOTES.md "The torch
        # backend", and finite on a row of -inf); the
        # sink's column meets a zero value row instead of being sliced off the probabilities.
        sink = (sinks.to(compute) + sink_shift).view(1, Hkv, group, 1, 1)
        probs = torch.softmax(torch.cat([scores, sink.expand(B, Hkv, group, Lq, 1)], dim=-1),
                              dim=-1)
        v = torch.cat([v, v.new_zeros(B, Hkv, 1, D)], dim=2)
        if keep is not None:
            keep = torch.cat([keep, keep.new_ones(B, Hq, Lq, 1)], dim=-1)
        keys += 1
    else:
        probs = torch.softmax(scores, dim=-1)
    if keep is not None:
        probs = probs * keep.view(B, Hkv, group, Lq, keys)
    out = torch.matmul(probs.to(q.dtype).view(B, Hkv, group * Lq, keys), v)
    if keep is not None:
        out = out / (1.0 - dropout_p)
    return out.view(B, Hq, Lq, D)
