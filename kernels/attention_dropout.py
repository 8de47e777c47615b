"""Attention-probability dropout, shared by the forward, dQ and dK/dV kernels.

Entry (b, h, i, c) of the probabilities, c numbering the concatenated [prefix; sequence] keys,
is kept iff `dropout_keep` says so: a Philox draw at the global offset
((b * Hq + h) * Lq + i) * (P + Lk) + c (int64), so the mask depends on the seed and the shapes
only, never on the tile sizes, and the backward regenerates it exactly. `dropout_keep_mask`
materializes the same mask (tests; the reference path's mask on CUDA or the interpreter).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .compile_specs import CompileSpec, spec_signature
from .launch import as_seed_tensor, cdiv, define_kernels, interpreting, on_device


define_kernels()     # before the first @triton.jit: see launch.interpreting

@triton.jit
def dropout_keep(seed, offsets, dropout_p):
    """True where the probability at Philox `offsets` (int64, see the module docstring) is
    kept. Every kernel and `dropout_keep_mask` decide through this one function."""
    return tl.rand(seed, offsets) >= dropout_p


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


def compile_specs():
    """The dropout-mask kernel (see kernels/compile_specs.py); the kernels' own dropout code
    compiles in their specs' dropout variants (attention_specs.DROPOUT_VARIANTS)."""
    constexprs = dict(BLOCK_M=MASK_BLOCK[0], BLOCK_N=MASK_BLOCK[1])
    yield CompileSpec("prefix_attention_dropout_mask", _dropout_mask_kernel,
                      spec_signature(_dropout_mask_kernel, constexprs,
                                     {"Keep": "*i8", "Seed": "*i64", "dropout_p": "fp32"}),
                      constexprs, 4, 1)
