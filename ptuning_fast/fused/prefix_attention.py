"""Custom ops `ptuning_fast::prefix_attention` (forward), `ptuning_fast::prefix_attention_bwd`
and `ptuning_fast::prefix_attention_decode` (forward only, few queries, no gradient).

Opaque ops with fake implementations, so `torch.compile(fullgraph=True)` traces through them;
the backward op is registered as the forward's autograd formula and launches only the kernels
whose gradients autograd asks for. `prefix_attention_fused` takes the decode kernel, which
splits the keys across programs (kernels/prefix_attention_decode.py), when Lq is small, dropout
is off and no gradient can be asked for (through the decode op when traced, its launcher
directly in eager); otherwise the prefill op.

Dropout: `dropout_p` (float) and `dropout_seed` (0-d int64 tensor on the inputs' device, or None
when dropout_p == 0) go to both ops; the backward regenerates the forward's keep-mask from the
seed. A tensor rather than a Python int so that drawing a seed needs no host sync (one per layer
on CUDA) and stays inside a traced graph.
"""
from __future__ import annotations

import torch

from ..kernels import prefix_attention_bwd as bwd_kernels
from ..kernels import prefix_attention_decode as decode_kernels
from ..kernels import prefix_attention_fwd as fwd_kernels
from ..kernels.attention_options import FLAT_PARAMS, SCHEMA, AttentionSpec
from .support import KERNEL_DTYPES, MAX_HEAD_DIM

_INPUTS = "Tensor q, Tensor k, Tensor v, Tensor? prefix_k, Tensor? prefix_v"
# Positions of the spec's tensors among its flat parameters: saved for the backward.
_SPEC_TENSORS = tuple(i for i, p in enumerate(FLAT_PARAMS) if p.startswith("Tensor"))


def _forward(q, k, v, prefix_k, prefix_v, *spec):
    return fwd_kernels.prefix_attention_fwd(q, k, v, prefix_k, prefix_v,
                                            AttentionSpec.from_flat(spec))


# The schema (q, k, v, prefix_k, prefix_v, then the spec's flat fields) is generated from
# `AttentionSpec`, so a new option is declared once, in kernels/attention_options.py.
prefix_attention_op = torch.library.custom_op(
    "ptuning_fast::prefix_attention", _forward, mutates_args=(),
    schema=f"({_INPUTS}, {SCHEMA}) -> (Tensor, Tensor)")


@prefix_attention_op.register_fake
def _(q, k, v, prefix_k, prefix_v, *spec):
    B, Hq, Lq, D = q.shape
    # Same layout as the kernel's output: (B, Lq, Hq, D) memory seen as (B, Hq, Lq, D).
    out = q.new_empty(B, Lq, Hq, D).transpose(1, 2)
    return out, q.new_empty(B, Hq, Lq, dtype=torch.float32)


def _backward_op(grad_out, q, k, v, prefix_k, prefix_v, out, lse, needs, *spec):
    grads = bwd_kernels.prefix_attention_bwd(grad_out, q, k, v, prefix_k, prefix_v, out, lse,
                                             AttentionSpec.from_flat(spec), needs=tuple(needs))
    # A custom op cannot return None: a gradient nobody asked for is an empty placeholder.
    return [g if g is not None else q.new_empty(0) for g in grads]


prefix_attention_bwd_op = torch.library.custom_op(
    "ptuning_fast::prefix_attention_bwd", _backward_op, mutates_args=(),
    schema=f"(Tensor grad_out, {_INPUTS}, Tensor out, Tensor lse, bool[] needs, {SCHEMA})"
           " -> Tensor[]")


@prefix_attention_bwd_op.register_fake
def _(grad_out, q, k, v, prefix_k, prefix_v, out, lse, needs, *spec):
    like = (q, k, v, prefix_k, prefix_v)
    return [torch.empty_like(t) if need else q.new_empty(0) for t, need in zip(like, needs)]


