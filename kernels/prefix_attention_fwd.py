"""Prefix attention forward: softmax(q [prefix_k; k]^T * scale + mask) [prefix_v; v].

FlashAttention-2 style: one program per (query block, query head, batch row) streams first the
prefix keys, then the sequence keys, straight from their own tensors (no concatenation, no
per-row copy of a shared prefix, no repeated GQA heads) with an online softmax in base 2.

Prefix keys are visible to every query, so their blocks need only a bounds mask. Sequence key j
is visible to query i iff the padding mask allows it and, when causal, j <= i + (Lk - Lq)
(bottom-right aligned). Blocks that the causal mask removes for the whole query block are never
visited; blocks it leaves untouched run without the causal mask.

Attention-probability dropout (HAS_DROPOUT): entry (b, h, i, c) of the probabilities, c numbering
the concatenated [prefix; sequence] keys, is kept iff `dropout_keep` says so: a Philox draw at
the global offset ((b * Hq + h) * Lq + i) * (P + Lk) + c (int64), so the mask depends on the
seed and the shapes only, never on the tile sizes, and the backward regenerates it exactly.
The normalizer l_i sums the undropped probabilities; acc sums the kept ones, scaled by
1 / (1 - p) once at the end. `dropout_keep_mask` materializes the same mask for tests.

The log-sum-exp (base 2, in units of the scaled scores, fp32) is saved for the backward; a query
row that sees no key stores LSE = +inf, which makes every probability the backward recomputes
exactly 0, and outputs zeros.

fp32 inputs: the dots follow torch's CUDA matmul setting (`fp32_matmul_precision`) — tf32
when `torch.backends.cuda.matmul.fp32_precision` (or `torch.backends.fp32_precision`) is
"tf32" or, with neither set, `torch.get_float32_matmul_precision()` is "high" or "medium";
exact fp32 ("ieee") otherwise (torch's default).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
import torch
import triton
import triton.language as tl
from triton.runtime import _allocation   # the allocator's ContextVar: see _ensure_descriptor_allocator

from .launch import define_kernels
from .attention_terms import (
    LOG2E,  # noqa: F401  (re-exported: the decode kernel reads it from here)
    NO_TERMS,
    _LOG2E,
    block_ranges,
    load_bias,
    logits,
    query_bounds,
    term_compile_specs,
)
from .autotune import launch_tuned, length_bucket
from .compile_specs import CompileSpec
from .launch import (
    as_seed_tensor,
    cdiv,
    contiguous_last,
    dense_index,
    interpreting,
    on_device,
    on_input_device,
)
from .tiles import TileConfig, head_block, spec_configs  # noqa: F401  (re-exported)


define_kernels()     # before the first @triton.jit: see launch.interpreting

@triton.jit
def dropout_keep(seed, offsets, dropout_p):
    """True where the probability at Philox `offsets` (int64, see the module docstring) is
    kept. Every kernel and `dropout_keep_mask` decide through this one function."""
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def online_softmax(s, m_i, l_i):
    """One block of the online softmax in base 2, for scores s (rows x keys) and the running
    (max, normalizer) of each row: (p, alpha, m_new, l_new), with acc to be rescaled by alpha.
    A row that has seen only masked keys keeps m = -inf; shifting by 0 instead keeps its
    probabilities exactly 0 rather than NaN (-inf - -inf)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
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
def _attend_blocks(
    acc, m_i, l_i, q,
    K, V, Mask, Bias,            # K, V already at (row, kv head) — pointers, or with USE_TMA
                                 # (key_len, head_dim) tensor descriptors; Mask at the row;
                                 # Bias at (row, head)
    start, end,                  # key range [start, end); start is a multiple of BLOCK_N
    stride_k_l, stride_v_l, stride_mask_l, stride_bias_l, stride_bias_c,
    key_len, head_dim, key_lo, key_hi,   # per-query visible interval (attention_terms.py)
    q_pos, q_ok, qk_scale, softcap_scale,
    seed, dropout_p, rng_rows, col0,     # dropout: Philox row offsets (BLOCK_M,) int64; col0:
                                         # the range's first column in [prefix; sequence]
    CHECK_KEYS: tl.constexpr,    # bounds mask (and the interval checks below) on this range
    CHECK_LO: tl.constexpr, CHECK_HI: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr = False,
):
    """Online-softmax update of (acc, m_i, l_i) with the keys [start, end) of one K/V pair."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    for start_n in range(start, end, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        key_ok = keys < key_len
        if HAS_MASK:
            # A padded key is never read, as one past the end: NaN or inf there (0 * NaN in
            # p V) must not reach the output.
            key_ok = key_ok & (tl.load(Mask + keys * stride_mask_l, mask=key_ok, other=0) != 0)
        if CHECK_KEYS or HAS_MASK:
            kt_mask = d_ok[:, None] & key_ok[None, :]
            v_mask = key_ok[:, None] & d_ok[None, :]
        else:
            kt_mask = d_ok[:, None]
            v_mask = d_ok[None, :]
        if USE_TMA:
            # The descriptor's bounds give the zeros a masked load would (keys >= key_len,
            # columns >= head_dim); padded keys are hidden from the logits below, their
            # values zeroed after the load.
            kt = tl.trans(K.load([start_n, 0]))
        else:
            kt = tl.load(K + keys[None, :].to(tl.int64) * stride_k_l + offs_d[:, None],
                         mask=kt_mask, other=0.0)
        s, _ = logits(tl.dot(q, kt, input_precision=INPUT_PRECISION), qk_scale, softcap_scale,
                      SOFTCAP)
        if HAS_BIAS:
            s += load_bias(Bias, q_pos[:, None], col0 + keys[None, :], q_ok[:, None],
                           key_ok[None, :], stride_bias_l, stride_bias_c)
        if CHECK_KEYS or HAS_MASK:
            visible = key_ok[None, :]
            if CHECK_KEYS:
                if CHECK_HI:
                    visible = visible & (keys[None, :] <= key_hi[:, None])
                if CHECK_LO:
                    visible = visible & (keys[None, :] >= key_lo[:, None])
            s = tl.where(visible, s, float("-inf"))
        p, alpha, m_new, l_i = online_softmax(s, m_i, l_i)
        if HAS_DROPOUT:
            cols = (col0 + keys).to(tl.int64)
            p = tl.where(dropout_keep(seed, rng_rows[:, None] + cols[None, :], dropout_p), p, 0.0)
        if USE_TMA:
            v = V.load([start_n, 0])
            if HAS_MASK:
                v = tl.where(key_ok[:, None], v, 0.0)
        else:
            v = tl.load(V + keys[:, None].to(tl.int64) * stride_v_l + offs_d[None, :],
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
    if HAS_WINDOW or IS_PACKED:
        # Per-query key intervals (attention_terms.py). Prefix keys below every query's window
        # are skipped, the rest masked; sequence blocks inside every query's interval run
        # without interval masks, blocks outside all of them are never loaded.
        seq_lo, seq_hi, pre_lo = query_bounds(
            q_pos, row_ok, SegStart + batch * stride_seg_b, SegEnd + batch * stride_seg_b,
            key_len, key_shift, window_left, window_right, prefix_left, prefix_len, IS_CAUSAL,
            HAS_WINDOW, IS_PACKED)
        pre_start, _, _, _ = block_ranges(pre_lo, pre_lo, row_ok, prefix_len, BLOCK_N)
        acc, m_i, l_i = _attend_blocks(
            acc, m_i, l_i, q, pk, pv, Mask, bias, pre_start, prefix_len, stride_pk_l,
            stride_pv_l, 0, stride_bias_l, stride_bias_c, prefix_len, head_dim, pre_lo, pre_lo,
            q_pos, row_ok, qk_scale, softcap_scale, seed, dropout_p, rng_rows, 0,
            True, HAS_WINDOW, False, False, HAS_BIAS, SOFTCAP, HAS_DROPOUT, BLOCK_N, BLOCK_D,
            INPUT_PRECISION, USE_TMA)
        start, full_start, full_end, end = block_ranges(seq_lo, seq_hi, row_ok, key_len, BLOCK_N)
        acc, m_i, l_i = _attend_blocks(
            acc, m_i, l_i, q, k, v, mask, bias, start, full_start, stride_k_l, stride_v_l,
            stride_mask_l, stride_bias_l, stride_bias_c, key_len, head_dim, seq_lo, seq_hi,
            q_pos, row_ok, qk_scale, softcap_scale, seed, dropout_p, rng_rows, prefix_len,
            True, True, True, HAS_MASK, HAS_BIAS, SOFTCAP, HAS_DROPOUT,
            BLOCK_N, BLOCK_D, INPUT_PRECISION, USE_TMA)
        acc, m_i, l_i = _attend_blocks(
            acc, m_i, l_i, q, k, v, mask, bias, full_start, full_end, stride_k_l, stride_v_l,
            stride_mask_l, stride_bias_l, stride_bias_c, key_len, head_dim, seq_lo, seq_hi,
            q_pos, row_ok, qk_scale, softcap_scale, seed, dropout_p, rng_rows, prefix_len,
            False, False, False, HAS_MASK, HAS_BIAS, SOFTCAP, HAS_DROPOUT,
            BLOCK_N, BLOCK_D, INPUT_PRECISION, USE_TMA)
        acc, m_i, l_i = _attend_blocks(
            acc, m_i, l_i, q, k, v, mask, bias, full_end, end, stride_k_l, stride_v_l,
            stride_mask_l, stride_bias_l, stride_bias_c, key_len, head_dim, seq_lo, seq_hi,
            q_pos, row_ok, qk_scale, softcap_scale, seed, dropout_p, rng_rows, prefix_len,
            True, True, True, HAS_MASK, HAS_BIAS, SOFTCAP, HAS_DROPOUT,
            BLOCK_N, BLOCK_D, INPUT_PRECISION, USE_TMA)
    else:
        # Prefix keys: every query sees all of them; only the last block needs a bounds mask.
        # Sequence keys: the fully visible blocks run without the causal mask; keys the causal
        # mask hides from the whole block are never loaded. (No interval vectors stay alive
        # here: ptxas counted 28 more registers and 416 B of spills with them, sm_90 D = 64.)
        prefix_full = prefix_len // BLOCK_N * BLOCK_N
        acc, m_i, l_i = _attend_blocks(
            acc, m_i, l_i, q, pk, pv, Mask, bias, 0, prefix_full, stride_pk_l, stride_pv_l, 0,
            stride_bias_l, stride_bias_c, prefix_len, head_dim, q_pos, q_pos, q_pos, row_ok,
            qk_scale, softcap_scale, seed, dropout_p, rng_rows, 0,
            False, False, False, False, HAS_BIAS, SOFTCAP, HAS_DROPOUT, BLOCK_N, BLOCK_D,
            INPUT_PRECISION, USE_TMA)
        acc, m_i, l_i = _attend_blocks(
            acc, m_i, l_i, q, pk, pv, Mask, bias, prefix_full, prefix_len, stride_pk_l,
            stride_pv_l, 0, stride_bias_l, stride_bias_c, prefix_len, head_dim, q_pos, q_pos,
            q_pos, row_ok, qk_scale, softcap_scale, seed, dropout_p, rng_rows, 0,
            True, False, False, False, HAS_BIAS, SOFTCAP, HAS_DROPOUT, BLOCK_N, BLOCK_D,
            INPUT_PRECISION, USE_TMA)
        full_end, end = sequence_key_range(q_block * BLOCK_M, key_shift, key_len, IS_CAUSAL,
                                           BLOCK_M, BLOCK_N)
        acc, m_i, l_i = _attend_blocks(
            acc, m_i, l_i, q, k, v, mask, bias, 0, full_end, stride_k_l, stride_v_l,
            stride_mask_l, stride_bias_l, stride_bias_c, key_len, head_dim, q_pos,
            q_pos + key_shift, q_pos, row_ok, qk_scale, softcap_scale, seed, dropout_p,
            rng_rows, prefix_len,
            False, False, False, HAS_MASK, HAS_BIAS, SOFTCAP, HAS_DROPOUT,
            BLOCK_N, BLOCK_D, INPUT_PRECISION, USE_TMA)
        acc, m_i, l_i = _attend_blocks(
            acc, m_i, l_i, q, k, v, mask, bias, full_end, end, stride_k_l, stride_v_l,
            stride_mask_l, stride_bias_l, stride_bias_c, key_len, head_dim, q_pos,
            q_pos + key_shift, q_pos, row_ok, qk_scale, softcap_scale, seed, dropout_p,
            rng_rows, prefix_len,
            True, False, IS_CAUSAL, HAS_MASK, HAS_BIAS, SOFTCAP, HAS_DROPOUT,
            BLOCK_N, BLOCK_D, INPUT_PRECISION, USE_TMA)

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


# --------------------------------------------------------------------------------------------
# Launch-side helpers shared with the backward modules.

def input_precision(dtype: torch.dtype) -> str:
    """tf32 for fp32 dots only when torch would use it for fp32 matmuls (see module docstring);
    16-bit dots ignore the setting, so they share the default's compiled kernels."""
    if dtype == torch.float32 and fp32_matmul_precision() == "ieee":
        return "ieee"
    return "tf32"


