"""How many programs of a kernel an SM holds at once, from its registers, shared memory and
warps, and how many waves a grid takes (CUDA occupancy rules, compute capability 8.0 / 9.0)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SMLimits:
    registers: int = 65536          # 32-bit registers per SM
    threads: int = 2048
    blocks: int = 32                # resident blocks (programs) per SM
    shared: int = 228 * 1024        # shared memory per SM (bytes), carve-out at its maximum
    reserved_shared: int = 1024     # the system's shared memory per block (CUDA >= 11)
    register_unit: int = 256        # registers are allocated per warp in units of 256
    shared_unit: int = 128          # shared memory allocation granularity (bytes)


SM_LIMITS = {90: SMLimits(shared=228 * 1024), 80: SMLimits(shared=164 * 1024)}


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def blocks_per_sm(arch: int, regs: int, num_warps: int, shared: int) -> tuple[int, str]:
    """(resident programs per SM, the limits that bind: threads | blocks | smem | regs, joined
    by "+" when several bind at once)."""
    lim = SM_LIMITS[arch]
    regs_per_warp = _round_up(max(regs, 1) * 32, lim.register_unit)
    by_limit = {
        "threads": lim.threads // (num_warps * 32),
        "blocks": lim.blocks,
        "smem": lim.shared // _round_up(shared + lim.reserved_shared, lim.shared_unit),
        "regs": lim.registers // regs_per_warp // num_warps,
    }
    fewest = min(by_limit.values())
    return fewest, "+".join(name for name, n in by_limit.items() if n == fewest)


def waves(programs: int, sm_count: int, resident: int) -> float | None:
    """Programs over what the chip holds at once (sm_count * resident programs per SM);
    None when a program does not fit at all."""
    return programs / (sm_count * resident) if resident else None
