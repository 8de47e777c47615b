"""Tile configurations of the attention kernels, per GPU architecture and dtype.

Each (kernel, architecture, 16-bit?, head block) has a short list of candidates. The first is
the fixed choice: what a launch uses wherever nothing is timed (the static report, CUDA-graph
capture, PTUNING_FAST_AUTOTUNE=0) and what the static report proves spill-free at the benchmark
shapes. On a GPU the launchers time the candidates once per tuning key and keep the fastest
(kernels/autotune.py). Every candidate is compiled for sm_80 and sm_90 by the compile test.

Why these: the dK/dV program holds k, v, dK and dV of its key block in registers, so with 4
warps a 64 x 128 key block runs out of registers and spills (ptxas, sm_90, bf16); 8 warps
halve each thread's share. Short prefixes use a shorter prefix key block (see prefix_tile). fp32
tiles take twice the shared memory and registers, so fp32 halves the streamed block. sm_80
(A100: 164 KB shared memory a block, mma.sync) and sm_90 (H100: 227 KB, wgmma) differ where
ptxas said so; measured figures are in bench/NOTES.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .launch import next_power_of_2


@dataclass(frozen=True)
class TileConfig:
    block_m: int        # forward / dQ: queries a program owns; dK/dV: queries per step
    block_n: int        # forward / dQ: keys per step; dK/dV: keys a program owns
    num_warps: int
    num_stages: int
    tma: bool = False   # forward only, sm_90+: K/V tiles through tensor descriptors (TMA)
    dropout_ok: bool = True   # False: spills with dropout's Philox registers; not timed then


T = TileConfig

# Interpreter: one small config per kernel, so tests cross block edges at small sizes;
# BLOCK_M != BLOCK_N exercises the causal bounds that GPU configs rely on.
INTERPRETER = {
    "fwd": T(32, 16, 4, 1),
    "dkdv": T(16, 32, 4, 1),
    "dq": T(32, 16, 4, 1),
}

# kernel -> (arch family, 16-bit?, head block) -> candidates, fixed choice first.
CANDIDATES: dict[str, dict[tuple[int, bool, int], list[TileConfig]]] = {
    "fwd": {
        (90, True, 32): [T(128, 64, 4, 3)],
        (90, True, 64): [T(128, 64, 4, 3), T(128, 128, 8, 3), T(128, 64, 4, 3, tma=True)],
        # TMA first where the tensors allow it (see candidates); 128 keys spill through
        # pointer loads, and with dropout's Philox registers (bench/NOTES.md, "The forward's
        # hot loop, from SASS").
        (90, True, 128): [T(128, 128, 8, 3, tma=True, dropout_ok=False), T(128, 64, 8, 3),
                          T(128, 64, 8, 3, tma=True)],
        (90, True, 256): [T(64, 64, 8, 2)],
        (90, False, 32): [T(64, 64, 4, 3)],
        (90, False, 64): [T(64, 32, 4, 3)],
        (90, False, 128): [T(64, 32, 4, 2)],
        (90, False, 256): [T(64, 16, 8, 2)],
        (80, True, 32): [T(128, 64, 4, 3)],
        (80, True, 64): [T(128, 64, 4, 3)],
        (80, True, 128): [T(128, 64, 8, 3), T(128, 32, 4, 3)],
        (80, True, 256): [T(64, 64, 8, 2)],
        (80, False, 32): [T(64, 64, 4, 3)],
        (80, False, 64): [T(64, 32, 4, 3)],
        (80, False, 128): [T(64, 32, 4, 2)],
        (80, False, 256): [T(64, 16, 8, 2)],
    },
    "dkdv": {
        (90, True, 32): [T(32, 128, 4, 3)],
        (90, True, 64): [T(32, 128, 8, 3)],
        # 128 keys: each warpgroup owns 64 of them; with 64 keys both warpgroups repeat the
        # 16-query dots (bench/NOTES.md, "The forward's hot loop").
        (90, True, 128): [T(16, 64, 8, 3), T(16, 128, 8, 2, dropout_ok=False)],
        (90, True, 256): [T(16, 32, 8, 2)],
        (90, False, 32): [T(32, 64, 8, 2)],
        (90, False, 64): [T(16, 32, 4, 2)],
        (90, False, 128): [T(16, 64, 8, 2)],
        (90, False, 256): [T(16, 32, 8, 2)],
        (80, True, 32): [T(32, 64, 4, 3)],
        (80, True, 64): [T(16, 128, 8, 3)],
        (80, True, 128): [T(16, 64, 8, 3)],
        (80, True, 256): [T(16, 32, 8, 2)],
        (80, False, 32): [T(16, 64, 4, 2)],
        (80, False, 64): [T(16, 32, 4, 2)],
        (80, False, 128): [T(16, 64, 8, 2)],
        (80, False, 256): [T(16, 32, 8, 2)],
    },
    "dq": {
        (90, True, 32): [T(128, 32, 4, 3)],
        (90, True, 64): [T(128, 32, 8, 3), T(64, 32, 4, 3)],
        (90, True, 128): [T(64, 32, 4, 3), T(128, 32, 8, 3)],
        (90, True, 256): [T(64, 16, 8, 2)],
        (90, False, 32): [T(64, 32, 4, 3)],
        (90, False, 64): [T(64, 16, 4, 2), T(32, 16, 4, 2)],
        (90, False, 128): [T(32, 16, 4, 2)],
        (90, False, 256): [T(32, 16, 8, 2)],
        (80, True, 32): [T(128, 32, 4, 3)],
        (80, True, 64): [T(128, 32, 8, 3)],
        (80, True, 128): [T(64, 32, 8, 3)],
        (80, True, 256): [T(64, 16, 8, 2)],
        (80, False, 32): [T(64, 32, 4, 3)],
        (80, False, 64): [T(32, 16, 4, 2)],
        (80, False, 128): [T(64, 16, 4, 2)],
        (80, False, 256): [T(32, 16, 8, 2)],
    },
}


def head_block(head_dim: int) -> int:
    # Floor of 32: small head dims share the D = 32 kernels (covered by compile_specs) rather
    # than compiling a 16-wide variant for a shape real models do not use.
    return max(32, next_power_of_2(head_dim))


def arch_family(arch: int) -> int:
    """The table an architecture reads: Hopper and newer use the sm_90 tiles, Ampere/Ada
    (sm_80, 86, 89) the sm_80 ones."""
    return 90 if arch >= 90 else 80


def tma_enabled() -> bool:
    """The TMA candidates (sm_90 forward: K/V tiles through tensor descriptors) are chosen
    wherever a launch's tensors allow them, unless PTUNING_FAST_TMA=0."""
    return os.environ.get("PTUNING_FAST_TMA", "1") != "0"


