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
from ..kernels.attention_terms import Terms
from .support import KERNEL_DTYPES, MAX_HEAD_DIM


@torch.library.custom_op("ptuning_fast::prefix_attention", mutates_args=())
def prefix_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        prefix_k: torch.Tensor | None, prefix_v: torch.Tensor | None,
                        attention_mask: torch.Tensor | None, prefix_index: torch.Tensor | None,
                        causal: bool, scale: float, dropout_p: float = 0.0,
                        dropout_seed: torch.Tensor | None = None,
                        bias: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
                        seg_start: torch.Tensor | None = None,
                        seg_end: torch.Tensor | None = None, window_left: int = -1,
                        window_right: int = -1, prefix_in_window: bool = True,
                        softcap: float = 0.0
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    return fwd_kernels.prefix_attention_fwd(
        q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, causal=causal, scale=scale,
        dropout_p=dropout_p, dropout_seed=dropout_seed,
        terms=_terms(bias, sinks, seg_start, seg_end, window_left, window_right,
                     prefix_in_window, softcap))


def _terms(bias, sinks, seg_start, seg_end, window_left, window_right, prefix_in_window,
           softcap) -> Terms:
    """The ops' flat arguments (a custom op takes no tuples of optional tensors) as Terms."""
    return Terms(bias, sinks, None if seg_start is None else (seg_start, seg_end),
                 (window_left, window_right), prefix_in_window, softcap)


@prefix_attention_op.register_fake
def _(q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, causal, scale, dropout_p=0.0,
      dropout_seed=None, *terms):
    B, Hq, Lq, D = q.shape
    # Same layout as the kernel's output: (B, Lq, Hq, D) memory seen as (B, Hq, Lq, D).
    out = q.new_empty(B, Lq, Hq, D).transpose(1, 2)
    return out, q.new_empty(B, Hq, Lq, dtype=torch.float32)


@torch.library.custom_op("ptuning_fast::prefix_attention_bwd", mutates_args=())
def prefix_attention_bwd_op(
        grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        prefix_k: torch.Tensor | None, prefix_v: torch.Tensor | None,
        attention_mask: torch.Tensor | None, prefix_index: torch.Tensor | None,
        out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float,
        needs: list[bool], dropout_p: float = 0.0,
        dropout_seed: torch.Tensor | None = None,
        bias: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
        seg_start: torch.Tensor | None = None,
        seg_end: torch.Tensor | None = None, window_left: int = -1,
        window_right: int = -1, prefix_in_window: bool = True,
        softcap: float = 0.0) -> list[torch.Tensor]:
    grads = bwd_kernels.prefix_attention_bwd(
        grad_out, q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, out, lse,
        causal=causal, scale=scale, needs=tuple(needs), dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        terms=_terms(bias, sinks, seg_start, seg_end, window_left, window_right,
                     prefix_in_window, softcap))
    # A custom op cannot return None: a gradient nobody asked for is an empty placeholder.
    return [g if g is not None else q.new_empty(0) for g in grads]


@prefix_attention_bwd_op.register_fake
def _(grad_out, q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, out, lse, causal,
      scale, needs, dropout_p=0.0, dropout_seed=None, *terms):
    like = (q, k, v, prefix_k, prefix_v)
    return [torch.empty_like(t) if need else q.new_empty(0) for t, need in zip(like, needs)]


def _setup_context(ctx, inputs, output):
    # torch.library passes every input of the schema, defaults filled in: after dropout_seed
    # come bias, sinks, seg_start, seg_end (tensors), then window_left, window_right,
    # prefix_in_window, softcap.
    (q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, causal, scale, dropout_p,
     dropout_seed, bias, sinks, seg_start, seg_end, *scalars) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, out, lse,
                          dropout_seed, bias, sinks, seg_start, seg_end)
    ctx.causal, ctx.scale, ctx.dropout_p, ctx.scalars = causal, scale, dropout_p, scalars
    ctx.num_inputs = len(inputs)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    (q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, out, lse,
     dropout_seed, bias, sinks, seg_start, seg_end) = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:5]]
    if not any(needs):
        return (None,) * ctx.num_inputs
    grads = prefix_attention_bwd_op(grad_out, q, k, v, prefix_k, prefix_v, attention_mask,
                                    prefix_index, out, lse, ctx.causal, ctx.scale, needs,
                                    ctx.dropout_p, dropout_seed, bias, sinks, seg_start,
                                    seg_end, *ctx.scalars)
    return (*[g if need else None for g, need in zip(grads, needs)],) \
        + (None,) * (ctx.num_inputs - 5)


