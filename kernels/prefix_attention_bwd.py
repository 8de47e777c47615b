"""Prefix attention backward: dQ, dK, dV and dPrefixK, dPrefixV without atomics.

FlashAttention-2's identity, with the forward's global LSE: P = exp2(s * scale * log2(e) - LSE),
dV = P^T dO, dP = dO V^T, dS = P * (dP - Delta) with Delta = rowsum(dO * O), dQ = scale dS K,
dK = scale dS^T Q. It holds column by column, so the prefix columns get their gradients from the
same formula as the sequence columns (checked against the float64 reference in the tests).

With dropout (keep-mask M regenerated from the forward's seed, see attention_dropout.py):
dV = (P * M / (1 - p))^T dO and dP = (dO V^T) * M / (1 - p); dS = P * (dP - Delta) keeps the
undropped P, and Delta = rowsum(dO * O) still equals rowsum(P * dP) because O is the dropped
output.

Programs and what each owns (every output tile has exactly one writer, summed in a fixed order:
the backward is bitwise deterministic and uses no float atomics):
- `_delta_kernel`: Delta per (batch row, query head, query block).
- `_dkdv_kernel`: dK, dV of one (batch row, kv head, key block); loops over the query heads of
  the group and the query blocks that can see the keys (causal: the earlier ones are skipped).
- `_prefix_dkdv_kernel`: an fp32 partial of dPrefixK, dPrefixV of one (prefix slot, kv head,
  prefix block), where a slot is the shared prefix, one row's prefix, or one task's prefix;
  loops over one split of the (row, query head, query block) items of the rows that read the
  slot. `split_reduce.sum_splits` adds each slot's partials in split order.
- `_dq_kernel` (in prefix_attention_bwd_dq.py): dQ of one (batch row, query head, query
  block), over the prefix and the visible sequence keys.
Only the kernels whose gradients autograd asks for are launched.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_dropout import dropout_keep, seed_arg
from .attention_inputs import AttentionInputs, input_precision, strides3
from .attention_options import AttentionSpec
from .attention_specs import spec_ints, spec_variants, term_compile_specs
from .attention_terms import Terms, load_bias, logits, query_bounds, softcap_grad
from .autotune import fixed_config, launch_tuned, length_bucket
from .compile_specs import CompileSpec, spec_signature
from .launch import cdiv, contiguous_last, define_kernels, num_splits, on_input_device
from .split_reduce import plan_task_splits, sum_splits, task_split
from .tiles import CANDIDATES, TileConfig, head_block, prefix_tile, spec_configs
from .prefix_attention_bwd_dq import prefix_attention_dq

define_kernels()     # before the first @triton.jit: see launch.interpreting


@triton.jit
def _delta_kernel(
    Delta, Out, DO,
    q_len, head_dim,
    stride_o_b, stride_o_h, stride_o_l,
    stride_do_b, stride_do_h, stride_do_l,
    stride_delta_b, stride_delta_h,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    q_block = tl.program_id(0)
    q_head = tl.program_id(1).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64)
    q_pos = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    tile_mask = (q_pos < q_len)[:, None] & (offs_d < head_dim)[None, :]
    rows = q_pos[:, None].to(tl.int64)
    o = tl.load(Out + batch * stride_o_b + q_head * stride_o_h + rows * stride_o_l
                + offs_d[None, :], mask=tile_mask, other=0.0)
    do = tl.load(DO + batch * stride_do_b + q_head * stride_do_h + rows * stride_do_l
                 + offs_d[None, :], mask=tile_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + batch * stride_delta_b + q_head * stride_delta_h + q_pos, delta,
             mask=q_pos < q_len)


@triton.jit
def _dkdv_blocks(
    dk, dv, k, v, key_visible,
    Q, DO, Lse, Delta, Bias,     # already at (row, query head); Lse/Delta contiguous over l
    SegStart, SegEnd,            # at the row (read only with IS_PACKED)
    start, end,                  # query range [start, end); start is a multiple of BLOCK_M
    stride_q_l, stride_do_l, stride_bias_l, stride_bias_c,
    q_len, key_len, prefix_len, head_dim, key_pos, key_ok, col0, key_shift,
    window_left, window_right, prefix_left, qk_scale, softcap_scale,
    seed, dropout_p, rng_row0, rng_cols, num_cols,   # dropout: Philox row of this head's
                                                     # query 0, the block's columns (BLOCK_N,)
                                                     # int64 and P + Lk (see the forward)
    CAUSAL_MASK: tl.constexpr,   # some query of this range sees only part of the key block
    BOUNDS: tl.constexpr,        # 0: none; 1: sequence keys' per-query interval; 2: prefix
                                 # keys' window floor (attention_terms.query_bounds)
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, IS_PACKED: tl.constexpr,
    HAS_MASK: tl.constexpr,      # key_visible holds the key-padding mask
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Adds the contribution of queries [start, end) to (dk, dv) of one key block (transposed
    form: rows are keys, so no tile is transposed in registers except q and dO)."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    for start_m in range(start, end, BLOCK_M):
        q_pos = start_m + tl.arange(0, BLOCK_M)
        row_ok = q_pos < q_len
        rows = q_pos[:, None].to(tl.int64)
        tile_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + rows * stride_q_l + offs_d[None, :], mask=tile_mask, other=0.0)
        do = tl.load(DO + rows * stride_do_l + offs_d[None, :], mask=tile_mask, other=0.0)
        # Queries past Lq get LSE = +inf: their probabilities are exactly 0.
        lse = tl.load(Lse + q_pos, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + q_pos, mask=row_ok, other=0.0)
        st, t = logits(tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION), qk_scale,
                       softcap_scale, SOFTCAP=SOFTCAP)
        if HAS_BIAS:
            st += load_bias(Bias, q_pos[None, :], col0 + key_pos[:, None], row_ok[None, :],
                            key_ok[:, None], stride_bias_l, stride_bias_c)
        if CAUSAL_MASK:
            st = tl.where(key_pos[:, None] <= q_pos[None, :] + key_shift, st, float("-inf"))
        if BOUNDS != 0:
            seq_lo, seq_hi, pre_lo = query_bounds(
                q_pos, row_ok, SegStart, SegEnd, key_len, key_shift, window_left, window_right,
                prefix_left, prefix_len, IS_CAUSAL=IS_CAUSAL, HAS_WINDOW=HAS_WINDOW,
                IS_PACKED=IS_PACKED)
            if BOUNDS == 1:
                inside = (key_pos[:, None] >= seq_lo[None, :]) \
                    & (key_pos[:, None] <= seq_hi[None, :])
            else:
                inside = key_pos[:, None] >= pre_lo[None, :]
            st = tl.where(inside, st, float("-inf"))
        if HAS_MASK:
            st = tl.where(key_visible[:, None], st, float("-inf"))
        pt = tl.math.exp2(st - lse[None, :])
        if HAS_DROPOUT:
            rows = (rng_row0 + q_pos) * num_cols
            keep = dropout_keep(seed, rng_cols[:, None] + rows[None, :], dropout_p)
            inv_keep = 1.0 / (1.0 - dropout_p)
            dv += tl.dot(tl.where(keep, pt * inv_keep, 0.0).to(do.dtype), do,
                         input_precision=INPUT_PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
            dpt = tl.where(keep, dpt * inv_keep, 0.0)
        else:
            dv += tl.dot(pt.to(do.dtype), do, input_precision=INPUT_PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        dst = softcap_grad(pt * (dpt - delta[None, :]), t, SOFTCAP=SOFTCAP)
        dk += tl.dot(dst.to(q.dtype), q, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    DK, DV, Q, K, V, DO, Lse, Delta, Mask, Seed,
    Bias, SegStart, SegEnd,      # attention terms (attention_terms.py), read when flagged
    q_len, key_len, prefix_len, head_dim, group_size, scale, qk_scale, dropout_p,
    softcap_scale,
    stride_q_b, stride_q_h, stride_q_l,
    stride_k_b, stride_k_h, stride_k_l,
    stride_v_b, stride_v_h, stride_v_l,
    stride_do_b, stride_do_h, stride_do_l,
    stride_dk_b, stride_dk_h, stride_dk_l,
    stride_dv_b, stride_dv_h, stride_dv_l,
    stride_lse_b, stride_lse_h,          # Lse and Delta share one (B, Hq, Lq) layout
    stride_mask_b, stride_mask_l,
    window_left, window_right, prefix_left,
    stride_bias_b, stride_bias_h, stride_bias_l, stride_bias_c,
    stride_seg_b,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr = False, IS_PACKED: tl.constexpr = False,
    HAS_WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
):
    key_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    key_pos = key_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    tile_mask = (key_pos < key_len)[:, None] & (offs_d < head_dim)[None, :]
    if HAS_MASK:
        key_visible = tl.load(Mask + batch * stride_mask_b + key_pos * stride_mask_l,
                              mask=key_pos < key_len, other=0) != 0
    else:
        key_visible = key_pos < key_len
    keys = key_pos[:, None].to(tl.int64)
    # A padded key is never read (zeros, as one past the end): NaN or inf there (0 * NaN in
    # dO V^T) must not reach a gradient; its dk, dv are stored as zeros.
    read_mask = key_visible[:, None] & (offs_d < head_dim)[None, :]
    k = tl.load(K + batch * stride_k_b + kv_head.to(tl.int64) * stride_k_h + keys * stride_k_l
                + offs_d[None, :], mask=read_mask, other=0.0)
    v = tl.load(V + batch * stride_v_b + kv_head.to(tl.int64) * stride_v_h + keys * stride_v_l
                + offs_d[None, :], mask=read_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(Seed)
        rng_cols = (prefix_len + key_pos).to(tl.int64)     # sequence keys follow the prefix
    else:
        seed = 0
        rng_cols = key_pos

    key_shift = key_len - q_len
    key_start = key_block * BLOCK_N
    if HAS_MASK:
        # A fully padded key block has zero gradients: skip its queries altogether.
        end = tl.where(tl.max(key_visible.to(tl.int32), 0) > 0, q_len, 0)
    else:
        end = q_len
    seg_start = SegStart + batch * stride_seg_b
    seg_end = SegEnd + batch * stride_seg_b
    if HAS_WINDOW or IS_PACKED:
        # The queries that see some key of [key_start, last]: the causal and window bounds
        # inverted, and (packed, Lq == Lk) the segments of the block's first and last keys.
        # Every block of them is masked with the per-query interval.
        last = tl.minimum(key_start + BLOCK_N, key_len) - 1
        first_q = 0
        if IS_CAUSAL:
            first_q = tl.maximum(first_q, key_start - key_shift)
        if HAS_WINDOW:
            first_q = tl.maximum(first_q, key_start - key_shift - window_right)
            end = tl.minimum(end, last - key_shift + window_left + 1)
        if IS_PACKED:
            first_q = tl.maximum(first_q, tl.load(seg_start + key_start))
            end = tl.minimum(end, tl.load(seg_end + last))
        end = tl.maximum(end, 0)
        start = tl.minimum(first_q, end) // BLOCK_M * BLOCK_M
        full_start = end
    elif IS_CAUSAL:
        # Query i sees key j iff i >= j - key_shift: queries before the block's first key see
        # none of it (skipped); from `full_start` on, every query sees the whole block.
        start = tl.minimum(tl.maximum(key_start - key_shift, 0), end) // BLOCK_M * BLOCK_M
        full_start = tl.minimum(tl.maximum(key_start + BLOCK_N - 1 - key_shift, 0), end)
        full_start = tl.maximum((full_start + BLOCK_M - 1) // BLOCK_M * BLOCK_M, start)
    else:
        start = 0
        full_start = 0

    key_ok = key_pos < key_len
    num_heads = tl.num_programs(1) * group_size
    for h in range(0, group_size):
        q_head = (kv_head * group_size + h).to(tl.int64)
        rng_row0 = (batch * num_heads + q_head) * q_len
        q_ptr = Q + batch * stride_q_b + q_head * stride_q_h
        do_ptr = DO + batch * stride_do_b + q_head * stride_do_h
        lse_ptr = Lse + batch * stride_lse_b + q_head * stride_lse_h
        delta_ptr = Delta + batch * stride_lse_b + q_head * stride_lse_h
        bias = Bias + batch * stride_bias_b + q_head * stride_bias_h
        dk, dv = _dkdv_blocks(
            dk, dv, k, v, key_visible, q_ptr, do_ptr, lse_ptr, delta_ptr, bias, seg_start,
            seg_end, start, full_start, stride_q_l, stride_do_l, stride_bias_l, stride_bias_c,
            q_len, key_len, prefix_len, head_dim, key_pos, key_ok, prefix_len, key_shift,
            window_left, window_right, prefix_left, qk_scale, softcap_scale,
            seed, dropout_p, rng_row0, rng_cols, prefix_len + key_len,
            CAUSAL_MASK=IS_CAUSAL and not (HAS_WINDOW or IS_PACKED),
            BOUNDS=1 if HAS_WINDOW or IS_PACKED else 0, IS_CAUSAL=IS_CAUSAL,
            HAS_WINDOW=HAS_WINDOW, IS_PACKED=IS_PACKED, HAS_MASK=HAS_MASK, HAS_BIAS=HAS_BIAS,
            SOFTCAP=SOFTCAP, HAS_DROPOUT=HAS_DROPOUT, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
            INPUT_PRECISION=INPUT_PRECISION)
        dk, dv = _dkdv_blocks(
            dk, dv, k, v, key_visible, q_ptr, do_ptr, lse_ptr, delta_ptr, bias, seg_start,
            seg_end, full_start, end, stride_q_l, stride_do_l, stride_bias_l, stride_bias_c,
            q_len, key_len, prefix_len, head_dim, key_pos, key_ok, prefix_len, key_shift,
            window_left, window_right, prefix_left, qk_scale, softcap_scale,
            seed, dropout_p, rng_row0, rng_cols, prefix_len + key_len,
            CAUSAL_MASK=False, BOUNDS=0, IS_CAUSAL=IS_CAUSAL, HAS_WINDOW=HAS_WINDOW,
            IS_PACKED=IS_PACKED, HAS_MASK=HAS_MASK, HAS_BIAS=HAS_BIAS, SOFTCAP=SOFTCAP,
            HAS_DROPOUT=HAS_DROPOUT, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
            INPUT_PRECISION=INPUT_PRECISION)

    dk = dk * scale
    tl.store(DK + batch * stride_dk_b + kv_head.to(tl.int64) * stride_dk_h + keys * stride_dk_l
             + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=tile_mask)
    tl.store(DV + batch * stride_dv_b + kv_head.to(tl.int64) * stride_dv_h + keys * stride_dv_l
             + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=tile_mask)


@triton.jit
def _prefix_dkdv_kernel(
    PartialK, PartialV,          # fp32 (splits, Hkv, P, D), dense: one tile per program
    Q, PK, PV, DO, Lse, Delta,
    Order, TaskRows, TaskSplits, SplitTask,   # per-task plan (split_reduce.TaskSplits), read
                                              # only with HAS_INDEX
    Seed,
    Bias, SegStart, SegEnd,      # attention terms (attention_terms.py), read when flagged
    q_len, key_len, prefix_len, head_dim, group_size, qk_scale, dropout_p, softcap_scale,
    rows_step, rows_per_slot,    # without HAS_INDEX, slot s reads rows [s * rows_step, + rows_per_slot)
    splits_per_slot, items_per_split,   # a slot's (row, query head, query block) items, split evenly
    stride_q_b, stride_q_h, stride_q_l,
    stride_pk_s, stride_pk_h, stride_pk_l,
    stride_pv_s, stride_pv_h, stride_pv_l,
    stride_do_b, stride_do_h, stride_do_l,
    stride_lse_b, stride_lse_h,
    window_left, window_right, prefix_left,
    stride_bias_b, stride_bias_h, stride_bias_l, stride_bias_c,
    stride_seg_b,
    HAS_INDEX: tl.constexpr,     # per-task slots: the plan says which task and rows a split has
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr = False, IS_PACKED: tl.constexpr = False,
    HAS_WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
):
    # The split is axis 0: the split count grows with the work and would pass the 65,535
    # programs of axes 1 and 2 (CUDA's limit).
    split = tl.program_id(0)
    key_block = tl.program_id(1)
    kv_head = tl.program_id(2).to(tl.int64)
    q_blocks = tl.cdiv(q_len, BLOCK_M)
    if HAS_INDEX:
        slot, first, first_row, slot_rows = task_split(split, TaskRows, TaskSplits, SplitTask,
                                                       items_per_split)
    else:
        slot = split // splits_per_slot
        first = (split % splits_per_slot) * items_per_split
        first_row = (slot * rows_step).to(tl.int64)
        slot_rows = rows_per_slot
    key_pos = key_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    tile_mask = (key_pos < prefix_len)[:, None] & (offs_d < head_dim)[None, :]
    keys = key_pos[:, None].to(tl.int64)
    slot64 = slot.to(tl.int64)
    k = tl.load(PK + slot64 * stride_pk_s + kv_head * stride_pk_h + keys * stride_pk_l
                + offs_d[None, :], mask=tile_mask, other=0.0)
    v = tl.load(PV + slot64 * stride_pv_s + kv_head * stride_pv_h + keys * stride_pv_l
                + offs_d[None, :], mask=tile_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)

    if HAS_DROPOUT:
        seed = tl.load(Seed)
        rng_cols = key_pos.to(tl.int64)                     # prefix keys are columns [0, P)
    else:
        seed = 0
        rng_cols = key_pos
    num_heads = tl.num_programs(2) * group_size

    # The slot's items are (row, query head, query block) in that order; this split owns
    # [first, last). It walks them as runs of consecutive query blocks of one (row, head), so
    # the inner loop over query blocks stays one pipelined loop. Every query sees every prefix
    # key (no causal or padding mask) but for a window that counts the prefix: then only the
    # queries near their sequence's start see it (unpacked: a prefix of the rows).
    key_ok = key_pos < prefix_len
    key_shift = key_len - q_len
    if HAS_WINDOW and not IS_PACKED:
        last_key = tl.minimum(key_block * BLOCK_N + BLOCK_N, prefix_len) - 1
        q_stop = tl.maximum(last_key - prefix_len - key_shift + prefix_left + 1, 0)
    else:
        q_stop = q_len
    total = slot_rows * group_size * q_blocks
    last = tl.minimum(first + items_per_split, total)
    for pair in range(first // q_blocks, tl.cdiv(last, q_blocks)):
        if HAS_INDEX:
            batch = tl.load(Order + first_row + pair // group_size)
        else:
            batch = first_row + pair // group_size
        q_head = (kv_head * group_size + pair % group_size).to(tl.int64)
        start = tl.maximum(first - pair * q_blocks, 0) * BLOCK_M
        end = tl.minimum(tl.minimum(last - pair * q_blocks, q_blocks) * BLOCK_M, q_len)
        end = tl.minimum(end, q_stop)
        dk, dv = _dkdv_blocks(
            dk, dv, k, v, key_ok,
            Q + batch * stride_q_b + q_head * stride_q_h,
            DO + batch * stride_do_b + q_head * stride_do_h,
            Lse + batch * stride_lse_b + q_head * stride_lse_h,
            Delta + batch * stride_lse_b + q_head * stride_lse_h,
            Bias + batch * stride_bias_b + q_head * stride_bias_h,
            SegStart + batch * stride_seg_b, SegEnd + batch * stride_seg_b,
            start, end, stride_q_l, stride_do_l, stride_bias_l, stride_bias_c,
            q_len, key_len, prefix_len, head_dim, key_pos, key_ok, 0, key_shift,
            window_left, window_right, prefix_left, qk_scale, softcap_scale,
            seed, dropout_p, (batch * num_heads + q_head) * q_len, rng_cols,
            prefix_len + key_len,
            CAUSAL_MASK=False, BOUNDS=2 if HAS_WINDOW else 0, IS_CAUSAL=False,
            HAS_WINDOW=HAS_WINDOW, IS_PACKED=IS_PACKED, HAS_MASK=False, HAS_BIAS=HAS_BIAS,
            SOFTCAP=SOFTCAP, HAS_DROPOUT=HAS_DROPOUT, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D,
            INPUT_PRECISION=INPUT_PRECISION)

    # Partial tile (split, kv head, keys, :) of the dense fp32 buffers; the dK scale is
    # applied once, by the reduction.
    tile = ((tl.program_id(0).to(tl.int64) * tl.num_programs(2) + kv_head) * prefix_len
            + keys) * head_dim + offs_d[None, :]
    tl.store(PartialK + tile, dk, mask=tile_mask)
    tl.store(PartialV + tile, dv, mask=tile_mask)


# --------------------------------------------------------------------------------------------
# Launchers

DELTA_BLOCK_M = 64


@on_input_device
def prefix_attention_bwd(grad_out, q, k, v, prefix_k, prefix_v, out, lse, spec=AttentionSpec(),
                         *, needs=(True,) * 5):
    """Gradients (dq, dk, dv, dprefix_k, dprefix_v) of `prefix_attention_fwd`; None where
    `needs` (five bools, autograd's needs_input_grad order) is False.

    grad_out, out (B, Hq, Lq, D); lse (B, Hq, Lq) fp32 from the forward; q, k, v and the
    prefixes as for the forward. spec: the forward's `AttentionSpec`, every field computed
    (the dropout keep-mask is regenerated from spec.dropout_seed; sinks need nothing here:
    the forward's LSE holds them).
    Gradients have their input's shape and dtype. dk and dv come from one kernel,
    as do dprefix_k and dprefix_v: asking for either of a pair computes both.
    """
    grad_out, out = contiguous_last(grad_out), contiguous_last(out)
    x = AttentionInputs.prepare(q, k, v, prefix_k, prefix_v, spec)
    q, k, v, pk, pv, P, mask, index = x.q, x.k, x.v, x.prefix_k, x.prefix_v, x.prefix_len, \
        x.mask, x.index
    lse = lse.contiguous()
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    terms = Terms.of(spec)
    causal, dropout_p = spec.causal, spec.dropout_p
    qk_scale, softcap_scale = terms.qk_scales(x.scale)
    block_d = head_block(D)
    precision = input_precision(q.dtype)
    seed = seed_arg(dropout_p, spec.dropout_seed, q)
    dropout = dict(HAS_DROPOUT=dropout_p > 0)
    dq = dk = dv = dpk = dpv = None

    delta = torch.empty_like(lse)
    if delta.numel() > 0:
        _delta_kernel[(cdiv(Lq, DELTA_BLOCK_M), Hq, B)](
            delta, out, grad_out, Lq, D, *strides3(out), *strides3(grad_out),
            delta.stride(0), delta.stride(1),
            BLOCK_M=DELTA_BLOCK_M, BLOCK_D=block_d, num_warps=4)

    if needs[0]:
        dq = prefix_attention_dq(x, grad_out, lse, delta, terms.spec)

    if needs[1] or needs[2]:
        dk, dv = torch.empty_like(k), torch.empty_like(v)

        def launch_dkdv(cfg: TileConfig) -> None:
            _dkdv_kernel[(cdiv(Lk, cfg.block_n), Hkv, B)](
                dk, dv, q, k, v, grad_out, lse, delta, x.mask_pointer(), seed,
                *terms.pointers(q, sinks=False),
                Lq, Lk, P, D, group, x.scale, qk_scale, float(dropout_p), softcap_scale,
                *strides3(q), *strides3(k), *strides3(v), *strides3(grad_out),
                *strides3(dk), *strides3(dv), lse.stride(0), lse.stride(1), *x.mask_strides(),
                *terms.ints(), **terms.flags(sinks=False),
                IS_CAUSAL=causal, HAS_MASK=mask is not None, **dropout,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
                INPUT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

        if dk.numel() > 0:
            launch_tuned("dkdv", q.device, q.dtype, D,
                         (causal, mask is not None, dropout_p > 0, length_bucket(Lq),
                          length_bucket(Lk), *terms.key()), launch_dkdv,
                         dropout=dropout_p > 0, terms=terms.any)

    if needs[3] or needs[4]:
        # The fixed dK/dV tile: the prefix kernel's work is short and its split is sized from
        # the tile, so it is not timed.
        cfg = fixed_config("dkdv", q.device, q.dtype, D, terms=terms.any)
        dpk, dpv = _prefix_grads(q, pk, pv, prefix_k, x.shared, index, grad_out, lse, delta,
                                 seed, Lk, x.scale, dropout_p, cfg, block_d, precision, terms)

    return (dq, dk if needs[1] else None, dv if needs[2] else None,
            dpk if needs[3] else None, dpv if needs[4] else None)


def _prefix_grads(q, pk, pv, prefix_k, shared, index, grad_out, lse, delta, seed, Lk, scale,
                  dropout_p, cfg, block_d, precision, terms):
    """(dprefix_k, dprefix_v), dense, in prefix_k's shape and dtype.

    A slot is the shared prefix (read by every row), one row's prefix, or one task's prefix
    (read by the rows whose prefix_index names it). The slots' (row, query head, query block)
    items are cut into splits, one program per (split, prefix block, kv head) writing an fp32
    partial that `sum_splits` adds, per slot, in split order: enough programs to fill the GPU
    however few prefix tiles there are, and bitwise deterministic (no atomics). Per task, the
    splits are sized for the batch's work, as for a shared prefix, and follow the tasks the
    batch uses (`split_reduce.plan_task_splits`): a table of T tasks costs neither more
    partials nor fewer programs for the tasks in use.
    """
    B, Hq, Lq, D = q.shape
    Hkv, P = pk.shape[1], pk.shape[2]
    group = Hq // Hkv
    if shared or index is not None:
        slots, rows_step, rows_per_slot = pk.shape[0], 0, B
    else:
        slots, rows_step, rows_per_slot = B, 1, 1
    shape4 = (slots, Hkv, P, D)
    dpk = torch.empty(shape4, dtype=prefix_k.dtype, device=q.device)
    dpv = torch.empty(shape4, dtype=prefix_k.dtype, device=q.device)
    items_per_row = group * cdiv(Lq, cfg.block_m)        # (query head, query block) pairs
    work = rows_per_slot * items_per_row
    if dpk.numel() == 0 or work == 0:
        return dpk.zero_().view(prefix_k.shape), dpv.zero_().view(prefix_k.shape)
    cfg = prefix_tile(P, cfg)
    block_n = cfg.block_n
    qk_scale, softcap_scale = terms.qk_scales(scale)
    key_blocks = cdiv(P, block_n)
    # Per task, the batch's work is what the splits share, among the prefix tiles of one task.
    tiles = key_blocks * Hkv * (1 if index is not None else slots)
    per_split = cdiv(work, num_splits(q.device, tiles, work, cfg.num_warps))
    if index is not None:
        plan = plan_task_splits(index, slots, items_per_row, per_split)
        splits, splits_per_slot, plan_pointers = plan.bound, 0, plan.pointers()
    else:
        splits_per_slot = cdiv(work, per_split)      # no split is left without work
        splits, plan = splits_per_slot * slots, None
        plan_pointers = (q,) * 4
    partial_k = torch.empty((splits, Hkv, P, D), dtype=torch.float32, device=q.device)
    partial_v = torch.empty_like(partial_k)
    _prefix_dkdv_kernel[(splits, key_blocks, Hkv)](
        partial_k, partial_v, q, pk, pv, grad_out, lse, delta, *plan_pointers, seed,
        *terms.pointers(q, sinks=False),
        Lq, Lk, P, D, group, qk_scale, float(dropout_p), softcap_scale, rows_step,
        rows_per_slot, splits_per_slot, per_split,
        *strides3(q), *strides3(pk), *strides3(pv), *strides3(grad_out),
        lse.stride(0), lse.stride(1), *terms.ints(),
        **terms.flags(sinks=False),
        HAS_INDEX=index is not None, HAS_DROPOUT=dropout_p > 0,
        BLOCK_M=cfg.block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        INPUT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    split_start = None if plan is None else plan.task_splits
    sum_splits(partial_k, dpk, scale, split_start)
    sum_splits(partial_v, dpv, 1.0, split_start)
    return dpk.view(prefix_k.shape), dpv.view(prefix_k.shape)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (see kernels/compile_specs.py)

def compile_specs():
    """The dK/dV kernel for every tile candidate, the prefix dK/dV kernel for each arch's fixed
    tile (with the short-prefix key blocks), and Delta, with the forward's rotation of dtypes,
    dot precisions and (causal, mask, index) flags and its dropout variants; both dK/dV kernels
    with the attention terms' variants."""
    for i, dtype, elem, precision, block_d, causal, has_mask, has_dropout in spec_variants():
        sixteen = dtype != torch.float32
        floats = dict(scale="fp32", qk_scale="fp32", Lse="*fp32", Delta="*fp32",
                      Mask="*i8", Seed="*i64", dropout_p="fp32",
                      Order="*i64", TaskRows="*i64", TaskSplits="*i64", SplitTask="*i64",
                      PartialK="*fp32", PartialV="*fp32")
        jobs = [("dkdv", _dkdv_kernel, cfg, archs,
                 dict(IS_CAUSAL=causal, HAS_MASK=has_mask, HAS_DROPOUT=has_dropout,
                      BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n),
                 ("DK", "DV", "Q", "K", "V", "DO"))
                for cfg, archs in spec_configs("dkdv", sixteen, block_d)]
        # Prefix programs take a shorter key block for short prefixes: rotate P over 16, 64
        # and 256 so that each block size compiles somewhere.
        for arch in (80, 90):
            cfg = prefix_tile((16, 64, 256)[i % 3],
                              CANDIDATES["dkdv"][(arch, sixteen, block_d)][0])
            jobs.append(("prefix_dkdv", _prefix_dkdv_kernel, cfg, (arch,),
                         dict(HAS_INDEX=i % 2 == 1, HAS_DROPOUT=has_dropout, BLOCK_M=cfg.block_m,
                              BLOCK_N=cfg.block_n),
                         ("Q", "PK", "PV", "DO")))
        for name, fn, cfg, archs, constexprs, tensors in jobs:
            constexprs = dict(constexprs, BLOCK_D=block_d, INPUT_PRECISION=precision)
            types = dict(floats, **{t: f"*{elem}" for t in tensors})
            flags = ",".join(f"{k}={v}" for k, v in constexprs.items())
            flags += f",w{cfg.num_warps}s{cfg.num_stages}"
            yield CompileSpec(f"prefix_attention_{name}[{elem},{flags}]", fn,
                              spec_signature(fn, constexprs, types), constexprs,
                              cfg.num_warps, cfg.num_stages, archs,
                              ints=spec_ints(constexprs))
    floats = dict(scale="fp32", qk_scale="fp32", Lse="*fp32", Delta="*fp32", Mask="*i8",
                  Seed="*i64", dropout_p="fp32", PartialK="*fp32",
                  Order="*i64", TaskRows="*i64", TaskSplits="*i64", SplitTask="*i64",
                  PartialV="*fp32")
    yield from term_compile_specs(
        "dkdv", _dkdv_kernel, "dkdv", ("DK", "DV", "Q", "K", "V", "DO"), floats,
        lambda causal, cfg: dict(IS_CAUSAL=causal, HAS_MASK=True, HAS_DROPOUT=False))
    yield from term_compile_specs(
        "prefix_dkdv", _prefix_dkdv_kernel, "dkdv", ("Q", "PK", "PV", "DO"), floats,
        lambda causal, cfg: dict(HAS_INDEX=False, HAS_DROPOUT=False),
        tile=lambda cfg: prefix_tile(64, cfg))
    # Delta depends only on the dtype and BLOCK_D (and is cheap to compile).
    for i, block_d in enumerate((32, 64, 128, 256)):
        elem = ("fp16", "bf16", "fp32", "fp16")[i]
        constexprs = dict(BLOCK_M=DELTA_BLOCK_M, BLOCK_D=block_d)
        yield CompileSpec(f"prefix_attention_delta[{elem},BLOCK_D={block_d}]", _delta_kernel,
                          spec_signature(_delta_kernel, constexprs,
                                         {"Delta": "*fp32", "Out": f"*{elem}", "DO": f"*{elem}"}),
                          constexprs, 4, 1)
