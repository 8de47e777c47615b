"""Prefix attention for a few queries per row (decoding): split-key ("flash-decoding") forward.

Same function as `prefix_attention_fwd` (same output, same base-2 LSE), laid out for Lq <= 16:
one program per (key split, kv head x row block, batch row). Its query tile packs the Lq queries
of every query head that shares the kv head (tile row r = query position r % Lq of group head
r // Lq), so each program reads its share of that head's [prefix; sequence] keys once for the
whole group, where the prefill kernel reads them once per query head with a 128-row tile of
which Lq rows are used.

Tile shape. The MMA (mma.sync m16n8k16 on sm_80, wgmma on sm_90) computes at least 16 rows by 8
columns. Up to KEYS_MAJOR_ROWS = 8 packed rows (one token at GQA up to 8:1, or Lq <= 8 at 1:1)
the program runs keys-major (`_decode_blocks`): scores^T = K q^T, out^T = V^T p^T,
the keys and head dimensions as the MMA's rows and the 8 query columns holding the group: at
Lq = 1, GQA 4:1, 4 of 8 columns hold a query (the row-major tile used 4 of its 16 rows), at
GQA 8:1 all 8. More packed rows take row-major tiles of 16 to 64 rows, as the prefill kernel. A
dot-free variant (q * k summed over D on the CUDA cores, every row a query) was compiled and
measured slower in instructions (bench/NOTES.md, "Decode tile rows"): decoding is bound by
reading K/V, and tensor cores spend no issue slots on the padded columns.

The keys, prefix blocks then sequence blocks (BLOCK_N each, the prefix's last block partial),
are numbered as one range and cut into `num_splits` runs of whole blocks; the split count comes
from the SM count (>= 2 waves of programs). Each split writes its unnormalized fp32 partial
(acc, running max m, normalizer l) per row; a second kernel merges the splits in split order
(deterministic: no atomics, a fixed sequence of fp32 operations) and normalizes. With one split
the first kernel writes the output itself.

Masks are those of the prefill kernel (`_decode_blocks` is its `_attend_blocks` without dropout
and with the keys-major option): prefix keys are visible to every query; sequence key j is
visible to query i iff the padding mask allows it and, when causal, j <= i + (Lk - Lq). A row
with no visible key outputs zeros and LSE = +inf.
No dropout and no backward: `ptuning_fast.fused` takes this path only when no gradient is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .attention_blocks import hide_keys, online_softmax
from .attention_inputs import ForwardInputs, input_precision, strides3
from .attention_options import AttentionSpec
from .attention_specs import FLAG_COMBOS, SPEC_VARIANTS, spec_ints
from .attention_terms import LOG2E
from .compile_specs import CompileSpec, spec_signature
from .launch import (
    INTERPRETER_SPLITS,
    WAVES,
    Target,
    cdiv,
    define_kernels,
    device_target,
    next_power_of_2,
    on_input_device,
)
from .tiles import head_block

# Queries per row up to which `ptuning_fast.fused` picks this kernel (one decoding step, or a
# few draft tokens of speculative decoding); longer queries fill the prefill kernel's tiles.
MAX_QUERIES = 16

define_kernels()     # before the first @triton.jit: see launch.interpreting


@triton.jit
def _packed_rows(row_block, kv_head, group_size, q_len, BLOCK_M: tl.constexpr):
    """(query head, query position, in range) of each tile row: row r is position r % q_len of
    query head kv_head * group_size + r // q_len."""
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    q_head = kv_head * group_size + rows // q_len
    return q_head, rows % q_len, rows < group_size * q_len


