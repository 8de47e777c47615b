"""Public fused ops: validation, backend dispatch, and the autograd layer (via `ptuning_fast.fused`).

Backends (`BACKENDS`): "triton" — the Triton kernels (CUDA tensors; CPU tensors only under
TRITON_INTERPRET=1, for testing); "torch" — fast pure PyTorch (`ptuning_fast.torch_path`: SDPA
without per-row prefix copies or repeated GQA heads), for every device; "reference" — the naive
definition of correct (`ptuning_fast.reference`). Each backend states its limits beside it as
`not_supported_reasons(op, tensors, options)` (xformers' dispatch): "auto" takes the first of
`AUTO_ORDER` with no reason against it, and an explicit backend with reasons raises one error
listing them all.
"""
from __future__ import annotations

import inspect

import torch

from . import reference, torch_path
from .fused import support as triton_support
from .fused.support import kernels_can_run
from .kernels.launch import as_seed_tensor, interpreting
from .packing import packed_segments
from .validation import (
    Reasons,
    check_attention_terms,
    check_cu_seqlens_values,
    check_prefix_attention,
    check_prefix_attention_values,
    check_prompt_embedding,
    check_prompt_embedding_values,
    option_in_use,
    refuse_unknown_options,
)

BACKENDS = ("auto", "triton", "torch", "reference")
AUTO_ORDER = ("triton", "torch", "reference")


def _reference_reasons(op: str, tensors: dict, options: dict, *, auto: bool = False) -> Reasons:
    """The reference computes every input its functions take a keyword for."""
    r = Reasons(op)
    fn = reference.attend if op == "prefix_attention" else reference.prompt_embedding
    refuse_unknown_options(r, "reference", inspect.signature(fn).parameters, options)
    return r


_REASONS = {"triton": triton_support.not_supported_reasons,
            "torch": torch_path.not_supported_reasons,
            "reference": _reference_reasons}


def not_supported_reasons(backend: str, op: str, tensors: dict, options: dict, *,
                          auto: bool = False) -> list[str]:
    """Why `backend` cannot run `op` ("prefix_attention" | "prompt_embedding") on `tensors`
    (name -> tensor or None) with `options` (keyword -> value); empty when it can."""
    return _REASONS[backend](op, tensors, options, auto=auto).messages()


# choose_backend's answers by what every backend's reasons depend on: the op, the tensors'
# device types and dtypes, the head dim, which options are in use, and whether Triton interprets.
# A model layer asks once per call; answering from here instead of running every backend's
# checks saves ~20 us per layer call on CPU (bench/NOTES.md, "The shared prompt pass").
_CHOSEN: dict[tuple, str] = {}
_CHOSEN_MAX = 4096


def _choice_key(backend: str, op: str, tensors: dict, options: dict) -> tuple:
    # The callers have checked that every tensor is on one device: the first one's stands
    # for all (device objects are slow to build, ~0.5 us per tensor).
    present = tuple((n, t.dtype) for n, t in tensors.items() if isinstance(t, torch.Tensor))
    device = tensors[present[0][0]].device.type if present else None
    q = tensors.get("q")
    return (backend, op, device, present, None if q is None else q.shape[-1],
            tuple(n for n, v in options.items() if option_in_use(v)), interpreting())


def choose_backend(backend: str, op: str, tensors: dict, options: dict) -> str:
    """The backend that runs `op`: `backend` itself (or one error listing why it cannot), or
    for "auto" the first of AUTO_ORDER with no reason against it."""
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}")
    key = _choice_key(backend, op, tensors, options)
    chosen = _CHOSEN.get(key)
    if chosen is None:
        chosen = _choose(backend, op, tensors, options)      # raises when none can
        if len(_CHOSEN) >= _CHOSEN_MAX:
            _CHOSEN.clear()
        _CHOSEN[key] = chosen
    return chosen