def fp32_matmul_precision() -> str:
    """"ieee" or "tf32": what torch's CUDA fp32 matmuls use now. The per-backend setting of
    torch >= 2.9 (`torch.backends.cuda.matmul.fp32_precision`, "none" = inherit from
    `torch.backends.fp32_precision`) decides first: once it is set, the legacy getter
    `torch.get_float32_matmul_precision()` raises ("mix of the legacy and new APIs"). The
    legacy setting decides only where neither level is set (a legacy set also writes the
    per-backend one) or on a torch without the new API."""
    for level in (torch.backends.cuda.matmul, torch.backends):
        value = getattr(level, "fp32_precision", "none")
        if value in ("ieee", "tf32"):
            return value
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def mask_as_int8(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, Lk) bool/int -> int8 with 0 = hidden; one kernel signature for every mask dtype."""
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask != 0
    return attention_mask.view(torch.int8)


def prefix_views(prefix_k, prefix_v, k, v):
    """Returns (prefix_k4, prefix_v4, P) with 4-D prefixes; a shared (Hkv, P, D) prefix becomes a
    stride-0 batch view (never copied). P = 0 (or no prefix) points at k/v with no keys to read."""
    if prefix_k is None or prefix_k.shape[-2] == 0:
        return k[:, :, :0], v[:, :, :0], 0
    prefix_k, prefix_v = contiguous_last(prefix_k), contiguous_last(prefix_v)
    if prefix_k.dim() == 3:
        prefix_k, prefix_v = prefix_k.unsqueeze(0), prefix_v.unsqueeze(0)
    return prefix_k, prefix_v, prefix_k.shape[-2]


def prefix_batch_stride(prefix: torch.Tensor, shared: bool) -> int:
    return 0 if shared else prefix.stride(0)


def strides3(t: torch.Tensor) -> tuple[int, int, int]:
    """Strides of the three leading dims of a (B, H, L, D) tensor (D is contiguous)."""
    return t.stride(0), t.stride(1), t.stride(2)


@dataclass
class ForwardInputs:
    """A forward launch's inputs as the kernels read them: last dims contiguous, 4-D prefixes
    (a shared one as a stride-0 batch view, never copied), an int8 mask, a dense index, and the
    output (laid out as (B, Lq, Hq, D)) and its LSE allocated. Shared by the prefill and decode
    launchers, whose kernels take the same pointers and strides."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    prefix_k: torch.Tensor       # 4-D view; k[:, :, :0] when P = 0
    prefix_v: torch.Tensor
    prefix_len: int
    shared: bool                 # the prefix is one (Hkv, P, D) for every row
    mask: torch.Tensor | None
    index: torch.Tensor | None
    scale: float
    out: torch.Tensor
    lse: torch.Tensor

    @classmethod
    def prepare(cls, q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, scale, out):
        q, k, v = contiguous_last(q), contiguous_last(k), contiguous_last(v)
        B, Hq, Lq, D = q.shape
        pk, pv, P = prefix_views(prefix_k, prefix_v, k, v)
        if out is None:
            out = torch.empty(B, Lq, Hq, D, dtype=q.dtype, device=q.device).transpose(1, 2)
        return cls(q, k, v, pk, pv, P, prefix_k is not None and prefix_k.dim() == 3,
                   mask_as_int8(attention_mask), dense_index(prefix_index) if P > 0 else None,
                   D ** -0.5 if scale is None else float(scale), out,
                   torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device))

    def pointers(self) -> tuple:
        """Q, K, V, PrefixK, PrefixV, Mask, PrefixIndex (q stands in for an absent one)."""
        return (self.q, self.k, self.v, self.prefix_k, self.prefix_v,
                self.q if self.mask is None else self.mask,
                self.q if self.index is None else self.index)

    def strides(self) -> tuple:
        """q, k, v, prefix K, prefix V, out (b, h, l each), lse (b, h), mask (b, l)."""
        mask = (0, 0) if self.mask is None else self.mask.stride()
        return (*strides3(self.q), *strides3(self.k), *strides3(self.v),
                prefix_batch_stride(self.prefix_k, self.shared), *self.prefix_k.stride()[1:3],
                prefix_batch_stride(self.prefix_v, self.shared), *self.prefix_v.stride()[1:3],
                *strides3(self.out), *self.lse.stride()[:2], *mask)