@triton.jit
def _store_rows(Out, Lse, acc, m_i, l_i, batch, q_head, q_pos, row_ok,
                stride_o_b, stride_o_h, stride_o_l, stride_lse_b, stride_lse_h,
                head_dim, BLOCK_D: tl.constexpr):
    """Normalizes (acc, m, l) and stores the rows' outputs and LSEs; l = 0 (no visible key)
    gives zeros and LSE = +inf, as in the prefill kernel."""
    offs_d = tl.arange(0, BLOCK_D)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    q_pos = q_pos.to(tl.int64)
    out_ptr = Out + batch * stride_o_b + q_head[:, None] * stride_o_h \
        + q_pos[:, None] * stride_o_l + offs_d[None, :]
    tl.store(out_ptr, out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d < head_dim)[None, :])
    tl.store(Lse + batch * stride_lse_b + q_head * stride_lse_h + q_pos, lse, mask=row_ok)


@triton.jit
def _decode_blocks(
    acc,                         # fp32 output: (BLOCK_M, BLOCK_D), keys-major (BLOCK_D, BLOCK_M)
    m_i, l_i,                    # (BLOCK_M,) running max (base 2) and normalizer
    q,                           # (BLOCK_M, BLOCK_D), keys-major (BLOCK_D, BLOCK_M)
    K, V, Mask,                  # K, V at (row, kv head); Mask at the row
    start, end,                  # key range [start, end); start is a multiple of BLOCK_N
    stride_k_l, stride_v_l, stride_mask_l,
    key_len, head_dim, key_shift, q_pos, qk_scale,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, KEYS_MAJOR: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Online-softmax update of (acc, m_i, l_i) with the keys [start, end) of one K/V pair: the
    prefill kernel's `_attend_blocks` without dropout, every block bounds-checked. Key j is
    visible to query row r iff j < key_len, the padding mask allows it (HAS_MASK) and, when
    IS_CAUSAL, j <= q_pos[r] + key_shift.

    KEYS_MAJOR runs both products transposed, scores^T = K q^T and out^T = V^T p^T, so that the
    keys and the head dimensions are the MMA's rows (16 at the least) and the query rows its
    columns (8 at the least): a tile of 8 queries is no longer padded to 16."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    for start_n in range(start, end, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        key_ok = keys < key_len
        if HAS_MASK:
            # A padded key is never read, as one past the end: NaN or inf there (0 * NaN in
            # p V) must not reach the output.
            key_ok = key_ok & (tl.load(Mask + keys * stride_mask_l, mask=key_ok, other=0) != 0)
        # Each operand loaded in the orientation its dot takes (a tl.trans of a loaded tile
        # cost ptxas registers: sm_80 V^T loaded to registers, not through cp.async).
        kv_mask = key_ok[:, None] & d_ok[None, :]
        kv_mask_t = d_ok[:, None] & key_ok[None, :]
        if KEYS_MAJOR:
            k = tl.load(K + keys[:, None].to(tl.int64) * stride_k_l + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            s = tl.trans(tl.dot(k, q, input_precision=INPUT_PRECISION))
        else:
            kt = tl.load(K + keys[None, :].to(tl.int64) * stride_k_l + offs_d[:, None],
                         mask=kv_mask_t, other=0.0)
            s = tl.dot(q, kt, input_precision=INPUT_PRECISION)
        # Every block bounds-checked: the interval's upper end is the causal bound.
        s = hide_keys(s * qk_scale, keys, key_ok, q_pos, q_pos + key_shift, CHECK_KEYS=True,
                      CHECK_LO=False, CHECK_HI=IS_CAUSAL, HAS_MASK=HAS_MASK)
        p, alpha, m_new, l_i = online_softmax(s, m_i, l_i, 1.0)
        if KEYS_MAJOR:
            vt = tl.load(V + keys[None, :].to(tl.int64) * stride_v_l + offs_d[:, None],
                         mask=kv_mask_t, other=0.0)
            acc = tl.dot(vt, tl.trans(p.to(vt.dtype)), acc * alpha[None, :],
                         input_precision=INPUT_PRECISION)
        else:
            v = tl.load(V + keys[:, None].to(tl.int64) * stride_v_l + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _decode_split_kernel(
    Out, Lse,                    # written when not IS_SPLIT
    PartAcc, PartStats,          # fp32 partials, written when IS_SPLIT: acc (B, Hq, Lq, S, D),
                                 # (m, l) pairs (B, Hq, Lq, S, 2)
    Q, K, V, PrefixK, PrefixV, Mask, PrefixIndex,
    q_len, key_len, prefix_len, head_dim, group_size, qk_scale,
    blocks_per_split,            # key blocks per split; prefix blocks and sequence blocks are
                                 # numbered as one range [0, cdiv(P, BLOCK_N) + cdiv(Lk, BLOCK_N))
    stride_q_b, stride_q_h, stride_q_l,
    stride_k_b, stride_k_h, stride_k_l,
    stride_v_b, stride_v_h, stride_v_l,
    stride_pk_b, stride_pk_h, stride_pk_l,      # stride_pk_b = 0 for a shared prefix
    stride_pv_b, stride_pv_h, stride_pv_l,
    stride_o_b, stride_o_h, stride_o_l,
    stride_lse_b, stride_lse_h,
    stride_mask_b, stride_mask_l,
    stride_acc_b, stride_acc_h, stride_acc_l, stride_acc_s,
    stride_st_b, stride_st_h, stride_st_l, stride_st_s,
    IS_CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_INDEX: tl.constexpr,     # per-task prefixes: row b reads prefix PrefixIndex[b]
    IS_SPLIT: tl.constexpr,      # partials for the merge kernel, or (one split) the output itself
    KEYS_MAJOR: tl.constexpr,    # queries as the MMA's columns (see `_decode_blocks`)
    BLOCK_M: tl.constexpr,       # packed rows: KEYS_MAJOR_ROWS, or a power of 2 >= MIN_ROWS
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,       # next power of two >= head_dim (tl.arange needs a power of 2)
    INPUT_PRECISION: tl.constexpr,
):
    split = tl.program_id(0)
    row_blocks = tl.cdiv(group_size * q_len, BLOCK_M)
    kv_head = (tl.program_id(1) // row_blocks).to(tl.int64)
    row_block = tl.program_id(1) % row_blocks
    batch = tl.program_id(2).to(tl.int64)
    if HAS_INDEX:
        prefix_row = tl.load(PrefixIndex + batch).to(tl.int64)
    else:
        prefix_row = batch

    q_head, q_pos, row_ok = _packed_rows(row_block, kv_head, group_size, q_len, BLOCK_M=BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    q = tl.load(Q + batch * stride_q_b + q_head[:, None] * stride_q_h
                + q_pos[:, None].to(tl.int64) * stride_q_l + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)

    # This split's blocks [first, last) of the joint numbering, as a prefix key range and a
    # sequence key range (either may be empty); every range start is a multiple of BLOCK_N.
    first = split * blocks_per_split
    last = first + blocks_per_split
    prefix_blocks = tl.cdiv(prefix_len, BLOCK_N)
    p_start = tl.minimum(first, prefix_blocks) * BLOCK_N
    p_end = tl.minimum(tl.minimum(last, prefix_blocks) * BLOCK_N, prefix_len)
    s_start = tl.maximum(first - prefix_blocks, 0) * BLOCK_N
    s_end = tl.minimum(tl.maximum(last - prefix_blocks, 0) * BLOCK_N, key_len)

    # One loop per range, every block with the bounds (and causal) masks: a few integer compares
    # per block, where splitting off the unmasked blocks as the prefill kernel does doubles the
    # pipelined loops, and ptxas then spilled on sm_80 (Lq = 4) and fp32.
    if KEYS_MAJOR:
        q = tl.trans(q)
        acc = tl.trans(acc)
    # Prefix keys: visible to every query.
    pk = PrefixK + prefix_row * stride_pk_b + kv_head * stride_pk_h
    pv = PrefixV + prefix_row * stride_pv_b + kv_head * stride_pv_h
    acc, m_i, l_i = _decode_blocks(
        acc, m_i, l_i, q, K=pk, V=pv, Mask=Mask, start=p_start, end=p_end,
        stride_k_l=stride_pk_l, stride_v_l=stride_pv_l, stride_mask_l=0, key_len=prefix_len,
        head_dim=head_dim, key_shift=0, q_pos=q_pos, qk_scale=qk_scale,
        IS_CAUSAL=False, HAS_MASK=False, KEYS_MAJOR=KEYS_MAJOR, BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D, INPUT_PRECISION=INPUT_PRECISION)
    # Sequence keys: padding mask and bottom-right causal mask (query i sees j <= i + Lk - Lq).
    # (Their pointers are formed here, not above: live across the prefix loop they cost ptxas
    # registers, and a 4-byte spill at 16 rows on sm_90.)
    key_shift = key_len - q_len
    k = K + batch * stride_k_b + kv_head * stride_k_h
    v = V + batch * stride_v_b + kv_head * stride_v_h
    mask = Mask + batch * stride_mask_b
    acc, m_i, l_i = _decode_blocks(
        acc, m_i, l_i, q, K=k, V=v, Mask=mask, start=s_start, end=s_end,
        stride_k_l=stride_k_l, stride_v_l=stride_v_l, stride_mask_l=stride_mask_l,
        key_len=key_len, head_dim=head_dim, key_shift=key_shift, q_pos=q_pos, qk_scale=qk_scale,
        IS_CAUSAL=IS_CAUSAL, HAS_MASK=HAS_MASK, KEYS_MAJOR=KEYS_MAJOR, BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D, INPUT_PRECISION=INPUT_PRECISION)
    if KEYS_MAJOR:
        acc = tl.trans(acc)

    if IS_SPLIT:
        q_pos = q_pos.to(tl.int64)
        acc_ptr = PartAcc + batch * stride_acc_b + q_head[:, None] * stride_acc_h \
            + q_pos[:, None] * stride_acc_l + split * stride_acc_s + offs_d[None, :]
        tl.store(acc_ptr, acc, mask=row_ok[:, None] & d_ok[None, :])
        st_ptr = PartStats + batch * stride_st_b + q_head * stride_st_h + q_pos * stride_st_l \
            + split * stride_st_s
        tl.store(st_ptr, m_i, mask=row_ok)
        tl.store(st_ptr + 1, l_i, mask=row_ok)
    else:
        _store_rows(Out, Lse, acc, m_i, l_i, batch, q_head, q_pos, row_ok,
                    stride_o_b, stride_o_h, stride_o_l, stride_lse_b, stride_lse_h,
                    head_dim, BLOCK_D=BLOCK_D)


@triton.jit
def _decode_merge_kernel(
    Out, Lse, PartAcc, PartStats,
    q_len, head_dim, group_size, num_splits,
    stride_o_b, stride_o_h, stride_o_l,
    stride_lse_b, stride_lse_h,
    stride_acc_b, stride_acc_h, stride_acc_l, stride_acc_s,
    stride_st_b, stride_st_h, stride_st_l, stride_st_s,
    BLOCK_M: tl.constexpr,       # the split kernel's packing, so both agree on the rows
    BLOCK_D: tl.constexpr,
):
    row_blocks = tl.cdiv(group_size * q_len, BLOCK_M)
    kv_head = (tl.program_id(0) // row_blocks).to(tl.int64)
    row_block = tl.program_id(0) % row_blocks
    batch = tl.program_id(1).to(tl.int64)
    q_head, q_pos, row_ok = _packed_rows(row_block, kv_head, group_size, q_len, BLOCK_M=BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    tile_ok = row_ok[:, None] & (offs_d < head_dim)[None, :]
    pos = q_pos.to(tl.int64)
    acc_ptr = PartAcc + batch * stride_acc_b + q_head[:, None] * stride_acc_h \
        + pos[:, None] * stride_acc_l + offs_d[None, :]
    st_ptr = PartStats + batch * stride_st_b + q_head * stride_st_h + pos * stride_st_l

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # Split order, one split at a time: the same operations in the same order on every run.
    for split in range(num_splits):
        m_s = tl.load(st_ptr + split * stride_st_s, mask=row_ok, other=float("-inf"))
        l_s = tl.load(st_ptr + split * stride_st_s + 1, mask=row_ok, other=0.0)
        acc_s = tl.load(acc_ptr + split * stride_acc_s, mask=tile_ok, other=0.0)
        m_new = tl.maximum(m_i, m_s)
        # Rows that have seen no key so far keep m = -inf: shift by 0 so the weights are 0.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        beta = tl.math.exp2(m_s - m_safe)
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        l_i = l_i * alpha + l_s * beta
        m_i = m_new
    _store_rows(Out, Lse, acc, m_i, l_i, batch, q_head, q_pos, row_ok,
                stride_o_b, stride_o_h, stride_o_l, stride_lse_b, stride_lse_h,
                head_dim, BLOCK_D=BLOCK_D)


# --------------------------------------------------------------------------------------------
# Launch side: tiles, the split rule, the launcher

@dataclass(frozen=True)
class DecodeTile:
    block_n: int
    max_rows: int        # largest BLOCK_M; more packed rows take more row blocks
    num_warps: int       # up to 32 rows; see `warps`
    num_stages: int

    def warps(self, block_m: int) -> int:
        """Warps for a BLOCK_M-row tile: one more set of num_warps per 32 rows beyond 32, so
        that each warp's share of the fp32 accumulator (and of q) stays the same (64 x 128 on 4
        warps ran out of registers on sm_80: bench/NOTES.md, "Decode tile rows")."""
        return self.num_warps * max(1, block_m // 32)


# Interpreter: small key blocks so that tests cross block and split edges at small sizes (and
# launch.INTERPRETER_SPLITS splits, so that they exercise the merge).
INTERPRETER_DECODE = DecodeTile(16, 32, 4, 1)

# GPU tiles per (16-bit?, BLOCK_D), the same on sm_80 and sm_90. Shared memory holds the K and V
# blocks in flight (the static report gives each launch's shared memory and the programs an SM
# holds; keys-major on sm_90, wgmma keeps every stage). fp32 quarters the key block at D = 64 /
# 128 and stops at fewer rows (more rows take more row blocks, each reading K/V again): its
# ieee dots run on the CUDA cores with both operands in registers, and the halved blocks spilled
# at more rows (bench/NOTES.md, "Decode tile rows", with ptxas's figures). D = 256 stops at 32
# rows: its 32 x 256 fp32 accumulator alone fills a large share of a thread's registers on 4
# warps.
GPU_DECODE = {
    (True, 32): DecodeTile(128, 64, 4, 4),
    (True, 64): DecodeTile(128, 64, 4, 3),
    (True, 128): DecodeTile(64, 64, 4, 3),
    (True, 256): DecodeTile(32, 32, 4, 3),
    (False, 32): DecodeTile(64, 64, 4, 4),
    (False, 64): DecodeTile(32, 32, 4, 3),
    (False, 128): DecodeTile(16, 16, 4, 3),
    (False, 256): DecodeTile(16, 32, 4, 3),
}

MIN_ROWS = 16            # the MMA's rows: m16 (mma.sync), and Triton pads tl.dot's M up to it
KEYS_MAJOR_ROWS = 8      # packed rows up to which the keys-major tile runs, as its query columns:
                         # the MMA's smallest N (mma.sync m16n8k16, wgmma n8); at 4 rows, Triton's
                         # own padding of N = 4 measured worse (bench/NOTES.md, "Decode tile
                         # rows")
MIN_BLOCKS_PER_SPLIT = 4   # shorter splits spend more on partials and pipeline ramp-up than
                           # they win in parallelism
MAX_SPLITS = 64
MERGE_WARPS = 4          # the merge is a few fp32 loads and FMAs per element


def merge_warps(block_m: int, block_d: int) -> int:
    """Warps of the merge kernel: MERGE_WARPS up to 4096 accumulator elements (32 a thread), as
    many more per 4096 beyond (64 x 128 and 32 x 256 on 4 warps spilled: bench/NOTES.md,
    "Decode tile rows")."""
    return MERGE_WARPS * max(1, block_m * block_d // 4096)


def decode_tile(head_dim: int, dtype: torch.dtype, target: Target | None) -> DecodeTile:
    if target is None:
        return INTERPRETER_DECODE
    return GPU_DECODE[(dtype != torch.float32, head_block(head_dim))]


def balanced_splits(key_blocks: int, splits: int) -> tuple[int, int]:
    """(blocks per split, splits) for at most `splits` runs of whole blocks, none empty."""
    per_split = cdiv(key_blocks, max(1, min(splits, key_blocks)))
    return per_split, cdiv(key_blocks, per_split)


def wave_efficiency(programs: int, sm_count: int) -> float:
    """Share of the SM slots of the last wave-rounded grid that programs fill."""
    return programs / (cdiv(programs, sm_count) * sm_count)


def split_count(programs_per_split: int, key_blocks: int, target: Target | None) -> int:
    """Splits for a grid of `programs_per_split` programs per split: the fewest that give at
    least WAVES waves on the target's SMs, or up to twice that where waves come out fuller
    (ties: fewer); fewer where splits would drop under MIN_BLOCKS_PER_SPLIT blocks each."""
    if target is None:
        return balanced_splits(key_blocks, INTERPRETER_SPLITS)[1]
    most = max(1, min(MAX_SPLITS, key_blocks // MIN_BLOCKS_PER_SPLIT))
    need = min(most, cdiv(WAVES * target.sm_count, programs_per_split))
    best, best_eff = 1, -1.0
    for wanted in range(need, min(most, 2 * need) + 1):
        splits = balanced_splits(key_blocks, wanted)[1]
        eff = wave_efficiency(splits * programs_per_split, target.sm_count)
        if eff > best_eff + 1e-9:
            best, best_eff = splits, eff
    return best


@dataclass(frozen=True)
class DecodePlan:
    """How one decode launch is cut: what the static report and the tests read."""
    tile: DecodeTile
    block_m: int             # query rows of the tile (its columns when keys_major)
    keys_major: bool         # `_decode_blocks` keys-major: queries are the MMA's columns
    block_d: int
    row_blocks: int          # per kv head: cdiv(group * Lq, block_m)
    key_blocks: int          # cdiv(P, block_n) + cdiv(Lk, block_n)
    blocks_per_split: int
    num_splits: int
    grid: tuple[int, int, int]   # (splits, Hkv * row_blocks, B)
    rows: int                    # packed query rows per kv head: group * Lq

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def row_use(self) -> float:
        """Share of the tile's query rows (columns, keys-major) that hold a query; the rest
        pad up to block_m, which is never under what the MMA computes (16 rows, 8 columns)."""
        return self.rows / (self.row_blocks * self.block_m)


def decode_plan(B: int, Hq: int, Hkv: int, Lq: int, Lk: int, P: int, D: int, dtype: torch.dtype,
                target: Target | None, num_splits: int | None = None) -> DecodePlan:
    """Tile, row packing and split count for a launch on `target` (None: the interpreter).
    `num_splits` overrides the split rule (capped at one block a split)."""
    tile = decode_tile(D, dtype, target)
    rows = (Hq // Hkv) * Lq
    keys_major = rows <= KEYS_MAJOR_ROWS
    if keys_major:
        block_m = KEYS_MAJOR_ROWS
    else:
        block_m = min(tile.max_rows, max(MIN_ROWS, next_power_of_2(rows)))
    row_blocks = cdiv(rows, block_m)
    key_blocks = max(1, cdiv(P, tile.block_n) + cdiv(Lk, tile.block_n))
    if num_splits is None:
        num_splits = split_count(B * Hkv * row_blocks, key_blocks, target)
    per_split, splits = balanced_splits(key_blocks, num_splits)
    return DecodePlan(tile, block_m, keys_major, head_block(D), row_blocks, key_blocks, per_split,
                      splits, (splits, Hkv * row_blocks, B), rows)


def supports(q_len: int) -> bool:
    """Whether this kernel serves queries of this length (see MAX_QUERIES)."""
    return 0 < q_len <= MAX_QUERIES


# What this kernel computes of an `AttentionSpec`: no attention term, no dropout.
SUPPORTED_OPTIONS = ("attention_mask", "prefix_index", "causal", "scale")


def unsupported_options(spec: AttentionSpec) -> dict:
    """The options of `spec` in use that this kernel does not compute (attention terms,
    dropout_p > 0), field -> value; empty when it can run `spec`."""
    unsupported = spec.terms_in_use()
    if spec.dropout_p > 0:
        unsupported["dropout_p"] = spec.dropout_p
    return unsupported


def check_spec(spec: AttentionSpec) -> None:
    """Raises ValueError naming every option of `spec` in use that this kernel does not
    compute: refused, never dropped."""
    unsupported = unsupported_options(spec)
    if unsupported:
        given = ", ".join(f"spec.{name}={_describe(v)}" for name, v in unsupported.items())
        raise ValueError(
            f"prefix_attention_decode: the decode kernel computes {', '.join(SUPPORTED_OPTIONS)}"
            f" only (no attention terms, no dropout); got {given}. prefix_attention_fwd "
            "computes every option")


def _describe(value) -> str:
    """A spec value for an error message: a tensor by shape and dtype, not its elements."""
    if isinstance(value, torch.Tensor):
        return f"Tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    if isinstance(value, tuple):
        return f"({', '.join(_describe(v) for v in value)})"
    return repr(value)


@on_input_device
def prefix_attention_decode(q, k, v, prefix_k=None, prefix_v=None, spec=AttentionSpec(), *,
                            out=None, num_splits=None):
    """Returns (out, lse), exactly as `prefix_attention_fwd` (same shapes, layout, LSE
    convention), for few queries per row (Lq <= MAX_QUERIES).

    q (B, Hq, Lq, D); k, v (B, Hkv, Lk, D); prefix_k/v None, (Hkv, P, D), (B, Hkv, P, D) or
    (T, Hkv, P, D) with spec.prefix_index (B,).
    spec: an `AttentionSpec` of which this kernel computes attention_mask ((B, Lk) bool/int,
    true = attend), prefix_index, causal and scale (None: D ** -0.5); a spec with an attention
    term (bias, sinks, segments, window_size, softcap) or dropout_p > 0 is refused with a
    ValueError (`check_spec`).
    out: as for the forward. num_splits: override the SM-count rule (tests, tuning).
    """
    check_spec(spec)
    x = ForwardInputs.prepare(q, k, v, prefix_k, prefix_v, spec, out)
    B, Hq, Lq, D = x.q.shape
    Hkv, Lk = x.k.shape[1], x.k.shape[2]
    if x.out.numel() == 0:
        return x.out, x.lse
    plan = decode_plan(B, Hq, Hkv, Lq, Lk, x.prefix_len, D, x.q.dtype,
                       device_target(x.q.device), num_splits)
    split = plan.num_splits > 1
    if split:
        f32 = dict(dtype=torch.float32, device=x.q.device)
        acc = torch.empty(B, Hq, Lq, plan.num_splits, D, **f32)
        stats = torch.empty(B, Hq, Lq, plan.num_splits, 2, **f32)
        part_strides = (*acc.stride()[:4], *stats.stride()[:4])
    else:                        # never touched: the kernel writes out and lse directly
        acc = stats = x.lse
        part_strides = (0,) * 8
    _decode_split_kernel[plan.grid](
        x.out, x.lse, acc, stats, *x.pointers(),
        Lq, Lk, x.prefix_len, D, Hq // Hkv, x.scale * LOG2E, plan.blocks_per_split,
        *x.strides(), *part_strides,
        IS_CAUSAL=spec.causal, HAS_MASK=x.mask is not None, HAS_INDEX=x.index is not None,
        IS_SPLIT=split, KEYS_MAJOR=plan.keys_major, BLOCK_M=plan.block_m,
        BLOCK_N=plan.tile.block_n, BLOCK_D=plan.block_d,
        INPUT_PRECISION=input_precision(x.q.dtype),
        num_warps=plan.tile.warps(plan.block_m), num_stages=plan.tile.num_stages,
    )
    if split:
        _decode_merge_kernel[(Hkv * plan.row_blocks, B)](
            x.out, x.lse, acc, stats, Lq, D, Hq // Hkv, plan.num_splits,
            *strides3(x.out), *x.lse.stride()[:2], *part_strides,
            BLOCK_M=plan.block_m, BLOCK_D=plan.block_d,
            num_warps=merge_warps(plan.block_m, plan.block_d),
        )
    return x.out, x.lse


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (see kernels/compile_specs.py)

def compile_specs():
    """The split kernel for every GPU_DECODE tile: keys-major, and row-major at the smallest
    and the largest BLOCK_M it can pick (flags rotated over the specs, with and without
    splitting); the merge kernel for every BLOCK_D and output dtype at the largest BLOCK_M."""
    for i, (dtype, elem, precision, block_d) in enumerate(SPEC_VARIANTS):
        tile = GPU_DECODE[(dtype != torch.float32, block_d)]
        for j, block_m in enumerate(sorted({KEYS_MAJOR_ROWS, MIN_ROWS, tile.max_rows})):
            causal, has_mask = FLAG_COMBOS[(i + j) % len(FLAG_COMBOS)]
            constexprs = dict(IS_CAUSAL=causal, HAS_MASK=has_mask, HAS_INDEX=i % 2 == 0,
                              IS_SPLIT=j == 0 or i % 2 == 1,
                              KEYS_MAJOR=block_m == KEYS_MAJOR_ROWS, BLOCK_M=block_m,
                              BLOCK_N=tile.block_n, BLOCK_D=block_d,
                              INPUT_PRECISION=precision)
            types = {name: f"*{elem}" for name in ("Out", "Q", "K", "V", "PrefixK", "PrefixV")}
            types.update(Lse="*fp32", PartAcc="*fp32", PartStats="*fp32", Mask="*i8",
                         PrefixIndex="*i64", qk_scale="fp32")
            flags = ",".join(f"{k}={v}" for k, v in constexprs.items())
            yield CompileSpec(f"prefix_attention_decode[{elem},{flags}]", _decode_split_kernel,
                              spec_signature(_decode_split_kernel, constexprs, types),
                              constexprs, tile.warps(block_m), tile.num_stages,
                              ints=dict(spec_ints(constexprs), q_len=1))   # one new token
    for block_d in sorted({d for *_, d in SPEC_VARIANTS}):
        for elem in ("fp16", "bf16", "fp32"):
            block_m = GPU_DECODE[(elem != "fp32", block_d)].max_rows
            constexprs = dict(BLOCK_M=block_m, BLOCK_D=block_d)
            types = dict(Out=f"*{elem}", Lse="*fp32", PartAcc="*fp32", PartStats="*fp32")
            yield CompileSpec(f"prefix_attention_decode_merge[{elem},BLOCK_D={block_d}]",
                              _decode_merge_kernel,
                              spec_signature(_decode_merge_kernel, constexprs, types),
                              constexprs, merge_warps(block_m, block_d), 1,
                              ints={"q_len": 1, "group_size": 4})