def _choose(backend: str, op: str, tensors: dict, options: dict) -> str:
    if backend != "auto":
        _REASONS[backend](op, tensors, options).raise_if_any()
        return backend
    refusals = []
    for name in AUTO_ORDER:
        reasons = not_supported_reasons(name, op, tensors, options, auto=True)
        if not reasons:
            return name
        refusals.append(f"{name!r}: " + "; ".join(reasons))
    raise NotImplementedError(f"{op}: no backend can run these inputs (" +
                              " | ".join(refusals) + ")")


def prompt_embedding(input_ids, weight, prompt, *, prompt_index=None, backend="auto"):
    """Fused `cat([prompt, weight[input_ids]], dim=1)`.

    input_ids (B, L) long; weight (V, d); prompt (P, d) shared, or (T, P, d) with prompt_index (B,).
    Returns (B, P + L, d) in weight's dtype. Gradient reaches `prompt` (summed over the rows that
    used it) and `weight` only if it requires grad.
    """
    check_prompt_embedding(input_ids, weight, prompt, prompt_index)
    chosen = choose_backend(backend, "prompt_embedding",
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
    options = _attention_options(causal, attention_mask, scale, prefix_index, dropout_p, bias,
                                 window_size, prefix_in_window, softcap, sinks, segments)
    chosen = _choose_attention(backend, q, k, v, prefix_k, prefix_v, options)
    return _run_attention(chosen, q, k, v, prefix_k, prefix_v, dropout_seed, options)


def layer_prefix_attention(q, k, v, prefix_k=None, prefix_v=None, *, causal=True,
                           attention_mask=None, scale=None, prefix_index=None, backend="auto",
                           dropout_p=0.0, dropout_seed=None, bias=None, window_size=(-1, -1),
                           prefix_in_window=True, softcap=0.0, sinks=None, segments=None):
    """`prefix_attention` as a model layer calls it: shapes, dtypes and devices are checked
    (metadata only), but not prefix_index's values — the model wrapper checks task_ids once
    per forward, not once per layer (on a GPU a value check costs a kernel launch). Packed
    sequences come as `segments` = `ptuning_fast.packing.packed_segments(...)`, computed once
    per model forward. A call with the metadata of an earlier one (`_layer_call_key`) skips
    the checks and the backend choice: their answer for it is known."""
    key = _layer_call_key((q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, bias,
                           sinks) + (segments if type(segments) is tuple else (segments,)),
                          (causal, scale, backend, dropout_p, dropout_seed, window_size,
                           prefix_in_window, softcap))
    chosen = None if key is None else _LAYER_CALLS.get(key)
    if chosen is None:
        check_prefix_attention(q, k, v, prefix_k, prefix_v, attention_mask, scale, prefix_index,
                               dropout_p, dropout_seed, causal)
        if segments is not None:
            _check_segments(segments, q, k)
        check_attention_terms(q, k, prefix_k, bias=bias, window_size=window_size,
                              prefix_in_window=prefix_in_window, softcap=softcap, sinks=sinks)
    options = _attention_options(causal, attention_mask, scale, prefix_index, dropout_p, bias,
                                 window_size, prefix_in_window, softcap, sinks, segments)
    if chosen is None:
        chosen = _choose_attention(backend, q, k, v, prefix_k, prefix_v, options)
        if key is not None:
            if len(_LAYER_CALLS) >= _CHOSEN_MAX:
                _LAYER_CALLS.clear()
            _LAYER_CALLS[key] = chosen
    return _run_attention(chosen, q, k, v, prefix_k, prefix_v, dropout_seed, options)


# Every layer of every step of a model calls `layer_prefix_attention` with the same metadata,
# and its checks and backend choice read nothing else: each tensor's type, shape, dtype,
# device and requires_grad, each option's type and value, grad mode, whether Triton
# interprets. Key -> the backend chosen, for calls that passed the checks. Saves ~11 us of the
# ~50 a decoding step's layer call cost on CPU (bench/NOTES.md, "Per-call host cost").
_LAYER_CALLS: dict[tuple, str] = {}


def _layer_call_key(tensors: tuple, options: tuple) -> tuple | None:
    """What the checks read, or None (the call is checked in full, and raises if it must)
    where a value is neither a tensor nor None, or an option is unhashable. Options carry
    their type: `causal=1` must not pass as `causal=True`, nor `scale=True` as 1.0."""
    if torch.compiler.is_compiling():
        return None          # traced once: the checks run at trace time
    metas = []
    for t in tensors:
        if t is None:
            metas.append(None)
        elif isinstance(t, torch.Tensor):
            metas.append((t.shape, t.dtype, t.device, t.requires_grad))
        else:
            return None
    typed = []
    for value in options:
        if isinstance(value, (tuple, list)):
            value = tuple((type(x), x) for x in value)
        typed.append((type(value), value))
    key = (tuple(metas), tuple(typed), torch.is_grad_enabled(), interpreting())
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _attention_options(causal, attention_mask, scale, prefix_index, dropout_p, bias,
                       window_size, prefix_in_window, softcap, sinks, segments) -> dict:
    return dict(causal=causal, attention_mask=attention_mask, scale=scale,
                prefix_index=prefix_index, dropout_p=float(dropout_p), bias=bias,
                window_size=tuple(window_size), prefix_in_window=prefix_in_window,
                softcap=float(softcap), sinks=sinks, segments=segments)


def _choose_attention(backend, q, k, v, prefix_k, prefix_v, options) -> str:
    return choose_backend(backend, "prefix_attention",
                          {"q": q, "k": k, "v": v, "prefix_k": prefix_k, "prefix_v": prefix_v,
                           "bias": options["bias"], "sinks": options["sinks"]}, options)


def _run_attention(chosen, q, k, v, prefix_k, prefix_v, dropout_seed, options):
    """Runs backend `chosen` on inputs the callers above have checked."""
    dropout_p = options["dropout_p"]
    seed = _dropout_seed_tensor(dropout_seed, q.device) if dropout_p > 0 else None
    if chosen != "triton":
        mask = None
        if dropout_p > 0:
            P = 0 if prefix_k is None else prefix_k.shape[-2]
            mask = _reference_dropout_mask(seed, q.shape, P, k.shape[2], dropout_p)
        if chosen == "reference":
            return reference.attend(q, k, v, prefix_k, prefix_v, dropout_mask=mask, **options)
        computed = {name: options[name] for name in torch_path.ATTENTION_OPTIONS}
        return torch_path.prefix_attention(q, k, v, prefix_k, prefix_v, dropout_mask=mask,
                                           **computed)
    from .fused.prefix_attention import prefix_attention_fused
    return prefix_attention_fused(q, k, v, prefix_k, prefix_v, dropout_seed=seed, **options)


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
    """0-d int64 seed on `device`: the given int, or one drawn from torch's generator there;
    either is made on the device itself (no host sync, capturable in a CUDA graph)."""
    if dropout_seed is None:
        return torch.randint(0, SEED_BOUND, (), device=device, dtype=torch.int64)
    return as_seed_tensor(dropout_seed, device)


def _reference_dropout_mask(seed, q_shape, P, Lk, dropout_p) -> torch.Tensor:
    """Keep-mask (B, Hq, Lq, P + Lk) for the reference path (see `prefix_attention`)."""
    B, Hq, Lq, _ = q_shape
    device = seed.device
    if kernels_can_run(device):
        from .kernels.attention_dropout import dropout_keep_mask
        return dropout_keep_mask(seed, B, Hq, Lq, P, Lk, dropout_p, device)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed) % 2 ** 63)
    keep = torch.full((B, Hq, Lq, P + Lk), 1.0 - dropout_p, device=device)
    return torch.bernoulli(keep, generator=generator).bool()