@on_input_device
def prefix_attention_fwd(q, k, v, prefix_k=None, prefix_v=None, attention_mask=None,
                         prefix_index=None, *, causal=True, scale=None, out=None, config=None,
                         dropout_p=0.0, dropout_seed=None, terms=NO_TERMS):
    """Returns (out, lse).

    q (B, Hq, Lq, D); k, v (B, Hkv, Lk, D); prefix_k/v None, (Hkv, P, D), (B, Hkv, P, D) or
    (T, Hkv, P, D) with prefix_index (B,). attention_mask (B, Lk) bool/int, true = attend.
    out: (B, Hq, Lq, D) in q's dtype, laid out as (B, Lq, Hq, D) so that
    `out.transpose(1, 2).reshape(B, Lq, Hq * D)` is free; pass `out=` to write into any
    (B, Hq, Lq, D) tensor with a contiguous last dim. lse: (B, Hq, Lq) fp32, base 2, in units
    of the scaled scores (+inf for a row with no visible key).
    dropout_p > 0 drops probabilities as `dropout_keep_mask(dropout_seed, ...)` says;
    dropout_seed: 0-d int64 tensor on q's device (read by the kernel: no host sync).
    terms: `attention_terms.Terms` (bias, window, softcap, sinks, packed segments).
    """
    x = ForwardInputs.prepare(q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, scale,
                              out)
    B, Hq, Lq, D = x.q.shape
    Hkv, Lk, P, mask, out, lse = x.k.shape[1], x.k.shape[2], x.prefix_len, x.mask, x.out, x.lse
    if out.numel() == 0:
        return out, lse
    terms = terms.prepare()
    qk_scale, softcap_scale = terms.qk_scales(x.scale)

    def launch(cfg: TileConfig) -> None:
        grid = (cdiv(Lq, cfg.block_m), Hq, B)
        _prefix_attention_fwd_kernel[grid](
            out, lse, *x.pointers(), seed_arg(dropout_p, dropout_seed, x.q),
            *terms.pointers(x.q), Lq, Lk, P, D, Hq // Hkv, qk_scale, float(dropout_p),
            softcap_scale, *x.strides(), *terms.ints(), **terms.flags(),
            IS_CAUSAL=causal, HAS_MASK=mask is not None, HAS_INDEX=x.index is not None,
            HAS_DROPOUT=dropout_p > 0,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=head_block(D),
            INPUT_PRECISION=input_precision(q.dtype),
            USE_TMA=cfg.tma and tma_ready(x.prefix_k, x.prefix_v, x.k, x.v),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    if config is not None:
        launch(config)
    else:
        launch_tuned("fwd", q.device, q.dtype, D,
                     (causal, mask is not None, dropout_p > 0, length_bucket(Lq),
                      length_bucket(P + Lk), *terms.key()), launch, dropout=dropout_p > 0,
                     terms=terms.any)
    return out, lse


def tma_ready(*tensors: torch.Tensor) -> bool:
    """Whether K, V and the prefixes can be read through tensor descriptors: a Triton that has
    them, every tensor non-empty, its address and its row / head / batch strides multiples of
    16 bytes (TMA's rule). Otherwise the TMA config runs its pointer loads (same tiles)."""
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
# The dropout keep-mask, materialized (tests; the reference path's mask on CUDA/interpreter)

@triton.jit
def _dropout_mask_kernel(
    Keep, Seed,
    q_len, num_cols, dropout_p,
    stride_keep_bh, stride_keep_l,       # Keep viewed as (B * Hq, Lq, P + Lk), last dim dense
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One grid axis, (b * Hq + h, query block, column block) from the slowest: B * Hq passes
    # the 65,535 programs of axes 1 and 2 (CUDA's limit) at B = 2048, Hq = 32.
    col_blocks = tl.cdiv(num_cols, BLOCK_N)
    q_blocks = tl.cdiv(q_len, BLOCK_M)
    program = tl.program_id(0)
    col_block = program % col_blocks
    q_block = program // col_blocks % q_blocks
    batch_head = (program // col_blocks // q_blocks).to(tl.int64)      # b * Hq + h
    q_pos = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    rng_rows = (batch_head * q_len + q_pos) * num_cols
    keep = dropout_keep(tl.load(Seed), rng_rows[:, None] + cols[None, :].to(tl.int64), dropout_p)
    ptr = Keep + batch_head * stride_keep_bh + q_pos[:, None].to(tl.int64) * stride_keep_l \
        + cols[None, :]
    tl.store(ptr, keep.to(tl.int8), mask=(q_pos < q_len)[:, None] & (cols < num_cols)[None, :])


MASK_BLOCK = (32, 64)


def seed_arg(dropout_p, dropout_seed, like):
    """The kernels' Seed pointer: the seed tensor with dropout, any tensor (never read) without."""
    if dropout_p > 0 and dropout_seed is None:
        raise ValueError("dropout_p > 0 needs a dropout_seed")
    return dropout_seed if dropout_p > 0 else like


def dropout_keep_mask(seed, B, Hq, Lq, P, Lk, p, device):
    """Bool (B, Hq, Lq, P + Lk): True where the attention kernels keep probability
    (b, h, i, c) (c numbers [prefix; sequence] keys) for this seed (int or 0-d int tensor)
    and drop probability p. Exactly the kernels' mask: same Philox offsets."""
    device = torch.device(device)
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise ValueError(f"dropout_keep_mask runs a Triton kernel: it needs a CUDA device, or CPU "
                         f"tensors with TRITON_INTERPRET=1 set before import; got device={device}")
    keep = torch.empty(B, Hq, Lq, P + Lk, dtype=torch.int8, device=device)
    if keep.numel() > 0:
        block_m, block_n = MASK_BLOCK
        grid = (cdiv(P + Lk, block_n) * cdiv(Lq, block_m) * B * Hq,)
        with on_device(device):
            _dropout_mask_kernel[grid](
                keep, as_seed_tensor(seed, device), Lq, P + Lk, float(p),
                keep.stride(1), keep.stride(2), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return keep.view(torch.bool)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (see kernels/compile_specs.py)

# (causal, padding mask) combinations, rotated over the specs so that every dtype and every head
# block meets each combination's code without compiling the full cross product (~2 s a spec).
FLAG_COMBOS = ((True, True), (True, False), (False, True), (False, False))

# (torch dtype, Triton element type, dot input precision, BLOCK_D) per spec variant: every
# (16-bit?, BLOCK_D) table entry once, fp16 and bf16 taking turns (same tiles, same code; bf16
# at D = 128, the common head dim); fp32 alternates exact and tf32 dots.
SPEC_VARIANTS = (
    (torch.float16, "fp16", "tf32", 32), (torch.bfloat16, "bf16", "tf32", 64),
    (torch.bfloat16, "bf16", "tf32", 128), (torch.float16, "fp16", "tf32", 256),
    (torch.float32, "fp32", "ieee", 32), (torch.float32, "fp32", "tf32", 64),
    (torch.float32, "fp32", "ieee", 128), (torch.float32, "fp32", "tf32", 256),
)


def spec_signature(fn, constexprs: dict, types: dict) -> dict:
    """Triton types for every runtime argument of `fn`: `types` names pointers and floats;
    every other runtime argument is an i32 size or stride. A constexpr parameter the spec
    leaves out keeps its default (it must never be compiled as a runtime int)."""
    params = inspect.signature(fn.fn).parameters
    constexpr = {name for name, p in params.items() if "constexpr" in str(p.annotation)}
    return {name: types.get(name, "i32") for name in params
            if name not in constexprs and name not in constexpr}


def spec_ints(constexprs: dict) -> dict:
    """The int arguments whose value at a benchmark launch is not a multiple of 16 (the others
    get compile_specs.REPRESENTATIVE_INT): GQA 4:1, and with a (B, Lk) padding mask its unit
    last stride, which the JIT turns into the constant 1."""
    return {"group_size": 4, **({"stride_mask_l": 1} if constexprs.get("HAS_MASK") else {})}


# Spec variants compiled a second time with HAS_DROPOUT (BERT/RoBERTa shapes: 16-bit at D = 64
# and 128, fp32 at D = 64), on top of every variant without it: dropout adds Philox arithmetic
# in registers, not shared memory, so a few configs prove that code lowers.
DROPOUT_VARIANTS = (1, 2, 5)


def spec_variants():
    """Yields (index, torch dtype, element type, precision, BLOCK_D, causal, has_mask,
    has_dropout): every SPEC_VARIANTS entry without dropout, then DROPOUT_VARIANTS with it."""
    for has_dropout in (False, True):
        for i, (dtype, elem, precision, block_d) in enumerate(SPEC_VARIANTS):
            if has_dropout and i not in DROPOUT_VARIANTS:
                continue
            causal, has_mask = FLAG_COMBOS[i % len(FLAG_COMBOS)]
            yield i, dtype, elem, precision, block_d, causal, has_mask, has_dropout


def compile_specs():
    """The forward kernel for every tile candidate (kernels/tiles.py) on the archs that list it,
    a few also with dropout, with the attention terms' variants, and the dropout-mask
    kernel."""
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
    constexprs = dict(BLOCK_M=MASK_BLOCK[0], BLOCK_N=MASK_BLOCK[1])
    yield CompileSpec("prefix_attention_dropout_mask", _dropout_mask_kernel,
                      spec_signature(_dropout_mask_kernel, constexprs,
                                     {"Keep": "*i8", "Seed": "*i64", "dropout_p": "fp32"}),
                      constexprs, 4, 1)