def _setup_context(ctx, inputs, output):
    # torch.library passes every input of the schema, defaults filled in: q, k, v, prefix_k,
    # prefix_v, then the spec's flat fields (tensors saved, the rest kept on ctx).
    q, k, v, prefix_k, prefix_v, *spec = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, out, lse,
                          *(spec[i] for i in _SPEC_TENSORS))
    ctx.spec = [None if i in _SPEC_TENSORS else x for i, x in enumerate(spec)]
    ctx.num_inputs = len(inputs)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, prefix_k, prefix_v, out, lse, *tensors = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:5]]
    if not any(needs):
        return (None,) * ctx.num_inputs
    spec = list(ctx.spec)
    for i, t in zip(_SPEC_TENSORS, tensors):
        spec[i] = t
    grads = prefix_attention_bwd_op(grad_out, q, k, v, prefix_k, prefix_v, out, lse, needs,
                                    *spec)
    return (*[g if need else None for g, need in zip(grads, needs)],) \
        + (None,) * (ctx.num_inputs - 5)


prefix_attention_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("ptuning_fast::prefix_attention_decode", mutates_args=())
def prefix_attention_decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               prefix_k: torch.Tensor | None, prefix_v: torch.Tensor | None,
                               attention_mask: torch.Tensor | None,
                               prefix_index: torch.Tensor | None, causal: bool,
                               scale: float) -> torch.Tensor:
    # An explicit schema: the decode kernel takes these four of the spec's options only.
    spec = AttentionSpec(attention_mask=attention_mask, prefix_index=prefix_index,
                         causal=causal, scale=scale)
    out, _ = decode_kernels.prefix_attention_decode(q, k, v, prefix_k, prefix_v, spec)
    return out


@prefix_attention_decode_op.register_fake
def _(q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, causal, scale):
    B, Hq, Lq, D = q.shape
    return q.new_empty(B, Lq, Hq, D).transpose(1, 2)


def _takes_decode_path(q, k, v, prefix_k, prefix_v, spec: AttentionSpec) -> bool:
    """Few queries, no dropout, no attention terms (the decode kernel computes none of them),
    and no gradient that autograd could ask for: the decode op has no backward (it keeps no
    LSE for one)."""
    if decode_kernels.unsupported_options(spec) or not decode_kernels.supports(q.shape[2]):
        return False
    return not (torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, prefix_k, prefix_v)))


def prefix_attention_fused(q, k, v, prefix_k, prefix_v, spec: AttentionSpec):
    """Triton prefix attention; inputs and `spec` already validated by `ptuning_fast.ops`.

    Returns (B, Hq, Lq, D) in q's dtype, laid out as (B, Lq, Hq, D) in memory, so that
    `out.transpose(1, 2).reshape(B, Lq, Hq * D)` needs no copy. fp16/bf16/fp32, D <= 256.
    fp32 dots use tf32 where torch's own CUDA fp32 matmuls would and exact fp32 otherwise
    (torch's default): see `kernels.attention_inputs.fp32_matmul_precision`.
    spec.dropout_p > 0 needs spec.dropout_seed: a 0-d int64 tensor on q's device (see the
    module doc). Lq <= 16 without dropout, attention terms and gradients runs the split-key
    decode kernel. Attention terms: see `ptuning_fast.prefix_attention` and
    kernels/attention_terms.py.
    """
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"prefix_attention: the Triton kernels take `q`, `k`, `v` in "
                        f"{[str(d) for d in KERNEL_DTYPES]}, got {q.dtype}; use "
                        "backend='reference' for float64")
    D = q.shape[-1]
    if D > MAX_HEAD_DIM:
        raise ValueError(f"prefix_attention: `q` head dim D={D} exceeds the Triton kernels' "
                         f"maximum {MAX_HEAD_DIM} (shape {tuple(q.shape)}); use "
                         "backend='reference'")
    if _takes_decode_path(q, k, v, prefix_k, prefix_v, spec):
        if torch.compiler.is_compiling() or type(q) is not torch.Tensor:
            # Traced, or a tensor subclass (fake, distributed): the op and its dispatch.
            scale = D ** -0.5 if spec.scale is None else float(spec.scale)
            return prefix_attention_decode_op(q, k, v, prefix_k, prefix_v, spec.attention_mask,
                                              spec.prefix_index, bool(spec.causal), scale)
        # Eager on plain tensors: the launcher itself. The op has no autograd formula and no
        # gradient is wanted here, so its dispatch would only add host time per layer and
        # decoding step (bench/NOTES.md, "Per-call host cost").
        return decode_kernels.prefix_attention_decode(q, k, v, prefix_k, prefix_v, spec)[0]
    out, _ = prefix_attention_op(q, k, v, prefix_k, prefix_v, *spec.flat())
    return out
