"""Prefix attention backward, dQ: one program per (query block, query head, batch row).

Each program keeps its q, dO, LSE and Delta in registers and streams the keys it can see in
the forward's passes (prefix_attention_fwd.py; the causal mask's hidden blocks are skipped),
accumulating dQ = scale * sum_j dS_ij k_j in fp32; its open pass holds sequence blocks only,
the whole prefix goes with the diagonal (bench/NOTES.md). One writer per tile: no atomics.
See prefix_attention_bwd.py for the identity and the other gradients (and dropout).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_blocks import hide_keys, key_block, key_passes, pass_plan
from .attention_dropout import dropout_keep, seed_arg
from .attention_inputs import AttentionInputs, input_precision, strides3
from .attention_options import AttentionSpec
from .attention_specs import spec_ints, spec_variants, term_compile_specs
from .attention_terms import Terms, load_bias, logits, query_bounds, softcap_grad
from .autotune import launch_tuned, length_bucket
from .compile_specs import CompileSpec, spec_signature
from .launch import cdiv, define_kernels
from .tiles import TileConfig, head_block, spec_configs


define_kernels()     # before the first @triton.jit: see launch.interpreting


@triton.jit
def _dq_blocks(
    dq, q, do, lse, delta,       # this program's dq accumulator and query rows' tiles
    q_pos, q_ok, head_dim, qk_scale, softcap_scale,
    Bias, stride_bias_l, stride_bias_c,  # Bias at (row, head)
    seed, dropout_p, rng_rows,   # as in the forward's _attend_blocks
    # Pass PASS of attention_blocks.key_passes, as the forward's _attend_blocks; K/V at
    # (row, kv head), Mask at the row (or unused).
    sources,                     # (PK, PV, stride_pk_l, stride_pv_l, prefix_len, K, V, Mask,
                                 #  stride_k_l, stride_v_l, stride_mask_l, key_len)
    pre_cuts, seq_cuts, pre_lo, seq_lo, hi_col,   # key_passes' cuts, query_bounds' bounds
    PASS: tl.constexpr, WINDOWED: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    CHECK_KEYS: tl.constexpr = PASS != 1       # as in the forward's _attend_blocks
    CHECK_LO: tl.constexpr = PASS == 0 or (PASS == 2 and WINDOWED)
    CHECK_HI: tl.constexpr = PASS == 0 or (PASS == 2 and (IS_CAUSAL or WINDOWED))
    offs_d = tl.arange(0, BLOCK_D)
    blocks, plan = pass_plan(pre_cuts, seq_cuts, PASS=PASS, BLOCK_N=BLOCK_N)
    for i in range(0, blocks):
        _, keys, cols, key_ok, lo, hi, (kb, vb, stride_kb, stride_vb) = key_block(
            i, plan, sources, pre_lo, seq_lo, hi_col, CHECK_LO=CHECK_LO, HAS_MASK=HAS_MASK,
            HI_INSIDE=False, BLOCK_N=BLOCK_N)
        t_mask = (offs_d < head_dim)[:, None] & key_ok[None, :]
        rows = keys[None, :].to(tl.int64)
        kt = tl.load(kb + rows * stride_kb + offs_d[:, None], mask=t_mask, other=0.0)
        vt = tl.load(vb + rows * stride_vb + offs_d[:, None], mask=t_mask, other=0.0)
        s, t = logits(tl.dot(q, kt, input_precision=INPUT_PRECISION), qk_scale, softcap_scale,
                      SOFTCAP=SOFTCAP)
        if HAS_BIAS:
            s += load_bias(Bias, q_pos[:, None], cols[None, :], q_ok[:, None],
                           key_ok[None, :], stride_bias_l, stride_bias_c)
        # Hidden keys go to -inf before exp2: with large logits s - LSE could overflow there.
        s = hide_keys(s, cols, key_ok, lo, hi, CHECK_KEYS=CHECK_KEYS, CHECK_LO=CHECK_LO,
                      CHECK_HI=CHECK_HI, HAS_MASK=HAS_MASK)
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, vt, input_precision=INPUT_PRECISION)
        if HAS_DROPOUT:
            # dP of the undropped probabilities: dO V^T through the kept entries, scaled.
            keep = dropout_keep(seed, rng_rows[:, None] + cols.to(tl.int64)[None, :], dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = softcap_grad(p * (dp - delta[:, None]), t, SOFTCAP=SOFTCAP)
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
        key_shift, window_left, window_right, prefix_left, prefix_len,
        IS_CAUSAL=IS_CAUSAL, HAS_WINDOW=HAS_WINDOW, IS_PACKED=IS_PACKED)
    bias = Bias + batch * stride_bias_b + q_head * stride_bias_h

    # The forward's passes (attention_blocks.key_passes), except that the whole prefix goes
    # with the causal diagonal, bounds-checked: in the open loop, choosing each block's source
    # cost sm_80's steady loop instructions (bench/NOTES.md, "The prefix in the sequence's
    # pipelined loop").
    pk = PrefixK + prefix_row * stride_pk_b + kv_head * stride_pk_h
    pv = PrefixV + prefix_row * stride_pv_b + kv_head * stride_pv_h
    k = K + batch * stride_k_b + kv_head * stride_k_h
    v = V + batch * stride_v_b + kv_head * stride_v_h
    mask = Mask + batch * stride_mask_b
    sources = (pk, pv, stride_pk_l, stride_pv_l, prefix_len, k, v, mask, stride_k_l, stride_v_l,
               stride_mask_l, key_len)
    WINDOWED: tl.constexpr = HAS_WINDOW or IS_PACKED
    pre_cuts, seq_cuts, hi_col = key_passes(
        q_block * BLOCK_M, row_ok, pre_lo, seq_lo, seq_hi, prefix_len, key_len, key_shift,
        IS_CAUSAL=IS_CAUSAL, WINDOWED=WINDOWED, PREFIX_OPEN=False, BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N)
    for n in tl.static_range(3):
        dq = _dq_blocks(
            dq, q, do, lse, delta, q_pos, row_ok, head_dim, qk_scale, softcap_scale,
            bias, stride_bias_l, stride_bias_c, seed, dropout_p, rng_rows,
            sources, pre_cuts, seq_cuts, pre_lo, seq_lo, hi_col, PASS=n, WINDOWED=WINDOWED,
            IS_CAUSAL=IS_CAUSAL, HAS_MASK=HAS_MASK, HAS_BIAS=HAS_BIAS, SOFTCAP=SOFTCAP,
            HAS_DROPOUT=HAS_DROPOUT, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
            INPUT_PRECISION=INPUT_PRECISION)

    dq = dq * scale
    tl.store(DQ + batch * stride_dq_b + q_head * stride_dq_h + rows * stride_dq_l
             + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=tile_mask)


def prefix_attention_dq(x: AttentionInputs, grad_out, lse, delta, spec: AttentionSpec):
    """dq (q's shape and dtype). x: the backward's prepared inputs (`AttentionInputs`, from
    the same spec); grad_out with a contiguous last dim; lse and delta (B, Hq, Lq) fp32, one
    layout; spec: the forward's `AttentionSpec` (attention_mask, prefix_index and scale are
    read from x; causal, dropout_p with dropout_seed and the attention terms from spec)."""
    B, Hq, Lq, D = x.q.shape
    Hkv, Lk = x.k.shape[1], x.k.shape[2]
    dq = torch.empty_like(x.q)
    if dq.numel() == 0:
        return dq
    terms = Terms.of(spec)
    causal, dropout_p = spec.causal, spec.dropout_p
    qk_scale, softcap_scale = terms.qk_scales(x.scale)

    def launch(cfg: TileConfig) -> None:
        _dq_kernel[(cdiv(Lq, cfg.block_m), Hq, B)](
            dq, x.q, x.k, x.v, x.prefix_k, x.prefix_v, grad_out, lse, delta, x.mask_pointer(),
            x.q if x.index is None else x.index, seed_arg(dropout_p, spec.dropout_seed, x.q),
            *terms.pointers(x.q, sinks=False),
            Lq, Lk, x.prefix_len, D, Hq // Hkv, x.scale, qk_scale, float(dropout_p),
            softcap_scale,
            *x.input_strides(), *strides3(grad_out), *strides3(dq), lse.stride(0),
            lse.stride(1), *x.mask_strides(),
            *terms.ints(), **terms.flags(sinks=False),
            IS_CAUSAL=causal, HAS_MASK=x.mask is not None, HAS_INDEX=x.index is not None,
            HAS_DROPOUT=dropout_p > 0, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_D=head_block(D), INPUT_PRECISION=input_precision(x.q.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    launch_tuned("dq", x.q.device, x.q.dtype, D,
                 (causal, x.mask is not None, dropout_p > 0, length_bucket(Lq),
                  length_bucket(x.prefix_len + Lk), *terms.key()), launch,
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
