"""The public fused ops: `prefix_attention`, `prompt_embedding`, and `layer_prefix_attention`
(a model layer's call). Each checks its inputs, builds the call's `AttentionSpec` once
(kernels/attention_options.py), and hands it to the backend that `ptuning_fast.dispatch`
chooses ("auto" | "triton" | "torch" | "reference"; see there).
"""
from __future__ import annotations

from . import dispatch, reference, torch_path
# Dispatch's public names, where callers of ops have always found them.
from .dispatch import AUTO_ORDER, BACKENDS, choose_backend, not_supported_reasons  # noqa: F401
from .dropout_seeds import dropout_seed_tensor
from .kernels.attention_options import ATTENTION_OPTIONS, AttentionSpec
from .packing import packed_segments
from .validation import (
    check_attention_terms,
    check_cu_seqlens_values,
    check_prefix_attention,
    check_prefix_attention_values,
    check_prompt_embedding,
    check_prompt_embedding_values,
    check_segments,
)


def prompt_embedding(input_ids, weight, prompt, *, prompt_index=None, backend="auto"):
    """Fused `cat([prompt, weight[input_ids]], dim=1)`.

    input_ids (B, L) long; weight (V, d); prompt (P, d) shared, or (T, P, d) with prompt_index (B,).
    Returns (B, P + L, d) in weight's dtype. Gradient reaches `prompt` (summed over the rows that
    used it) and `weight` only if it requires grad.
    """
    check_prompt_embedding(input_ids, weight, prompt, prompt_index)
    chosen = dispatch.choose_backend(backend, "prompt_embedding",
                            {"input_ids": input_ids, "weight": weight, "prompt": prompt},
                            {"prompt_index": prompt_index})
    if chosen == "reference":    # checks its values itself
        return reference.prompt_embedding(input_ids, weight, prompt, prompt_index=prompt_index)
    check_prompt_embedding_values(input_ids, weight, prompt, prompt_index)
    if chosen == "torch":
        return torch_path.prompt_embedding(input_ids, weight, prompt, prompt_index)
    from .fused.prompt_embedding import prompt_embedding_op
    return prompt_embedding_op(input_ids, weight, prompt, prompt_index)


def prefix_attention(q, k, v, prefix_k=None, prefix_v=None, *, causal=True, attention_mask=None,
                     scale=None, prefix_index=None, backend="auto", dropout_p=0.0,
                     dropout_seed=None, bias=None, window_size=(-1, -1), prefix_in_window=True,
                     softcap=0.0, sinks=None, position_ids=None, cu_seqlens=None):
    """Attention over [prefix K/V; K/V] without materializing the concatenation.

    q (B, Hq, Lq, D); k, v (B, Hkv, Lk, D); prefix_k/v (Hkv, P, D) shared, (B, Hkv, P, D) per row,
    or (T, Hkv, P, D) with prefix_index (B,). attention_mask (B, Lk), true/1 = attend. Causal
    masking is bottom-right aligned. Returns (B, Hq, Lq, D) in q's dtype. Semantics: see
    docs/design.md and `ptuning_fast.reference.prefix_attention`.

    Degenerate rows, on every backend (FlashAttention's rules): a query that sees no key (every
    key masked without a prefix, or a `bias` of -inf on each key it could see) outputs zeros
    and passes zero gradient, never NaN. Keys that `attention_mask` hides are never read: NaN
    or inf in k or v there changes neither the output nor any gradient (their dk, dv are 0).

    dropout_p in [0, 1): attention-probability dropout, as torch's SDPA / FlashAttention (each
    probability, prefix and sequence columns alike, kept with probability 1 - p and scaled by
    1 / (1 - p)). dropout_seed (int) fixes the mask; None draws one from torch's generator on
    q's device, so `torch.manual_seed` makes runs reproducible (and activation checkpointing,
    which restores the generator, recomputes the same mask). The Triton kernels regenerate the
    mask from the seed in the backward (nothing of size Lq x Lk is stored). The "torch" and
    "reference" backends with dropout draw the kernels' mask for the same seed where the mask
    kernel can run (CUDA, or CPU under TRITON_INTERPRET=1) and otherwise a `torch.bernoulli`
    mask (the same for both): then they drop other entries than the kernels for one seed, as
    torch's SDPA backends do among themselves.

    Attention terms beside the prefix (FlashAttention's names where it has one; no gradient
    flows to `bias` or `sinks`, which come from frozen weights):
    - `bias`: additive logits broadcastable to (B, Hq, Lq, P + Lk), prefix columns first
      (T5's relative position bias as PEFT's cached prefix sees it; ALiBi).
    - `window_size` (left, right): sliding window, bottom-right aligned like the causal mask:
      sequence key j is visible to query i only if i + s - left <= j <= i + s + right
      (s = Lk - Lq; -1: unbounded). transformers' `sliding_window=W` is left = W - 1. With
      `prefix_in_window` (default: PEFT's result, whose cached prefix sits at positions -P..-1)
      the window counts the prefix too; False keeps the prefix always visible (as sinks).
    - `softcap` > 0: logits become softcap * tanh(logits / softcap) (Gemma 2), before `bias`.
    - `sinks` (Hq,): a per-head logit that joins the softmax normalizer and has no value
      (GPT-OSS's `s_aux`).
    - Packed sequences (Lq == Lk): `position_ids` (B, L) restarting at every sequence (a new
      sequence starts wherever the id is not the previous id + 1, as transformers detects
      packing) or `cu_seqlens` (N + 1,) cumulative lengths over the flattened B * L tokens.
      Each sequence sees the prefix and only its own keys: the same result as running every
      sequence as its own row.

    backend: "auto" (the Triton kernels on CUDA, else the fast "torch" path, else the
    reference), or one of them by name; see the module doc. The "torch" backend computes every
    term above too, so "auto" off CUDA takes it.
    """
    check_prefix_attention(q, k, v, prefix_k, prefix_v, attention_mask, scale, prefix_index,
                           dropout_p, dropout_seed, causal)
    check_prefix_attention_values(prefix_k, prefix_index)
    check_attention_terms(q, k, prefix_k, bias=bias, window_size=window_size,
                          prefix_in_window=prefix_in_window, softcap=softcap, sinks=sinks,
                          position_ids=position_ids, cu_seqlens=cu_seqlens)
    check_cu_seqlens_values(cu_seqlens, q.shape[0], q.shape[2])
    segments = packed_segments(position_ids, cu_seqlens, batch=q.shape[0], length=q.shape[2])
    return _attend(backend, q, k, v, prefix_k, prefix_v, locals())


