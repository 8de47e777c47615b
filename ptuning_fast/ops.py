"""Public fused ops: validation, backend dispatch, and the autograd layer (via `ptuning_fast.fused`).

backend="auto" runs the Triton kernels on CUDA tensors and the reference path on CPU tensors;
"triton" forces the kernels (on CPU only under TRITON_INTERPRET=1); "reference" forces the
pure-PyTorch path of `ptuning_fast.reference`.
"""
from __future__ import annotations

import torch

from . import reference
from .kernels.launch import interpreting
from .packing import packed_segments
from .validation import (
    check_attention_terms,
    check_cu_seqlens_values,
    check_interpreter_dtypes,
    check_prefix_attention,
    check_prefix_attention_values,
    check_prompt_embedding,
    check_prompt_embedding_values,
)

BACKENDS = ("auto", "triton", "reference")


def kernels_can_run(device: torch.device) -> bool:
    """The Triton kernels run on CUDA tensors, and on CPU tensors under the interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def resolve_backend(backend: str, device: torch.device) -> str:
    """Returns "triton" or "reference" for tensors on `device`; a clear error otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if device.type == "cuda":
        return "triton"
    if backend == "auto":
        return "reference"
    if kernels_can_run(device):
        return "triton"
    raise ValueError(
        f"`backend`='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
        f"ptuning_fast's kernels are imported; got tensors on {device}")


