"""Attention terms beside the prefix, shared by the forward, dQ and dK/dV kernels: additive
bias, sliding window, logit soft-capping, per-head sinks and packed sequences.

Every kernel sees one key range at a time, either the prefix (columns [0, P) of the
concatenated keys) or the sequence (columns [P, P + Lk)). Visibility is an interval per query:
sequence key j is visible to query i iff `seq_lo[i] <= j <= seq_hi[i]` (and the padding mask),
with
    seq_lo[i] = max(i + shift - left, segment_start[i])
    seq_hi[i] = min(i + shift (causal), i + shift + right, segment_end[i] - 1)
(shift = Lk - Lq; an unbounded side passes UNBOUNDED, so one formula serves every case), and
prefix key c is visible iff `c >= pre_lo[i] = (i - segment_start[i]) + shift - prefix_left + P`
(the prefix sits at positions -P .. -1 before its query's sequence; prefix_left = UNBOUNDED
keeps it always visible). Because each bound is monotone in i, a block of queries sees one
contiguous key range: the kernels visit only that range (blocks wholly outside a window or
another packed sequence are never loaded) and mask only its edge blocks.

Logits in base 2: s = dot * qk_scale, or with soft-capping s = tanh(dot * softcap_scale) *
qk_scale (the launcher passes qk_scale = softcap * log2(e) and softcap_scale = scale / softcap),
then + bias * log2(e). The backward multiplies dS by tanh's derivative 1 - t^2 before the
dQ / dK products. Sinks join the forward's normalizer (m, l start at (sink, 1)), so the saved
LSE already holds them and the backward needs nothing more.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .attention_options import AttentionSpec
from .launch import define_kernels

LOG2E = 1.4426950408889634
# An unbounded window side. Bounds are int32 in the kernels: 2**30 keeps i + shift +- bound
# inside int32 for any length below 2**30.
UNBOUNDED = 2 ** 30
# The same values as the kernels read them (a @triton.jit function sees constexpr globals only).
_LOG2E = tl.constexpr(LOG2E)
_UNBOUNDED = tl.constexpr(UNBOUNDED)


define_kernels()     # before the first @triton.jit: see launch.interpreting


@triton.jit
def tanh(x):
    """tanh from exp2 (the interpreter has no libdevice). 1 - 2 / (e^2|x| + 1) loses relative
    accuracy near 0, so |x| < 0.25 takes the odd Taylor series to x^9 (error < 1e-8 there)."""
    a = tl.abs(x)
    big = 1.0 - 2.0 / (tl.math.exp2(a * 2.8853900817779268) + 1.0)    # 2 * log2(e)
    x2 = x * x
    small = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * 0.021869488536155203))))
    return tl.where(a < 0.25, small, tl.where(x < 0, -big, big))


@triton.jit
def logits(dot, qk_scale, softcap_scale, SOFTCAP: tl.constexpr):
    """(s, t): base-2 logits of a q.k tile and, with SOFTCAP, the tanh the backward needs."""
    if SOFTCAP:
        t = tanh(dot * softcap_scale)
        return t * qk_scale, t
    return dot * qk_scale, dot


@triton.jit
def softcap_grad(ds, t, SOFTCAP: tl.constexpr):
    """dS with respect to the uncapped scores: times d(cap tanh(x / cap))/dx = 1 - t^2."""
    if SOFTCAP:
        return ds * (1.0 - t * t)
    return ds


@triton.jit
def query_bounds(q_pos, q_ok, SegStart, SegEnd, key_len, key_shift, window_left, window_right,
                 prefix_left, prefix_len, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 IS_PACKED: tl.constexpr):
    """(seq_lo, seq_hi, pre_lo) for the queries q_pos (int32 vectors, see the module doc);
    SegStart/SegEnd at the batch row (read only when IS_PACKED)."""
    if IS_PACKED:
        seg_start = tl.load(SegStart + q_pos, mask=q_ok, other=0)
        seg_end = tl.load(SegEnd + q_pos, mask=q_ok, other=0)
        seq_lo = seg_start
        seq_hi = seg_end - 1
        local = q_pos - seg_start
    else:
        seq_lo = tl.zeros_like(q_pos)
        seq_hi = tl.zeros_like(q_pos) + (key_len - 1)
        local = q_pos
    if IS_CAUSAL:
        seq_hi = tl.minimum(seq_hi, q_pos + key_shift)
    if HAS_WINDOW:
        seq_lo = tl.maximum(seq_lo, q_pos + key_shift - window_left)
        seq_hi = tl.minimum(seq_hi, q_pos + key_shift + window_right)
        pre_lo = local + key_shift - prefix_left + prefix_len
    else:
        pre_lo = tl.zeros_like(q_pos)
    return seq_lo, seq_hi, pre_lo


@triton.jit
def block_ranges(lo, hi, ok, key_len, BLOCK_N: tl.constexpr):
    """(start, full_start, full_end, end) of the keys a query block visits: [start, end) holds
    every key some valid query (`ok`) sees (start a multiple of BLOCK_N); keys in
    [full_start, full_end) are inside every query's interval, so those blocks need no interval
    mask (only padding). Bounds come from `query_bounds`."""
    lo_min = tl.min(tl.where(ok, lo, _UNBOUNDED), 0)
    lo_max = tl.max(tl.where(ok, lo, -_UNBOUNDED), 0)
    hi_min = tl.min(tl.where(ok, hi, _UNBOUNDED), 0)
    hi_max = tl.max(tl.where(ok, hi, -_UNBOUNDED), 0)
    end = tl.minimum(tl.maximum(hi_max + 1, 0), key_len)
    # Keys all below the queries' floor (a prefix outside every window): an empty range.
    start = tl.where(lo_min >= end, end, tl.maximum(lo_min, 0) // BLOCK_N * BLOCK_N)
    full_start = tl.minimum(tl.maximum((lo_max + BLOCK_N - 1) // BLOCK_N * BLOCK_N, start), end)
    full_end = tl.minimum(tl.maximum(hi_min + 1, 0), key_len) // BLOCK_N * BLOCK_N
    full_end = tl.maximum(tl.minimum(full_end, end), full_start)
    return start, full_start, full_end, end


@triton.jit
def load_bias(Bias, rows, cols, rows_ok, cols_ok, stride_rows, stride_cols):
    """A bias tile (rows x cols of the (Lq, P + Lk) bias, either orientation) in base-2 units;
    Bias at (batch row, head)."""
    b = tl.load(Bias + rows.to(tl.int64) * stride_rows + cols.to(tl.int64) * stride_cols,
                mask=rows_ok & cols_ok, other=0.0)
    return b.to(tl.float32) * _LOG2E


# --------------------------------------------------------------------------------------------
# Launch side

# Each attention term's constexpr flag in the kernels, by its AttentionSpec field.
_TERM_FLAGS = dict(bias="HAS_BIAS", segments="IS_PACKED", window_size="HAS_WINDOW",
                   softcap="SOFTCAP", sinks="HAS_SINKS")


@dataclass(frozen=True)
class Terms:
    """What the kernels read for an `AttentionSpec`'s attention terms (kernels/
    attention_options.py holds their meaning): pointers (q stands in for absent tensors), int
    bounds, the soft-cap scale and the constexpr flags. Each launcher builds the one it uses
    from the spec it is given (`Terms.of`)."""
    spec: AttentionSpec

    @classmethod
    def of(cls, spec: AttentionSpec) -> "Terms":
        """The view of `spec` with sinks as contiguous fp32 (Hq,), segments as contiguous
        int32 (B, L) start, end (no copy where they already are: a second `of` on the view's
        spec copies nothing)."""
        sinks = None if spec.sinks is None else spec.sinks.float().contiguous()
        segments = None if spec.segments is None else tuple(
            t.to(torch.int32).contiguous() for t in spec.segments)
        return cls(replace(spec, sinks=sinks, segments=segments,
                           window_size=tuple(spec.window_size), softcap=float(spec.softcap)))

    @property
    def any(self) -> bool:
        """Some term is on: the autotuner's candidates differ (kernels/tiles.py)."""
        return bool(self.spec.terms_in_use())

    def qk_scales(self, scale: float) -> tuple[float, float]:
        """(qk_scale, softcap_scale) as `logits` takes them."""
        if self.spec.softcap > 0:
            return self.spec.softcap * LOG2E, scale / self.spec.softcap
        return scale * LOG2E, 1.0

    def pointers(self, like: torch.Tensor, sinks: bool = True) -> tuple:
        """Bias, Sinks, SegStart, SegEnd; without `sinks` for the backward kernels (the
        forward's LSE holds the sinks already)."""
        s = self.spec
        start, end = s.segments if s.segments is not None else (like, like)
        bias = like if s.bias is None else s.bias
        if not sinks:
            return bias, start, end
        return bias, like if s.sinks is None else s.sinks, start, end

    def ints(self) -> tuple:
        """window_left, window_right, prefix_left, stride_bias_b, _h, _l, _c, stride_seg_b."""
        s = self.spec
        left, right = (w if w >= 0 else UNBOUNDED for w in s.window_size)
        prefix_left = left if s.prefix_in_window else UNBOUNDED
        if s.bias is None:
            bias_strides = (0, 0, 0, 0)
        else:
            b = s.bias
            bias_strides = tuple(0 if b.shape[i] == 1 else b.stride(i) for i in range(2)) \
                + (b.stride(2), b.stride(3))
        seg_b = 0 if s.segments is None else s.segments[0].stride(0)
        return (left, right, prefix_left, *bias_strides, seg_b)

    def flags(self, sinks: bool = True) -> dict:
        """The kernels' constexpr flags, one a term, on where `AttentionSpec.terms_in_use`
        lists it; without HAS_SINKS for the backward kernels."""
        on = self.spec.terms_in_use()
        return {flag: term in on for term, flag in _TERM_FLAGS.items()
                if sinks or term != "sinks"}

    def key(self) -> tuple:
        """What changes the best tile (autotune key): which terms are on."""
        return tuple(self.flags().values())
