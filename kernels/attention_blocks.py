"""@triton.jit helpers shared by the attention kernels' loops over key blocks (forward, dQ,
decode): the online softmax in base 2, the causal key range of a query block and the one
visibility mask. Device functions only: they compile inline in the kernels that call them.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .attention_terms import block_ranges
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



# --- passes over two key ranges: the prefix's blocks, then the sequence's ---------------------
# The forward and dQ stream a query block's keys in three passes: a masked lower edge (only
# with a window or packing), the open blocks (no masks but padding) and a masked upper edge.
# Each pass is one loop over both K/V sources, so the prefix blocks share the sequence's
# software pipeline (one prologue, one drain) instead of running in loops of their own.
# Columns number the keys of [prefix; sequence] (prefix c -> c, sequence j -> P + j): the bias
# and dropout index them, and the upper bound is one loop-invariant column vector for both
# sources.

@triton.jit
def key_passes(q_start, q_ok, pre_lo, seq_lo, seq_hi, prefix_len, key_len, key_shift,
               IS_CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, PREFIX_OPEN: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(pre_cuts, seq_cuts, hi_col) of the query block [q_start, q_start + BLOCK_M): pass n
    (0 lower edge, 1 open, 2 upper edge) streams the prefix's keys [pre_cuts[n],
    pre_cuts[n + 1]) then the sequence's [seq_cuts[n], seq_cuts[n + 1]). Bounds as
    `attention_terms.query_bounds` gives them (WINDOWED: a window or packed sequences; without,
    pre_lo and seq_lo are unused). The whole prefix blocks are open with PREFIX_OPEN (the
    partial one in the upper edge), else the prefix is in the upper edge; with WINDOWED the
    prefix (what some query's window reaches) is in the lower edge. Without WINDOWED the lower
    edge's cuts are the constant 0: its loop, and every select in it, folds away."""
    if WINDOWED:
        low_pre, _, _, _ = block_ranges(pre_lo, pre_lo, q_ok, prefix_len, BLOCK_N=BLOCK_N)
        low_seq, open_seq, high_seq, end = block_ranges(seq_lo, seq_hi, q_ok, key_len,
                                                        BLOCK_N=BLOCK_N)
        pre_cuts = (low_pre, prefix_len, prefix_len, prefix_len)
        seq_cuts = (low_seq, open_seq, high_seq, end)
    else:
        high_seq, end = sequence_key_range(q_start, key_shift, key_len, IS_CAUSAL=IS_CAUSAL,
                                           BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
        if PREFIX_OPEN:
            pre_cuts = (0, 0, prefix_len // BLOCK_N * BLOCK_N, prefix_len)
        else:
            pre_cuts = (0, 0, 0, prefix_len)
        seq_cuts = (0, 0, high_seq, end)
    # The sequence's upper bound as a column bound for both sources: clamped at -1, every
    # prefix column (< P) stays visible and the same sequence keys are hidden.
    return pre_cuts, seq_cuts, tl.maximum(seq_hi, -1) + prefix_len


@triton.jit
def pass_plan(pre_cuts, seq_cuts, PASS: tl.constexpr, BLOCK_N: tl.constexpr):
    """(blocks, plan) of pass PASS (`key_passes`): its blocks, the prefix's then the
    sequence's, and what `key_block` reads of them: (prefix blocks, the prefix's first key, the
    sequence's first key less the prefix blocks' keys), computed once a pass."""
    pre_blocks = tl.maximum(tl.cdiv(pre_cuts[PASS + 1] - pre_cuts[PASS], BLOCK_N), 0)
    blocks = pre_blocks + tl.maximum(tl.cdiv(seq_cuts[PASS + 1] - seq_cuts[PASS], BLOCK_N), 0)
    return blocks, (pre_blocks, pre_cuts[PASS], seq_cuts[PASS] - pre_blocks * BLOCK_N)


@triton.jit
def key_block(i, plan, sources, pre_lo, seq_lo, hi_col, CHECK_LO: tl.constexpr,
              HAS_MASK: tl.constexpr, HI_INSIDE: tl.constexpr, BLOCK_N: tl.constexpr,
              USE_TMA: tl.constexpr = False):
    """Block i of a pass (i < `pass_plan`'s blocks) of `sources` = (PK, PV, stride_pk_l,
    stride_pv_l, prefix_len, K, V, Mask, stride_k_l, stride_v_l, stride_mask_l, key_len):
    (start, keys, cols, key_ok, lo, hi, (k, v, stride_k, stride_v)).
    keys: indices in the block's source, the prefix's or the sequence's (from start); cols:
    their columns; key_ok: inside the source and, with HAS_MASK, not padded (the mask, at the
    batch row, covers the sequence only; a padded key is never read: NaN or inf there, times 0,
    must not reach the result). lo, hi: the column bounds `hide_keys` checks on this block:
    prefix key c needs c >= pre_lo, sequence key j j >= seq_lo (CHECK_LO), both their column <=
    hi_col (`key_passes`); with HI_INSIDE the prefix's bound is its length (its partial block
    has no causal bound to imply it). k, v: the source's K and V with their row strides, or with
    USE_TMA its descriptors (chosen per block: the software pipeline issues later blocks' loads,
    of either source). Few operations: the interpreter (the CPU tests) pays for each one, and a
    call of a jit function costs it a scan of triton.language."""
    PK, PV, stride_pk_l, stride_pv_l, prefix_len, K, V, Mask, stride_k_l, stride_v_l, \
        stride_mask_l, key_len = sources
    pre_blocks, pre_start, seq_start = plan
    pre = i < pre_blocks
    start = tl.where(pre, pre_start, seq_start) + i * BLOCK_N
    keys = start + tl.arange(0, BLOCK_N)
    key_ok = keys < tl.where(pre, prefix_len, key_len)
    if HAS_MASK:
        # (where, not `&` with a scalar: the interpreter rejects that mask's dtype)
        padded = tl.load(Mask + keys * stride_mask_l, mask=tl.where(pre, False, key_ok),
                         other=1) == 0
        key_ok = key_ok & ~padded
    if CHECK_LO:
        lo = tl.where(pre, pre_lo, seq_lo + prefix_len)
    else:
        lo = pre_lo
    if HI_INSIDE:
        hi = tl.where(pre, prefix_len - 1, hi_col)
    else:
        hi = hi_col
    if USE_TMA:
        if pre:
            k = PK
            v = PV
        else:
            k = K
            v = V
        kv = (k, v, 1, 1)
    else:
        kv = (tl.where(pre, PK, K), tl.where(pre, PV, V), tl.where(pre, stride_pk_l, stride_k_l),
              tl.where(pre, stride_pv_l, stride_v_l))
    return start, keys, tl.where(pre, 0, prefix_len) + keys, key_ok, lo, hi, kv