def prompt_embedding(input_ids, weight, prompt, *, prompt_index=None, backend="auto"):
    """Fused `cat([prompt, weight[input_ids]], dim=1)`.

    input_ids (B, L) long; weight (V, d); prompt (P, d) shared, or (T, P, d) with prompt_index (B,).
    Returns (B, P + L, d) in weight's dtype. Gradient reaches `prompt` (summed over the rows that
    used it) and `weight` only if it requires grad.
    """
    check_prompt_embedding(input_ids, weight, prompt, prompt_index)
    if resolve_backend(backend, weight.device) == "reference":    # checks its values itself
        return reference.prompt_embedding(input_ids, weight, prompt, prompt_index=prompt_index)
    check_prompt_embedding_values(input_ids, weight, prompt, prompt_index)
    if weight.device.type == "cpu":
        check_interpreter_dtypes("prompt_embedding", {"weight": weight, "prompt": prompt})
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

    dropout_p in [0, 1): attention-probability dropout, as torch's SDPA / FlashAttention (each
    probability, prefix and sequence columns alike, kept with probability 1 - p and scaled by
    1 / (1 - p)). dropout_seed (int) fixes the mask; None draws one from torch's generator on
    q's device, so `torch.manual_seed` makes runs reproducible (and activation checkpointing,
    which restores the generator, recomputes the same mask). The Triton kernels regenerate the
    mask from the seed in the backward (nothing of size Lq x Lk is stored). backend="reference"
    with dropout draws the kernels' mask for the same seed where the mask kernel can run (CUDA,
    or CPU under TRITON_INTERPRET=1) and otherwise a `torch.bernoulli` mask: then the two
    backends drop different entries for one seed, as torch's SDPA backends do.

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
    """
    check_prefix_attention(q, k, v, prefix_k, prefix_v, attention_mask, scale, prefix_index,
                           dropout_p, dropout_seed, causal)
    check_prefix_attention_values(prefix_k, prefix_index)
    check_attention_terms(q, k, prefix_k, bias=bias, window_size=window_size,
                          prefix_in_window=prefix_in_window, softcap=softcap, sinks=sinks,
                          position_ids=position_ids, cu_seqlens=cu_seqlens)
    check_cu_seqlens_values(cu_seqlens, q.shape[0], q.shape[2])
    segments = packed_segments(position_ids, cu_seqlens, batch=q.shape[0], length=q.shape[2])
    return layer_prefix_attention(q, k, v, prefix_k, prefix_v, causal=causal,
                                  attention_mask=attention_mask, scale=scale,
                                  prefix_index=prefix_index, backend=backend,
                                  dropout_p=dropout_p, dropout_seed=dropout_seed, bias=bias,
                                  window_size=window_size, prefix_in_window=prefix_in_window,
                                  softcap=softcap, sinks=sinks, segments=segments)


def layer_prefix_attention(q, k, v, prefix_k=None, prefix_v=None, *, causal=True,
                           attention_mask=None, scale=None, prefix_index=None, backend="auto",
                           dropout_p=0.0, dropout_seed=None, bias=None, window_size=(-1, -1),
                           prefix_in_window=True, softcap=0.0, sinks=None, segments=None):
    """`prefix_attention` as a model layer calls it: shapes, dtypes and devices are checked
    (metadata only), but not prefix_index's values — the model wrapper checks task_ids once
    per forward, not once per layer (on a GPU a value check costs a kernel launch). Packed
    sequences come as `segments` = `ptuning_fast.packing.packed_segments(...)`, computed once
    per model forward."""
    check_prefix_attention(q, k, v, prefix_k, prefix_v, attention_mask, scale, prefix_index,
                           dropout_p, dropout_seed, causal)
    if segments is not None:
        _check_segments(segments, q, k)
    check_attention_terms(q, k, prefix_k, bias=bias, window_size=window_size,
                          prefix_in_window=prefix_in_window, softcap=softcap, sinks=sinks)
    window_size = tuple(window_size)
    terms = dict(bias=bias, window_size=window_size, prefix_in_window=prefix_in_window,
                 softcap=float(softcap), sinks=sinks, segments=segments)
    dropout_p = float(dropout_p)
    seed = None
    if dropout_p > 0:
        seed = _dropout_seed_tensor(dropout_seed, q.device)
    if resolve_backend(backend, q.device) == "reference":
        mask = None
        if dropout_p > 0:
            P = 0 if prefix_k is None else prefix_k.shape[-2]
            mask = _reference_dropout_mask(seed, q.shape, P, k.shape[2], dropout_p)
        return reference.attend(q, k, v, prefix_k, prefix_v, causal=causal,
                                attention_mask=attention_mask, scale=scale,
                                prefix_index=prefix_index, dropout_p=dropout_p,
                                dropout_mask=mask, **terms)
    if q.device.type == "cpu":
        check_interpreter_dtypes("prefix_attention", {"q": q, "k": k, "v": v, "prefix_k": prefix_k,
                                                      "prefix_v": prefix_v, "bias": bias,
                                                      "sinks": sinks})
    from .fused.prefix_attention import prefix_attention_fused
    return prefix_attention_fused(q, k, v, prefix_k, prefix_v, causal=causal,
                                  attention_mask=attention_mask, scale=scale,
                                  prefix_index=prefix_index, dropout_p=dropout_p,
                                  dropout_seed=seed, **terms)


def _check_segments(segments, q, k) -> None:
    """`segments` as `packed_segments` makes them: (start, end) int32 (B, Lq) on q's device,
    and Lq == Lk."""
    B, _, Lq, _ = q.shape
    ok = k.shape[2] == Lq and isinstance(segments, tuple) and len(segments) == 2 and all(
        isinstance(s, torch.Tensor) and s.dtype == torch.int32 and tuple(s.shape) == (B, Lq)
        and s.device == q.device for s in segments)
    if not ok:
        raise ValueError(f"prefix_attention: `segments` must be ptuning_fast.packing."
                         f"packed_segments(...)'s (start, end), int32 (B, Lq) = ({B}, {Lq}) on "
                         f"{q.device}; got {segments!r}"[:400])


# Seeds are drawn from [0, 2**62): any int64 works for Philox; this range is what gets drawn.
SEED_BOUND = 2 ** 62


def _dropout_seed_tensor(dropout_seed, device) -> torch.Tensor:
    """0-d int64 seed on `device`: the given int, or one drawn from torch's generator there
    (on the device itself: no host sync)."""
    if dropout_seed is None:
        return torch.randint(0, SEED_BOUND, (), device=device, dtype=torch.int64)
    return torch.tensor(dropout_seed, dtype=torch.int64, device=device)


def _reference_dropout_mask(seed, q_shape, P, Lk, dropout_p) -> torch.Tensor:
    """Keep-mask (B, Hq, Lq, P + Lk) for the reference path (see `prefix_attention`)."""
    B, Hq, Lq, _ = q_shape
    device = seed.device
    if kernels_can_run(device):
        from .kernels.prefix_attention_fwd import dropout_keep_mask
        return dropout_keep_mask(seed, B, Hq, Lq, P, Lk, dropout_p, device)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed) % 2 ** 63)
    keep = torch.full((B, Hq, Lq, P + Lk), 1.0 - dropout_p, device=device)
    return torch.bernoulli(keep, generator=generator).bool()