prefix_attention_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("ptuning_fast::prefix_attention_decode", mutates_args=())
def prefix_attention_decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               prefix_k: torch.Tensor | None, prefix_v: torch.Tensor | None,
                               attention_mask: torch.Tensor | None,
                               prefix_index: torch.Tensor | None, causal: bool,
                               scale: float) -> torch.Tensor:
    return _decode(q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, causal, scale)


def _decode(q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, causal, scale):
    out, _ = decode_kernels.prefix_attention_decode(q, k, v, prefix_k, prefix_v, attention_mask,
                                                    prefix_index, causal=causal, scale=scale)
    return out


@prefix_attention_decode_op.register_fake
def _(q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, causal, scale):
    B, Hq, Lq, D = q.shape
    return q.new_empty(B, Lq, Hq, D).transpose(1, 2)


def _takes_decode_path(q, k, v, prefix_k, prefix_v, dropout_p, terms: Terms) -> bool:
    """Few queries, no dropout, no attention terms (the decode kernel computes none of them),
    and no gradient that autograd could ask for: the decode op has no backward (it keeps no
    LSE for one)."""
    if dropout_p > 0 or terms.any or not decode_kernels.supports(q.shape[2]):
        return False
    return not (torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, prefix_k, prefix_v)))


def prefix_attention_fused(q, k, v, prefix_k=None, prefix_v=None, *, causal=True,
                           attention_mask=None, scale=None, prefix_index=None, dropout_p=0.0,
                           dropout_seed=None, bias=None, window_size=(-1, -1),
                           prefix_in_window=True, softcap=0.0, sinks=None, segments=None):
    """Triton prefix attention; inputs already validated by `ptuning_fast.ops.prefix_attention`.

    Returns (B, Hq, Lq, D) in q's dtype, laid out as (B, Lq, Hq, D) in memory, so that
    `out.transpose(1, 2).reshape(B, Lq, Hq * D)` needs no copy. fp16/bf16/fp32, D <= 256.
    fp32 dots use tf32 where torch's own CUDA fp32 matmuls would and exact fp32 otherwise
    (torch's default): see `kernels.attention_inputs.fp32_matmul_precision`.
    dropout_p > 0 needs dropout_seed: a 0-d int64 tensor on q's device (see the module doc).
    Lq <= 16 without dropout, attention terms and gradients runs the split-key decode kernel.
    Attention terms (bias, window_size, prefix_in_window, softcap, sinks, packed `segments`):
    see `ptuning_fast.prefix_attention` and kernels/attention_terms.py.
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
    scale = D ** -0.5 if scale is None else float(scale)
    dropout_p = float(dropout_p)
    terms = Terms(bias, sinks, segments, tuple(window_size), prefix_in_window, float(softcap))
    if _takes_decode_path(q, k, v, prefix_k, prefix_v, dropout_p, terms):
        if torch.compiler.is_compiling() or type(q) is not torch.Tensor:
            # Traced, or a tensor subclass (fake, distributed): the op and its dispatch.
            return prefix_attention_decode_op(q, k, v, prefix_k, prefix_v, attention_mask,
                                              prefix_index, bool(causal), scale)
        # Eager on plain tensors: the launcher itself. The op has no autograd formula and no
        # gradient is wanted here, so its dispatch would only add ~10 us of host time per
        # layer and decoding step (bench/NOTES.md, "Per-call host cost").
        return _decode(q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, bool(causal),
                       scale)
    if terms.any:
        seg_start, seg_end = segments if segments is not None else (None, None)
        out, _ = prefix_attention_op(q, k, v, prefix_k, prefix_v, attention_mask, prefix_index,
                                     bool(causal), scale, dropout_p,
                                     dropout_seed if dropout_p > 0 else None, bias, sinks,
                                     seg_start, seg_end, int(window_size[0]),
                                     int(window_size[1]), bool(prefix_in_window), float(softcap))
    elif dropout_p > 0:
        out, _ = prefix_attention_op(q, k, v, prefix_k, prefix_v, attention_mask, prefix_index,
                                     bool(causal), scale, dropout_p, dropout_seed)
    else:
        # The exact call (and traced graph) of the dropout-free op, seed and p left out.
        out, _ = prefix_attention_op(q, k, v, prefix_k, prefix_v, attention_mask, prefix_index,
                                     bool(causal), scale)
    return out
