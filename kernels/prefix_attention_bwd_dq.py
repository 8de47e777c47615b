"""Prefix attention backward, dQ: one program per (query block, query head, batch row).

Each program keeps its q, dO, LSE and Delta in registers and streams the prefix keys (bounds
mask only) and then the sequence keys it can see (the causal mask's hidden blocks are skipped,
as in the forward), accumulating dQ = scale * sum_j dS_ij k_j in fp32. One writer per tile: no
atomics. See prefix_attention_bwd.py for the identity and the other gradients (and dropout).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import define_kernels
from .attention_terms import (
    NO_TERMS,
    block_ranges,
    load_bias,
    logits,
    query_bounds,
    softcap_grad,
    term_compile_specs,
)
from .autotune import launch_tuned, length_bucket
from .compile_specs import CompileSpec
from .launch import cdiv
from .prefix_attention_fwd import (
    TileConfig,
    dropout_keep,
    head_block,
    input_precision,
    prefix_batch_stride,
    seed_arg,
    sequence_key_range,
    spec_ints,
    spec_signature,
    spec_variants,
    strides3,
)
from .tiles import spec_configs


define_kernels()     # before the first @triton.jit: see launch.interpreting


@triton.jit
def _dq_blocks(
    dq, q, do, lse, delta,
    K, V, Mask, Bias,            # K, V already at (row, kv head); Mask at the row (or unused);
                                 # Bias at (row, head)
    start, end,
    stride_k_l, stride_v_l, stride_mask_l, stride_bias_l, stride_bias_c,
    key_len, head_dim, key_lo, key_hi, q_pos, q_ok, qk_scale, softcap_scale,
    seed, dropout_p, rng_rows, col0,       # as in the forward's _attend_blocks
    CHECK_KEYS: tl.constexpr, CHECK_LO: tl.constexpr, CHECK_HI: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    for start_n in range(start, end, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        key_ok = keys < key_len
        if HAS_MASK:
            # A padded key is never read, as one past the end: NaN or inf there (0 * NaN in
            # dS K and dO V^T) must not reach dq.
            key_ok = key_ok & (tl.load(Mask + keys * stride_mask_l, mask=key_ok, other=0) != 0)
        t_mask = d_ok[:, None] & key_ok[None, :]
        cols = keys[None, :].to(tl.int64)
        kt = tl.load(K + cols * stride_k_l + offs_d[:, None], mask=t_mask, other=0.0)
        vt = tl.load(V + cols * stride_v_l + offs_d[:, None], mask=t_mask, other=0.0)
        s, t = logits(tl.dot(q, kt, input_precision=INPUT_PRECISION), qk_scale, softcap_scale,
                      SOFTCAP)
        if HAS_BIAS:
            s += load_bias(Bias, q_pos[:, None], col0 + keys[None, :], q_ok[:, None],
                           key_ok[None, :], stride_bias_l, stride_bias_c)
        # Hidden keys go to -inf before exp2: with large logits s - LSE could overflow there.
        if CHECK_KEYS or HAS_MASK:
            visible = key_ok[None, :]               # padding too, with HAS_MASK
            if CHECK_KEYS:
                if CHECK_HI:
                    visible = visible & (keys[None, :] <= key_hi[:, None])
                if CHECK_LO:
                    visible = visible & (keys[None, :] >= key_lo[:, None])
            s = tl.where(visible, s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, vt, input_precision=INPUT_PRECISION)
        if HAS_DROPOUT:
            # dP of the undropped probabilities: dO V^T through the kept entries, scaled.
            cols = (col0 + keys).to(tl.int64)
            keep = dropout_keep(seed, rng_rows[:, None] + cols[None, :], dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = softcap_grad(p * (dp - delta[:, None]), t, SOFTCAP)
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=INPUT_PRECISION)
    return dq


@triton.jit
def _dq_kernel(
    DQ, Q, K, V, PrefixK, PrefixV, DO, Lse, Delta, Mask, PrefixIndex, Seed,
    Bias, SegStart, SegEnd,      # attention terms (attention_terms.py), read when flagged
    q_len, key_len, prefix_len, head_dim, group_size, scale, qk_scale, dropout_p,
    softcap_scale,
    stride_q_b, stride_q_h, stride_q_l,
    stride_k_b, stride_k_h, stride_k_l,
    stride_v_b, stride_v_h, stride_v_l,
    stride_pk_b, stride_pk_h, stride_pk_l,
    stride_pv_b, stride_pv_h, stride_pv_l,
    stride_do_b, stride_do_h, stride_do_l,
    stride_dq_b, stride_dq_h, stride_dq_l,
    stride_lse_b, stride_lse_h,
    stride_mask_b, stride_mask_l,
    window_left, window_right, prefix_left,
    stride_bias_b, stride_bias_h, stride_bias_l, stride_bias_c,
    stride_seg_b,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_INDEX: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr = False, IS_PACKED: tl.constexpr = False,
    HAS_WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
):
    q_block = tl.program_id(0)
    q_head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    kv_head = (q_head // group_size).to(tl.int64)
    q_head = q_head.to(tl.int64)
    if HAS_INDEX:
        prefix_row = tl.load(PrefixIndex + batch).to(tl.int64)
    else:
        prefix_row = batch
    q_pos = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = q_pos < q_len
    tile_mask = row_ok[:, None] & (offs_d < head_dim)[None, :]
    rows = q_pos[:, None].to(tl.int64)
    q = tl.load(Q + batch * stride_q_b + q_head * stride_q_h + rows * stride_q_l + offs_d[None, :],
                mask=tile_mask, other=0.0)
    do = tl.load(DO + batch * stride_do_b + q_head * stride_do_h + rows * stride_do_l
                 + offs_d[None, :], mask=tile_mask, other=0.0)
    lse = tl.load(Lse + batch * stride_lse_b + q_head * stride_lse_h + q_pos, mask=row_ok,
                  other=float("inf"))
    delta = tl.load(Delta + batch * stride_lse_b + q_head * stride_lse_h + q_pos, mask=row_ok,
                    other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(Seed)
        rng_rows = ((batch * tl.num_programs(1) + q_head) * q_len + q_pos) * (prefix_len + key_len)
    else:
        seed = 0
        rng_rows = q_pos
    key_shift = key_len - q_len
    seq_lo, seq_hi, pre_lo = query_bounds(
        q_pos, row_ok, SegStart + batch * stride_seg_b, SegEnd + batch * stride_seg_b, key_len,
        key_shift, window_left, window_right, prefix_left, prefix_len, IS_CAUSAL, HAS_WINDOW,
        IS_PACKED)
    bias = Bias + batch * stride_bias_b + q_head * stride_bias_h

    # The forward's key ranges: a window's prefix edge, then the sequence's interval blocks.
    pk = PrefixK + prefix_row * stride_pk_b + kv_head * stride_pk_h
    pv = PrefixV + prefix_row * stride_pv_b + kv_head * stride_pv_h
    if HAS_WINDOW:
        # Prefix keys below every query's window are skipped; the rest get the window's mask.
        prefix_start, _, _, _ = block_ranges(pre_lo, pre_lo, row_ok, prefix_len, BLOCK_N)
        prefix_full = prefix_start
    else:
        prefix_start = 0
        prefix_full = prefix_len // BLOCK_N * BLOCK_N
    dq = _dq_blocks(dq, q, do, lse, delta, pk, pv, Mask, bias, prefix_start, prefix_full,
                    stride_pk_l, stride_pv_l, 0, stride_bias_l, stride_bias_c, prefix_len,
                    head_dim, pre_lo, pre_lo, q_pos, row_ok, qk_scale, softcap_scale,
                    seed, dropout_p, rng_rows, 0,
                    False, False, False, False, HAS_BIAS, SOFTCAP, HAS_DROPOUT, BLOCK_N,
                    BLOCK_D, INPUT_PRECISION)
    dq = _dq_blocks(dq, q, do, lse, delta, pk, pv, Mask, bias, prefix_full, prefix_len,
                    stride_pk_l, stride_pv_l, 0, stride_bias_l, stride_bias_c, prefix_len,
                    head_dim, pre_lo, pre_lo, q_pos, row_ok, qk_scale, softcap_scale,
                    seed, dropout_p, rng_rows, 0,
                    True, HAS_WINDOW, False, False, HAS_BIAS, SOFTCAP, HAS_DROPOUT, BLOCK_N,
                    BLOCK_D, INPUT_PRECISION)

    if HAS_WINDOW or IS_PACKED:
        start, full_start, full_end, end = block_ranges(seq_lo, seq_hi, row_ok, key_len, BLOCK_N)
    else:
        full_end, end = sequence_key_range(q_block * BLOCK_M, key_shift, key_len, IS_CAUSAL,
                                           BLOCK_M, BLOCK_N)
        start = 0
        full_start = 0
    k = K + batch * stride_k_b + kv_head * stride_k_h
    v = V + batch * stride_v_b + kv_head * stride_v_h
    mask = Mask + batch * stride_mask_b
    dq = _dq_blocks(dq, q, do, lse, delta, k, v, mask, bias, start, full_start,
                    stride_k_l, stride_v_l, stride_mask_l, stride_bias_l, stride_bias_c,
                    key_len, head_dim, seq_lo, seq_hi, q_pos, row_ok, qk_scale, softcap_scale,
                    seed, dropout_p, rng_rows, prefix_len,
                    True, HAS_WINDOW or IS_PACKED, IS_CAUSAL or HAS_WINDOW or IS_PACKED,
                    HAS_MASK, HAS_BIAS, SOFTCAP, HAS_DROPOUT, BLOCK_N, BLOCK_D, INPUT_PRECISION)
    dq = _dq_blocks(dq, q, do, lse, delta, k, v, mask, bias, full_start, full_end,
                    stride_k_l, stride_v_l, stride_mask_l, stride_bias_l, stride_bias_c,
                    key_len, head_dim, seq_lo, seq_hi, q_pos, row_ok, qk_scale, softcap_scale,
                    seed, dropout_p, rng_rows, prefix_len,
                    False, False, False, HAS_MASK, HAS_BIAS, SOFTCAP, HAS_DROPOUT,
                    BLOCK_N, BLOCK_D, INPUT_PRECISION)
    dq = _dq_blocks(dq, q, do, lse, delta, k, v, mask, bias, full_end, end,
                    stride_k_l, stride_v_l, stride_mask_l, stride_bias_l, stride_bias_c,
                    key_len, head_dim, seq_lo, seq_hi, q_pos, row_ok, qk_scale, softcap_scale,
                    seed, dropout_p, rng_rows, prefix_len,
                    True, HAS_WINDOW or IS_PACKED, IS_CAUSAL or HAS_WINDOW or IS_PACKED,
                    HAS_MASK, HAS_BIAS, SOFTCAP, HAS_DROPOUT, BLOCK_N, BLOCK_D, INPUT_PRECISION)

    dq = dq * scale
    tl.store(DQ + batch * stride_dq_b + q_head * stride_dq_h + rows * stride_dq_l
             + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=tile_mask)


def prefix_attention_dq(q, k, v, prefix_k4, prefix_v4, shared, grad_out, lse, delta, mask, index,
                        *, causal, scale, dropout_p=0.0, seed=None, terms=NO_TERMS):
    """dq (q's shape and dtype). Arguments as prepared by `prefix_attention_bwd`: last dims
    contiguous; prefix_k4/v4 4-D (shared: a 1-row view read with batch stride 0); mask int8
    (B, Lk) or None; index int64 (B,) or None; lse and delta (B, Hq, Lq) fp32, one layout;
    seed: the forward's 0-d int64 seed tensor when dropout_p > 0; terms: prepared
    `attention_terms.Terms`."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    dq = torch.empty_like(q)
    if dq.numel() == 0:
        return dq
    qk_scale, softcap_scale = terms.qk_scales(scale)

    def launch(cfg: TileConfig) -> None:
        _dq_kernel[(cdiv(Lq, cfg.block_m), Hq, B)](
            dq, q, k, v, prefix_k4, prefix_v4, grad_out, lse, delta,
            mask if mask is not None else q, index if index is not None else q,
            seed_arg(dropout_p, seed, q), *terms.pointers(q, sinks=False),
            Lq, Lk, prefix_k4.shape[2], D, Hq // Hkv, scale, qk_scale, float(dropout_p),
            softcap_scale,
            *strides3(q), *strides3(k), *strides3(v),
            prefix_batch_stride(prefix_k4, shared), prefix_k4.stride(1), prefix_k4.stride(2),
            prefix_batch_stride(prefix_v4, shared), prefix_v4.stride(1), prefix_v4.stride(2),
            *strides3(grad_out), *strides3(dq), lse.stride(0), lse.stride(1),
            *((mask.stride(0), mask.stride(1)) if mask is not None else (0, 0)),
            *terms.ints(), **terms.flags(sinks=False),
            IS_CAUSAL=causal, HAS_MASK=mask is not None, HAS_INDEX=index is not None,
            HAS_DROPOUT=dropout_p > 0, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_D=head_block(D), INPUT_PRECISION=input_precision(q.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    launch_tuned("dq", q.device, q.dtype, D,
                 (causal, mask is not None, dropout_p > 0, length_bucket(Lq),
                  length_bucket(prefix_k4.shape[2] + Lk), *terms.key()), launch,
                 dropout=dropout_p > 0, terms=terms.any)
    return dq



def compile_specs():
    """The dQ kernel for every tile candidate (the forward's flag rotation, dropout variants
    included), and the attention terms' variants."""
    for i, dtype, elem, precision, block_d, causal, has_mask, has_dropout in spec_variants():
        for cfg, archs in spec_configs("dq", dtype != torch.float32, block_d):
            constexprs = dict(IS_CAUSAL=causal, HAS_MASK=has_mask, HAS_INDEX=i % 2 == 0,
                              HAS_DROPOUT=has_dropout,
                              BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
                              INPUT_PRECISION=precision)
            types = {t: f"*{elem}" for t in ("DQ", "Q", "K", "V", "PrefixK", "PrefixV", "DO")}
            types.update(Lse="*fp32", Delta="*fp32", Mask="*i8", PrefixIndex="*i64",
                         Seed="*i64", scale="fp32", qk_scale="fp32", dropout_p="fp32")
            flags = ",".join(f"{k}={v}" for k, v in constexprs.items())
            flags += f",w{cfg.num_warps}s{cfg.num_stages}"
            yield CompileSpec(f"prefix_attention_dq[{elem},{flags}]", _dq_kernel,
                              spec_signature(_dq_kernel, constexprs, types), constexprs,
                              cfg.num_warps, cfg.num_stages, archs,
                              ints=spec_ints(constexprs))
    yield from term_compile_specs(
        "dq", _dq_kernel, "dq", ("DQ", "Q", "K", "V", "PrefixK", "PrefixV", "DO"),
        dict(Lse="*fp32", Delta="*fp32", Mask="*i8", PrefixIndex="*i64", Seed="*i64",
             scale="fp32", qk_scale="fp32", dropout_p="fp32"),
        lambda causal, cfg: dict(IS_CAUSAL=causal, HAS_MASK=True, HAS_INDEX=False,
                                 HAS_DROPOUT=False))
