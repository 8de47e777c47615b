"""Backend dispatch for the public ops: which backend runs a call, and running it.

Backends (`BACKENDS`): "triton" — the Triton kernels (CUDA tensors; CPU tensors only under
TRITON_INTERPRET=1, for testing); "torch" — fast pure PyTorch (`ptuning_fast.torch_path`: SDPA
without per-row prefix copies or repeated GQA heads), for every device; "reference" — the naive
definition of correct (`ptuning_fast.reference`). Each backend states its limits beside it as
`not_supported_reasons(op, tensors, options)` (xformers' dispatch): "auto" takes the first of
`AUTO_ORDER` with no reason against it, and an explicit backend with reasons raises one error
listing them all.
"""
from __future__ import annotations

import torch

from . import reference, torch_path
from .dropout_seeds import reference_dropout_mask
from .fused import support as triton_support
from .kernels.attention_options import ATTENTION_OPTIONS, AttentionSpec
from .kernels.launch import interpreting
from .validation import Reasons, option_in_use, refuse_unknown_options

BACKENDS = ("auto", "triton", "torch", "reference")
AUTO_ORDER = ("triton", "torch", "reference")


def _reference_reasons(op: str, tensors: dict, options: dict, *, auto: bool = False) -> Reasons:
    """The reference computes every option of its ops."""
    r = Reasons(op)
    known = ATTENTION_OPTIONS if op == "prefix_attention" else ("prompt_index",)
    refuse_unknown_options(r, "reference", known, options)
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
# A model layer asks once per call; answering from here skips every backend's checks
# (bench/NOTES.md, "The shared prompt pass", gives the saving and its command).
_CHOSEN: dict[tuple, str] = {}
_CHOSEN_MAX = 4096


def _choice_key(backend: str, op: str, tensors: dict, options: dict) -> tuple:
    # The callers have checked that every tensor is on one device: the first one's stands
    # for all (building a device object per tensor is a measurable host cost per call).
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


def choose_attention(backend: str, q, k, v, prefix_k, prefix_v, spec: AttentionSpec) -> str:
    return choose_backend(backend, "prefix_attention",
                          {"q": q, "k": k, "v": v, "prefix_k": prefix_k, "prefix_v": prefix_v,
                           "bias": spec.bias, "sinks": spec.sinks}, spec.options())


def run_attention(chosen: str, q, k, v, prefix_k, prefix_v, spec: AttentionSpec):
    """Runs backend `chosen` on checked inputs and their spec."""
    if chosen == "triton":
        from .fused.prefix_attention import prefix_attention_fused
        return prefix_attention_fused(q, k, v, prefix_k, prefix_v, spec)
    mask = None
    if spec.dropout_p > 0:
        P = 0 if prefix_k is None else prefix_k.shape[-2]
        mask = reference_dropout_mask(spec.dropout_seed, q.shape, P, k.shape[2],
                                      spec.dropout_p)
    if chosen == "reference":
        return reference.attend(q, k, v, prefix_k, prefix_v, spec, dropout_mask=mask)
    return torch_path.prefix_attention(q, k, v, prefix_k, prefix_v, spec, dropout_mask=mask)
