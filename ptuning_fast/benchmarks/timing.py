"""Timing and peak memory.

CUDA: `triton.testing.do_bench` (CUDA events around each call, the L2 cache flushed between
calls, its warm-up excluded) and its median; heavy steps (a whole training step, a generation)
get a short warm-up and a few event-timed calls instead, since do_bench would spend a dozen calls
estimating their length. CPU: a wall-clock timer after warm-up calls, median of the timed calls;
steps compared with each other (ours and PEFT's training step) are timed in alternation
(`interleaved_cpu_medians_ms`) and by the process's CPU time, so that load from other processes
on a shared machine falls on every provider alike instead of on whichever ran during it, and
time spent waiting for a core is not counted.
Peak memory is read from the CUDA caching allocator; on CPU there is no such counter and the
record says null rather than guess.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_ms(step: Callable[[], object], device: torch.device, *, quick: bool,
              heavy: bool = False) -> float:
    if device.type == "cuda":
        if heavy:
            return _cuda_events_median_ms(step, warmup_calls=1 if quick else 2,
                                          timed_calls=3 if quick else 5)
        import triton.testing
        warmup, rep = (10, 40) if quick else (25, 100)
        return float(triton.testing.do_bench(step, warmup=warmup, rep=rep, return_mode="median"))
    # Heavy steps get a longer budget: on a shared CPU their medians wander most.
    budget_s = (1.0 if quick else 3.0) if heavy else (0.3 if quick else 1.0)
    return _cpu_median_ms(step, warmup_calls=1 if heavy else 2,
                          min_calls=3 if heavy else 5, budget_s=budget_s)


def _cuda_events_median_ms(step, *, warmup_calls: int, timed_calls: int) -> float:
    for _ in range(warmup_calls):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(timed_calls):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _cpu_median_ms(step, *, warmup_calls: int, min_calls: int, budget_s: float) -> float:
    for _ in range(warmup_calls):
        step()
    times = []
    began = time.perf_counter()
    while len(times) < min_calls or (time.perf_counter() - began < budget_s and len(times) < 200):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def interleaved_cpu_medians_ms(steps: list[Callable[[], object]], *, quick: bool) -> list[float]:
    """Median CPU time of each step (`time.process_time`: this process's CPU time, all its
    threads; the benchmark runs one intra-op thread, so this is the step's compute time even
    when other processes keep the cores busy), timed in rounds that run every step once, the
    order rotated each round. At least 5 rounds (3 with `quick`), then more until the
    wall-clock budget is spent (at most 50)."""
    for step in steps:                      # warm-up: one call each
        step()
    min_rounds, budget_s = (3, 2.0 * len(steps)) if quick else (5, 6.0 * len(steps))
    times: list[list[float]] = [[] for _ in steps]
    began = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() - began < budget_s and rounds < 50):
        shift = rounds % len(steps)
        for i in list(range(len(steps)))[shift:] + list(range(len(steps)))[:shift]:
            t0 = time.process_time()
            steps[i]()
            times[i].append((time.process_time() - t0) * 1e3)
        rounds += 1
    return [statistics.median(t) for t in times]


def peak_memory_mb(step: Callable[[], object], device: torch.device, *,
                   whole_process: bool) -> float | None:
    """Peak CUDA memory of one call: what the call itself allocated at its peak (outputs and
    temporaries, not the inputs it was handed), or with `whole_process` everything allocated
    at the peak (model weights, optimizer state, activations). None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = 0 if whole_process else torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20
