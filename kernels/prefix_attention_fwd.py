"""Prefix attention forward: softmax(q [prefix_k; k]^T * scale + mask) [prefix_v; v].

FlashAttention-2 style: one program per (query block, query head, batch row) streams the
prefix keys and the sequence keys straight from their own tensors (no concatenation, no per-row
copy of a shared prefix, no repeated GQA heads) with an online softmax in base 2
(attention_blocks.py).

Prefix keys are visible to every query, so their blocks need only a bounds mask. Sequence key j
is visible to query i iff the padding mask allows it and, when causal, j <= i + (Lk - Lq)
(bottom-right aligned). Blocks that the causal mask removes for the whole query block are never
visited; blocks it leaves untouched run without the causal mask. So the keys go in passes: the
open pass (the whole prefix blocks, then the sequence blocks every query sees) and an upper
edge (the prefix's partial block, then the causal diagonal), with a lower edge first for a
window or packed sequences. Each pass is one software-pipelined loop over both sources, the
block's K/V chosen per iteration: no pipeline drains between prefix and sequence.

Attention-probability dropout (HAS_DROPOUT) keeps entry (b, h, i, c) as
`attention_dropout.dropout_keep` says (c numbers the concatenated [prefix; sequence] keys; the
Philox offsets are the module's, independent of the tiles). The normalizer l_i sums the
undropped probabilities; acc sums the kept ones, scaled by 1 / (1 - p) once at the end.

The log-sum-exp (base 2, in units of the scaled scores, fp32) is saved for the backward; a query
row that sees no key stores LSE = +inf, which makes every probability the backward recomputes
exactly 0, and outputs zeros.

fp32 inputs: the dots follow torch's CUDA fp32 matmul setting (attention_inputs.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation   # the allocator's ContextVar: see _ensure_descriptor_allocator

from .attention_blocks import hide_keys, key_block, key_passes, online_softmax, pass_plan
from .attention_dropout import dropout_keep, seed_arg
from .attention_inputs import ForwardInputs, input_precision
from .attention_options import AttentionSpec
from .attention_specs import spec_ints, spec_variants, term_compile_specs
from .attention_terms import _LOG2E, Terms, load_bias, logits, query_bounds
from .autotune import launch_tuned, length_bucket
from .compile_specs import CompileSpec, spec_signature
from .launch import cdiv, define_kernels, on_input_device
from .tiles import TileConfig, head_block, spec_configs


define_kernels()     # before the first @triton.jit: see launch.interpreting

@triton.jit
def _attend_blocks(
    acc, m_i, l_i, q,            # running (acc, max, normalizer) and the query tile
    q_pos, q_ok, head_dim, qk_scale, softcap_scale,
    Bias, stride_bias_l, stride_bias_c,  # Bias at (row, head)
    seed, dropout_p, rng_rows,   # dropout: Philox row offsets (BLOCK_M,) int64
    # Pass PASS of attention_blocks.key_passes: one pipelined loop over its prefix keys, then
    # its sequence keys. K/V at (row, kv head): pointers, or with USE_TMA (length, head_dim)
    # tensor descriptors; Mask at the row.
    sources,                     # (PK, PV, stride_pk_l, stride_pv_l, prefix_len, K, V, Mask,
                                 #  stride_k_l, stride_v_l, stride_mask_l, key_len)
    pre_cuts, seq_cuts, pre_lo, seq_lo, hi_col,   # key_passes' cuts, query_bounds' bounds
    PASS: tl.constexpr, WINDOWED: tl.constexpr, IS_CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr = False,
):
    """Online-softmax update of (acc, m_i, l_i) with pass PASS's keys, prefix and sequence in
    one loop: one pipeline prologue and one drain for both (the block's source is chosen per
    iteration)."""
    # What the pass's blocks check (hide_keys): the edges the bounds, the lower edge (and the
    # upper one with a window or packing) the lower bound, both edges the upper bound where
    # one applies.
    CHECK_KEYS: tl.constexpr = PASS != 1
    CHECK_LO: tl.constexpr = PASS == 0 or (PASS == 2 and WINDOWED)
    CHECK_HI: tl.constexpr = PASS == 0 or (PASS == 2 and (IS_CAUSAL or WINDOWED))
    # The upper edge without a window: q_pos < q_len gives q_pos + key_shift < key_len, so the
    # causal bound hides the keys past the end for every stored row. Through descriptors the
    # bounds vector is needed nowhere else; pointer loads need it for their masks anyway (and
    # without it in the logits ptxas spilled at sm_80 D = 64: bench/NOTES.md).
    HI_INSIDE: tl.constexpr = PASS == 2 and USE_TMA and not WINDOWED
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    blocks, plan = pass_plan(pre_cuts, seq_cuts, PASS=PASS, BLOCK_N=BLOCK_N)
    for i in range(0, blocks):
        start_n, keys, cols, key_ok, lo, hi, (kb, vb, stride_kb, stride_vb) = key_block(
            i, plan, sources, pre_lo, seq_lo, hi_col, CHECK_LO=CHECK_LO, HAS_MASK=HAS_MASK,
            HI_INSIDE=HI_INSIDE, BLOCK_N=BLOCK_N, USE_TMA=USE_TMA)
        if CHECK_KEYS or HAS_MASK:
            kt_mask = d_ok[:, None] & key_ok[None, :]
            v_mask = key_ok[:, None] & d_ok[None, :]
        else:
            kt_mask = d_ok[:, None]
            v_mask = d_ok[None, :]
        if USE_TMA:
            # The descriptor's bounds give the zeros a masked load would (keys >= length,
            # columns >= head_dim); padded keys are hidden from the logits below, their
            # values zeroed after the load.
            kt = tl.trans(kb.load([start_n, 0]))
        else:
            kt = tl.load(kb + keys[None, :].to(tl.int64) * stride_kb + offs_d[:, None],
                         mask=kt_mask, other=0.0)
        if HAS_BIAS:   # the bias adds to scaled logits: scale first
            s, _ = logits(tl.dot(q, kt, input_precision=INPUT_PRECISION), qk_scale,
                          softcap_scale, SOFTCAP=SOFTCAP)
            s += load_bias(Bias, q_pos[:, None], cols[None, :], q_ok[:, None],
                           key_ok[None, :], stride_bias_l, stride_bias_c)
            exp2_scale = 1.0
        else:          # scaled inside exp2's argument (online_softmax; the launcher made it > 0)
            s, _ = logits(tl.dot(q, kt, input_precision=INPUT_PRECISION), 1.0, softcap_scale,
                          SOFTCAP=SOFTCAP)
            exp2_scale = qk_scale
        s = hide_keys(s, cols, key_ok, lo, hi, CHECK_KEYS=CHECK_KEYS, CHECK_LO=CHECK_LO,
                      CHECK_HI=CHECK_HI, HAS_MASK=HAS_MASK, HI_INSIDE=HI_INSIDE)
        p, alpha, m_new, l_i = online_softmax(s, m_i, l_i, exp2_scale)
        if HAS_DROPOUT:
            p = tl.where(dropout_keep(seed, rng_rows[:, None] + cols.to(tl.int64)[None, :],
                                      dropout_p), p, 0.0)
        if USE_TMA:
            v = vb.load([start_n, 0])
            if HAS_MASK:
                v = tl.where(key_ok[:, None], v, 0.0)
        else:
            v = tl.load(vb + keys[:, None].to(tl.int64) * stride_vb + offs_d[None, :],
                        mask=v_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _prefix_attention_fwd_kernel(
    Out, Lse, Q, K, V, PrefixK, PrefixV, Mask, PrefixIndex,
    Seed,                        # int64 Philox seed (read only with HAS_DROPOUT)
    Bias, Sinks, SegStart, SegEnd,   # attention terms (attention_terms.py), read when flagged
    q_len, key_len, prefix_len, head_dim, group_size, qk_scale,
    dropout_p,                   # probability of dropping (used only with HAS_DROPOUT)
    softcap_scale,               # scale / softcap (used only with SOFTCAP)
    stride_q_b, stride_q_h, stride_q_l,
    stride_k_b, stride_k_h, stride_k_l,
    stride_v_b, stride_v_h, stride_v_l,
    stride_pk_b, stride_pk_h, stride_pk_l,      # stride_pk_b = 0 for a shared prefix
    stride_pv_b, stride_pv_h, stride_pv_l,
    stride_o_b, stride_o_h, stride_o_l,
    stride_lse_b, stride_lse_h,
    stride_mask_b, stride_mask_l,
    window_left, window_right, prefix_left,     # UNBOUNDED where a side has no limit
    stride_bias_b, stride_bias_h, stride_bias_l, stride_bias_c,   # 0 on broadcast dims
    stride_seg_b,
    IS_CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_INDEX: tl.constexpr,     # per-task prefixes: row b reads prefix PrefixIndex[b]
    HAS_DROPOUT: tl.constexpr,   # constexpr: without it no Philox code is generated at all
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,       # next power of two >= head_dim (tl.arange needs a power of 2)
    INPUT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr = False,   # Hopper: K/V tiles through tensor descriptors (TMA)
    HAS_BIAS: tl.constexpr = False, HAS_SINKS: tl.constexpr = False,
    IS_PACKED: tl.constexpr = False, HAS_WINDOW: tl.constexpr = False,
    SOFTCAP: tl.constexpr = False,
):
    # Last dims are contiguous (the launcher guarantees it): d offsets need no stride, and
    # the loads vectorize.
    q_block = tl.program_id(0)
    q_head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    kv_head = (q_head // group_size).to(tl.int64)
    if HAS_INDEX:
        prefix_row = tl.load(PrefixIndex + batch).to(tl.int64)
    else:
        prefix_row = batch

    q_pos = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = q_pos < q_len
    d_ok = offs_d < head_dim
    q_ptr = Q + batch * stride_q_b + q_head.to(tl.int64) * stride_q_h \
        + q_pos[:, None].to(tl.int64) * stride_q_l + offs_d[None, :]
    q = tl.load(q_ptr, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if HAS_SINKS:
        # The sink's exp2(sink - m) = 1 at m = sink: it joins the normalizer from the start.
        m_i = tl.zeros((BLOCK_M,), dtype=tl.float32) + tl.load(Sinks + q_head) * _LOG2E
        l_i = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
    else:
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(Seed)
        row = (batch * tl.num_programs(1) + q_head) * q_len + q_pos
        rng_rows = row.to(tl.int64) * (prefix_len + key_len)
    else:
        seed = 0
        rng_rows = q_pos
    key_shift = key_len - q_len
    bias = Bias + batch * stride_bias_b + q_head.to(tl.int64) * stride_bias_h
    pk = PrefixK + prefix_row * stride_pk_b + kv_head * stride_pk_h
    pv = PrefixV + prefix_row * stride_pv_b + kv_head * stride_pv_h
    k = K + batch * stride_k_b + kv_head * stride_k_h
    v = V + batch * stride_v_b + kv_head * stride_v_h
    if USE_TMA:
        pk = tl.make_tensor_descriptor(pk, [prefix_len, head_dim], [stride_pk_l, 1],
                                       [BLOCK_N, BLOCK_D])
        pv = tl.make_tensor_descriptor(pv, [prefix_len, head_dim], [stride_pv_l, 1],
                                       [BLOCK_N, BLOCK_D])
        k = tl.make_tensor_descriptor(k, [key_len, head_dim], [stride_k_l, 1],
                                      [BLOCK_N, BLOCK_D])
        v = tl.make_tensor_descriptor(v, [key_len, head_dim], [stride_v_l, 1],
                                      [BLOCK_N, BLOCK_D])
    mask = Mask + batch * stride_mask_b
    sources = (pk, pv, stride_pk_l, stride_pv_l, prefix_len, k, v, mask, stride_k_l, stride_v_l,
               stride_mask_l, key_len)
    # The keys in passes (attention_blocks.key_passes): a lower edge with a window or packing
    # only, the open blocks, the upper edge; each one loop over its prefix blocks and then its
    # sequence blocks. Blocks outside every query's interval are never loaded.
    WINDOWED: tl.constexpr = HAS_WINDOW or IS_PACKED
    if WINDOWED:
        seq_lo, seq_hi, pre_lo = query_bounds(
            q_pos, row_ok, SegStart + batch * stride_seg_b, SegEnd + batch * stride_seg_b,
            key_len, key_shift, window_left, window_right, prefix_left, prefix_len,
            IS_CAUSAL=IS_CAUSAL, HAS_WINDOW=HAS_WINDOW, IS_PACKED=IS_PACKED)
    else:
        # Only the causal bound: a window's interval vectors, kept alive without one, cost
        # ptxas registers and spills.
        pre_lo = q_pos           # unused without a window
        seq_lo = q_pos
        seq_hi = q_pos + key_shift
    pre_cuts, seq_cuts, hi_col = key_passes(
        q_block * BLOCK_M, row_ok, pre_lo, seq_lo, seq_hi, prefix_len, key_len, key_shift,
        IS_CAUSAL=IS_CAUSAL, WINDOWED=WINDOWED, PREFIX_OPEN=True, BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N)
    for n in tl.static_range(3):
        acc, m_i, l_i = _attend_blocks(
            acc, m_i, l_i, q, q_pos, row_ok, head_dim, qk_scale, softcap_scale,
            bias, stride_bias_l, stride_bias_c, seed, dropout_p, rng_rows,
            sources, pre_cuts, seq_cuts, pre_lo, seq_lo, hi_col, PASS=n, WINDOWED=WINDOWED,
            IS_CAUSAL=IS_CAUSAL, HAS_MASK=HAS_MASK, HAS_BIAS=HAS_BIAS, SOFTCAP=SOFTCAP,
            HAS_DROPOUT=HAS_DROPOUT, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
            INPUT_PRECISION=INPUT_PRECISION, USE_TMA=USE_TMA)

    # A row with no visible key (possible only without a prefix or sinks) has l = 0: output
    # zeros and LSE = +inf, so the backward's recomputed probabilities exp2(s - LSE) are all 0.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    if HAS_DROPOUT:
        # The kept probabilities' 1 / (1 - p), applied once per row instead of per entry.
        out = acc * ((1.0 / (1.0 - dropout_p)) / l_safe)[:, None]
    else:
        out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    out_ptr = Out + batch * stride_o_b + q_head.to(tl.int64) * stride_o_h \
        + q_pos[:, None].to(tl.int64) * stride_o_l + offs_d[None, :]
    tl.store(out_ptr, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse_ptr = Lse + batch * stride_lse_b + q_head.to(tl.int64) * stride_lse_h + q_pos
    tl.store(lse_ptr, lse, mask=row_ok)


@on_input_device
def prefix_attention_fwd(q, k, v, prefix_k=None, prefix_v=None, spec=AttentionSpec(), *,
                         out=None, config=None):
    """Returns (out, lse).

    q (B, Hq, Lq, D); k, v (B, Hkv, Lk, D); prefix_k/v None, (Hkv, P, D), (B, Hkv, P, D) or
    (T, Hkv, P, D) with spec.prefix_index (B,).
    spec: the call's `AttentionSpec`, every field computed: attention_mask (B, Lk) bool/int,
    true = attend; prefix_index; causal; scale (None: D ** -0.5); dropout_p > 0 drops
    probabilities as `dropout_keep_mask(spec.dropout_seed, ...)` says (dropout_seed: 0-d int64
    tensor on q's device, read by the kernel: no host sync); the attention terms bias, sinks,
    segments, window_size, prefix_in_window, softcap (kernels/attention_terms.py).
    out: (B, Hq, Lq, D) in q's dtype, laid out as (B, Lq, Hq, D) so that
    `out.transpose(1, 2).reshape(B, Lq, Hq * D)` is free; pass `out=` to write into any
    (B, Hq, Lq, D) tensor with a contiguous last dim. lse: (B, Hq, Lq) fp32, base 2, in units
    of the scaled scores (+inf for a row with no visible key).
    config: a `TileConfig` to launch instead of the tuned one (tests, tuning).
    """
    x = ForwardInputs.prepare(q, k, v, prefix_k, prefix_v, spec, out)
    B, Hq, Lq, D = x.q.shape
    Hkv, Lk, P, mask, out, lse = x.k.shape[1], x.k.shape[2], x.prefix_len, x.mask, x.out, x.lse
    if out.numel() == 0:
        return out, lse
    terms = Terms.of(spec)
    causal, dropout_p = spec.causal, spec.dropout_p
    qk_scale, softcap_scale = terms.qk_scales(x.scale)
    if qk_scale <= 0 and spec.bias is None:
        # The loops scale inside exp2's argument (online_softmax), which needs a scale > 0
        # (the row max must commute with it; a hidden key's -inf times 0 is NaN): a negative
        # scale's sign goes into q (negation is exact, so are the scores), a zero scale makes
        # q zero with scale 1 (every score exactly 0, as before).
        x.q, qk_scale = (x.q.neg(), -qk_scale) if qk_scale < 0 else (torch.zeros_like(x.q), 1.0)
    tma = tma_ready(x.prefix_k, x.prefix_v, x.k, x.v)

    def launch(cfg: TileConfig) -> None:
        grid = (cdiv(Lq, cfg.block_m), Hq, B)
        _prefix_attention_fwd_kernel[grid](
            out, lse, *x.pointers(), seed_arg(dropout_p, spec.dropout_seed, x.q),
            *terms.pointers(x.q), Lq, Lk, P, D, Hq // Hkv, qk_scale, float(dropout_p),
            softcap_scale, *x.strides(), *terms.ints(), **terms.flags(),
            IS_CAUSAL=causal, HAS_MASK=mask is not None, HAS_INDEX=x.index is not None,
            HAS_DROPOUT=dropout_p > 0,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=head_block(D),
            INPUT_PRECISION=input_precision(q.dtype),
            USE_TMA=cfg.tma and tma,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    if config is not None:
        launch(config)
    else:
        launch_tuned("fwd", q.device, q.dtype, D,
                     (causal, mask is not None, dropout_p > 0, length_bucket(Lq),
                      length_bucket(P + Lk), tma, *terms.key()), launch,
                     dropout=dropout_p > 0, terms=terms.any, tma=tma)
    return out, lse


def tma_ready(*tensors: torch.Tensor) -> bool:
    """Whether K, V and the prefixes can be read through tensor descriptors: a Triton that has
    them, every tensor non-empty, its address and its row / head / batch strides multiples of
    16 bytes (TMA's rule). Otherwise the launch takes a pointer-load tile (tiles.candidates);
    a TMA config passed explicitly runs its pointer loads (same tile)."""
    if not hasattr(tl, "make_tensor_descriptor"):
        return False
    for t in tensors:
        size = t.element_size()
        if t.numel() == 0 or t.data_ptr() % 16 or any(st * size % 16 for st in t.stride()[:-1]):
            return False
    if tensors[0].device.type == "cuda":
        _ensure_descriptor_allocator()
    return True


def _descriptor_buffer(size: int, alignment: int, stream) -> torch.Tensor:
    """Scratch memory for descriptors made inside a kernel, from torch's caching allocator."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_descriptor_allocator() -> None:
    """Gives Triton `_descriptor_buffer` to allocate the descriptors' scratch memory, at every
    TMA launch: `triton.set_allocator` stores it in a ContextVar, so another thread or context
    (autograd's device thread recomputing a checkpointed layer, DataParallel's replicas, an
    asyncio task) starts without one ("no allocator was set"). An allocator the caller set
    in this context is kept; only the null default is replaced (one ContextVar read)."""
    current = getattr(_allocation, "_allocator", None)
    if current is None or isinstance(current.get(), _allocation.NullAllocator):
        triton.set_allocator(_descriptor_buffer)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (see kernels/compile_specs.py)

def compile_specs():
    """The forward kernel for every tile candidate (kernels/tiles.py) on the archs that list it,
    a few also with dropout, and with the attention terms' variants (kernels/attention_specs.py;
    the dropout-mask kernel's spec is attention_dropout.py's)."""
    for i, dtype, elem, precision, block_d, causal, has_mask, has_dropout in spec_variants():
        for cfg, archs in spec_configs("fwd", dtype != torch.float32, block_d):
            constexprs = dict(IS_CAUSAL=causal, HAS_MASK=has_mask, HAS_INDEX=i % 2 == 0,
                              HAS_DROPOUT=has_dropout,
                              BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
                              INPUT_PRECISION=precision, USE_TMA=cfg.tma)
            types = {name: f"*{elem}" for name in ("Out", "Q", "K", "V", "PrefixK", "PrefixV")}
            types.update(Lse="*fp32", Mask="*i8", PrefixIndex="*i64", Seed="*i64",
                         qk_scale="fp32", dropout_p="fp32")
            flags = ",".join(f"{k}={v}" for k, v in constexprs.items())
            flags += f",w{cfg.num_warps}s{cfg.num_stages}"
            yield CompileSpec(f"prefix_attention_fwd[{elem},{flags}]",
                              _prefix_attention_fwd_kernel,
                              spec_signature(_prefix_attention_fwd_kernel, constexprs, types),
                              constexprs, cfg.num_warps, cfg.num_stages, archs,
                              ints=spec_ints(constexprs))
    yield from term_compile_specs(
        "fwd", _prefix_attention_fwd_kernel, "fwd", ("Out", "Q", "K", "V", "PrefixK", "PrefixV"),
        dict(Lse="*fp32", Mask="*i8", PrefixIndex="*i64", Seed="*i64", qk_scale="fp32",
             dropout_p="fp32"),
        lambda causal, cfg: dict(IS_CAUSAL=causal, HAS_MASK=True, HAS_INDEX=False,
                                 HAS_DROPOUT=False, USE_TMA=False), takes_sinks=True)