def candidates(kernel: str, arch: int | None, dtype: torch.dtype, head_dim: int,
               dropout: bool = False, terms: bool = False, tma: bool = False) -> list[TileConfig]:
    """The configs a launch of `kernel` may use; arch None = the interpreter. tma: the launch's
    tensors allow tensor descriptors; without it (or with PTUNING_FAST_TMA=0) the TMA entries
    are left out and the first pointer-load entry is the fixed choice. The first entry that
    remains serves dropout too; a launch with attention terms (bias, window, softcap, sinks,
    packing) gets `terms_config` alone (not timed)."""
    if arch is None:
        return [INTERPRETER[kernel]]
    cands = CANDIDATES[kernel][(arch_family(arch), dtype != torch.float32, head_block(head_dim))]
    if terms:
        return [terms_config(kernel, arch_family(arch), dtype != torch.float32,
                             head_block(head_dim))]
    return [c for c in cands if (not c.tma or (tma and tma_enabled()))
            and (c.dropout_ok or not dropout)]


def terms_config(kernel: str, arch: int, sixteen_bit: bool, block_d: int) -> TileConfig:
    """The tile of every launch with attention terms on arch family `arch`: `terms_tile` of
    the table's first pointer-load entry (the terms read K/V by pointers)."""
    first = next(c for c in CANDIDATES[kernel][(arch, sixteen_bit, block_d)] if not c.tma)
    return terms_tile(kernel, arch, first, block_d)


def terms_tile(kernel: str, arch: int, cfg: TileConfig, block_d: int) -> TileConfig:
    """The fixed tile with room for the attention terms' registers (per-query key intervals,
    a bias tile, tanh). ptxas, 16-bit, all terms on: the forward's 4-warp D = 64 tile spilled
    420 B (sm_90) and its 8-warp D = 128 tile 708 B; 8 warps, and half the key block from
    D = 128, spill nothing on sm_80 or sm_90. sm_80's 128-key dK/dV block at D = 64 spilled
    24 B, and its prefix dK/dV with a bias 16 B at 3 stages; 64 keys and 2 stages do not. The
    dQ tiles had room already."""
    if kernel == "fwd":
        block_n = max(16, cfg.block_n // 2) if block_d >= 128 else cfg.block_n
        return TileConfig(cfg.block_m, block_n, max(cfg.num_warps, 8), cfg.num_stages)
    if kernel == "dkdv" and arch == 80:
        return TileConfig(cfg.block_m, min(cfg.block_n, 64), cfg.num_warps,
                          min(cfg.num_stages, 2))
    return cfg


def prefix_tile(prefix_len: int, cfg: TileConfig) -> TileConfig:
    """The prefix-dK/dV program's tile, from the dK/dV config: its key block, or less for a
    short prefix (P = 16 then fills its tile instead of a quarter of a 64-row one; floor 16, the
    smallest MMA tile), and for a key block under 64 rows at most 4 warps and 2 stages (with 8
    warps on a 16-row tile, or 3 stages, ptxas spilled at sm_90 D = 64)."""
    block_n = min(cfg.block_n, max(16, next_power_of_2(prefix_len)))
    if block_n >= 64:
        return TileConfig(cfg.block_m, block_n, cfg.num_warps, cfg.num_stages)
    return TileConfig(cfg.block_m, block_n, min(cfg.num_warps, 4), min(cfg.num_stages, 2))


def spec_configs(kernel: str, sixteen_bit: bool, block_d: int):
    """(config, archs) for every candidate of `kernel` at (16-bit?, head block), a config shared
    by sm_80 and sm_90 listed once with both: what the compile specs must build."""
    archs_of: dict[TileConfig, list[int]] = {}    # every candidate, TMA ones included
    for arch in (80, 90):
        for cfg in CANDIDATES[kernel][(arch, sixteen_bit, block_d)]:
            archs_of.setdefault(cfg, []).append(arch)
    return [(cfg, tuple(archs)) for cfg, archs in archs_of.items()]