def layer_prefix_attention(q, k, v, prefix_k=None, prefix_v=None, *, causal=True,
                           attention_mask=None, scale=None, prefix_index=None, backend="auto",
                           dropout_p=0.0, dropout_seed=None, bias=None, window_size=(-1, -1),
                           prefix_in_window=True, softcap=0.0, sinks=None, segments=None):
    """`prefix_attention` as a model layer calls it: shapes, dtypes and devices are checked
    (metadata only), but not prefix_index's values — the model wrapper checks task_ids once
    per forward, not once per layer (on a GPU a value check costs a kernel launch). Packed
    sequences come as `segments` = `ptuning_fast.packing.packed_segments(...)`, computed once
    per model forward. Every call is checked: a memo of checked call metadata saved host time
    per call but no measurable time in a whole generate() (bench/NOTES.md, "Per-call host
    cost"), so it was removed."""
    check_prefix_attention(q, k, v, prefix_k, prefix_v, attention_mask, scale, prefix_index,
                           dropout_p, dropout_seed, causal)
    if segments is not None:
        check_segments(segments, q, k)
    check_attention_terms(q, k, prefix_k, bias=bias, window_size=window_size,
                          prefix_in_window=prefix_in_window, softcap=softcap, sinks=sinks)
    return _attend(backend, q, k, v, prefix_k, prefix_v, locals())


def _attend(backend, q, k, v, prefix_k, prefix_v, arguments: dict):
    """Builds the spec from a public function's checked `arguments` (its locals: every
    AttentionSpec field is one of its keywords, `segments` computed), chooses, runs."""
    spec = attention_spec(q, **{name: arguments[name] for name in ATTENTION_OPTIONS})
    chosen = dispatch.choose_attention(backend, q, k, v, prefix_k, prefix_v, spec)
    return dispatch.run_attention(chosen, q, k, v, prefix_k, prefix_v, spec)


def attention_spec(q, *, causal, attention_mask, scale, prefix_index, dropout_p, dropout_seed,
                   bias, window_size, prefix_in_window, softcap, sinks,
                   segments) -> AttentionSpec:
    """The call's spec from checked options: numbers normalized, and with dropout the seed
    as a 0-d int64 tensor on q's device (the given int, or drawn there)."""
    dropout_p = float(dropout_p)
    seed = dropout_seed_tensor(dropout_seed, q.device) if dropout_p > 0 else None
    return AttentionSpec(attention_mask=attention_mask, prefix_index=prefix_index,
                         causal=causal, scale=scale, dropout_p=dropout_p, dropout_seed=seed,
                         bias=bias, sinks=sinks, segments=segments,
                         window_size=tuple(window_size), prefix_in_window=prefix_in_window,
                         softcap=float(softcap))
