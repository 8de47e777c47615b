"""@triton.jit helpers shared by the attention kernels' loops over key blocks (forward, dQ,
decode): the online softmax in base 2, the causal key range of a query block and the one
visibility mask. Device functions only: they compile inline in the kernels that call them.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .launch import define_kernels


define_kernels()     # before the first @triton.jit: see launch.interpreting

@triton.jit
def online_softmax(s, m_i, l_i, scale):
    """One block of the online softmax in base 2, for the scores s * scale (rows x keys;
    scale > 0) and the running (max, normalizer) of each row: (p, alpha, m_new, l_new), with
    acc to be rescaled by alpha. The scale is applied inside exp2's argument (one FFMA a score,
    as Triton's fused-attention tutorial does; the row max commutes with a scale > 0) instead
    of a multiply of every score before the max; pass 1.0 for scores scaled already.
    A row that has seen only masked keys keeps m = -inf; shifting by 0 instead keeps its
    probabilities exactly 0 rather than NaN (-inf - -inf)."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s * scale - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def sequence_key_range(q_start, key_shift, key_len, IS_CAUSAL: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(full_end, end) of the sequence keys a query block [q_start, q_start + BLOCK_M) visits:
    keys [0, full_end) are visible to every row of the block and lie inside Lk (no masks but
    padding); [full_end, end) need the bounds and causal masks; keys >= end are hidden from the
    whole block (bottom-right causal: key j is visible to query i iff j <= i + key_shift)."""
    if IS_CAUSAL:
        end = tl.minimum(tl.maximum(q_start + BLOCK_M + key_shift, 0), key_len)
        full_end = tl.minimum(tl.maximum(q_start + key_shift + 1, 0), end) // BLOCK_N * BLOCK_N
    else:
        end = key_len
        full_end = key_len // BLOCK_N * BLOCK_N
    return full_end, end


@triton.jit
def hide_keys(s, keys, key_ok, key_lo, key_hi, CHECK_KEYS: tl.constexpr,
              CHECK_LO: tl.constexpr, CHECK_HI: tl.constexpr, HAS_MASK: tl.constexpr,
              HI_INSIDE: tl.constexpr = False):
    """The scores s (query rows x keys) with -inf where a key is hidden from a row: key_ok
    False (past the range, or padded out when HAS_MASK), and with CHECK_KEYS, outside the
    row's interval key_lo[r] <= key (CHECK_LO), key <= key_hi[r] (CHECK_HI). Hidden keys go to
    -inf before any exp2, so large logits cannot overflow there. A block neither checked nor
    padded is returned as it is (no select is generated). HI_INSIDE: key_hi[r] < the range's
    length for every row whose result is stored (the bottom-right causal bound), so the
    CHECK_HI test hides the keys past the end for those rows and the bounds test is left out
    (rows past the end are computed but never stored)."""
    if CHECK_KEYS or HAS_MASK:
        visible = key_ok[None, :]
        if CHECK_KEYS:
            if CHECK_HI and HI_INSIDE and not HAS_MASK:
                visible = keys[None, :] <= key_hi[:, None]
            elif CHECK_HI:
                visible = visible & (keys[None, :] <= key_hi[:, None])
            if CHECK_LO:
                visible = visible & (keys[None, :] >= key_lo[:, None])
        s = tl.where(visible, s, float("-inf"))
    return s

