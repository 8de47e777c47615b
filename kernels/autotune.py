"""Picking a kernel's tile config on a GPU: each candidate of kernels/tiles.py is timed once per
tuning key (kernel, architecture, dtype, head block, and the launch's own key: causal, mask,
length bucket), the fastest is kept for the process.

Nothing is timed under the interpreter, for a pretended target (the static report), or with
PTUNING_FAST_AUTOTUNE=0: the fixed first candidate runs. While a CUDA graph is being captured
the key's choice is looked up as always, and only the timing is skipped (it would be captured
too): a key first seen there keeps the first candidate, for the graph and every later call.
Timings differ between machines and runs, so two processes may pick different tiles and round
differently: set PTUNING_FAST_AUTOTUNE=0 for results that are bitwise equal across processes
(within a process every call with one key uses one config, captured or eager).
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import triton

from . import tiles
from .launch import device_target, next_power_of_2

_BEST: dict[tuple, tiles.TileConfig] = {}


def enabled(device: torch.device) -> bool:
    """Whether launches on `device` take the tuned choice (timing candidates where a key has
    none yet): CUDA, unless PTUNING_FAST_AUTOTUNE=0."""
    return device.type == "cuda" and os.environ.get("PTUNING_FAST_AUTOTUNE", "1") != "0"


def capturing() -> bool:
    """A CUDA graph is being captured on the current stream: nothing may be timed."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def length_bucket(n: int) -> int:
    """Lengths within a factor of two share a tuning decision."""
    return next_power_of_2(max(n, 1))


def _time_ms(fn: Callable[[], None]) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=20)


def launch_tuned(kernel: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                 key: tuple, launch: Callable[[tiles.TileConfig], None],
                 timer: Callable[[Callable[[], None]], float] = _time_ms,
                 dropout: bool = False, terms: bool = False,
                 tma: bool = False) -> tiles.TileConfig:
    """Runs `launch(config)` once with the chosen config (after timing the candidates, the
    first time `key` is seen on a GPU) and returns that config. `launch` must be repeatable:
    it overwrites its outputs, never accumulates into them. tma: the launch's tensors allow
    tensor descriptors, so the TMA candidates are among its choices (`key` must say so too)."""
    target = device_target(device)
    cands = tiles.candidates(kernel, None if target is None else target.arch, dtype, head_dim,
                             dropout, terms, tma)
    cfg = cands[0]
    if len(cands) > 1 and enabled(device) and target is not None:
        full_key = (kernel, target.arch, dtype, tiles.head_block(head_dim), dropout, key)
        cfg = _BEST.get(full_key)
        if cfg is None and capturing():
            # Timing would run (and be captured) inside the graph. The untimed choice is kept
            # for the key, so eager calls after the capture replay the graph's bits.
            cfg = _BEST[full_key] = cands[0]
        elif cfg is None:
            times = [timer(lambda c=c: launch(c)) for c in cands]
            cfg = _BEST[full_key] = cands[min(range(len(cands)), key=times.__getitem__)]
    launch(cfg)
    return cfg


def fixed_config(kernel: str, device: torch.device, dtype: torch.dtype,
                 head_dim: int, terms: bool = False) -> tiles.TileConfig:
    """The untimed choice for `kernel` on `device` (the first candidate)."""
    target = device_target(device)
    return tiles.candidates(kernel, None if target is None else target.arch, dtype, head_dim,
                            terms=terms)[0]
