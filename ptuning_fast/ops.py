"""Public fused ops: validation, backend dispatch, and the autograd layer (via `ptuning_fast.fused`).

backend="auto" runs the Triton kernels on CUDA tensors and the reference path on CPU tensors;
"triton" forces the kernels (on CPU only under TRITON_INTERPRET=1); "reference" forces the
pure-PyTorch path of `ptuning_fast.reference`.
"""
from __future__ import annotations

import os

import torch

from . import reference
from .validation import check_prefix_attention, check_prompt_embedding

BACKENDS = ("auto", "triton", "reference")


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
    if device.type == "cpu" and interpreter_enabled():
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
    if resolve_backend(backend, weight.device) == "reference":
        return reference.prompt_embedding(input_ids, weight, prompt, prompt_index=prompt_index)
    from .fused.prompt_embedding import prompt_embedding_op
    return prompt_embedding_op(input_ids, weight, prompt, prompt_index)


def prefix_attention(q, k, v, prefix_k=None, prefix_v=None, *, causal=True, attention_mask=None,
                     scale=None, prefix_index=None, backend="auto"):
    """Attention over [prefix K/V; K/V] without materializing the concatenation.

    q (B, Hq, Lq, D); k, v (B, Hkv, Lk, D); prefix_k/v (Hkv, P, D) shared, (B, Hkv, P, D) per row,
    or (T, Hkv, P, D) with prefix_index (B,). attention_mask (B, Lk), true/1 = attend. Causal
    masking is bottom-right aligned. Returns (B, Hq, Lq, D) in q's dtype. Semantics: see
    ARCHITECTURE.md and `ptuning_fast.reference.prefix_attention`.
    """
    check_prefix_attention(q, k, v, prefix_k, prefix_v, attention_mask, scale, prefix_index)
    if resolve_backend(backend, q.device) == "reference":
        return reference.prefix_attention(q, k, v, prefix_k, prefix_v, causal=causal,
                                          attention_mask=attention_mask, scale=scale,
                                          prefix_index=prefix_index)
    from .fused.prefix_attention import prefix_attention_fused
    return prefix_attention_fused(q, k, v, prefix_k, prefix_v, causal=causal,
                                  attention_mask=attention_mask, scale=scale,
                                  prefix_index=prefix_index)
