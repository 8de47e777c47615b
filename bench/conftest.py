"""pytest-benchmark front end for the cases of `ptuning_fast.benchmarks` (defined there, once).

    pytest bench/ --benchmark-json=bench.json            # the --quick grid
    PTUNING_FAST_BENCH_FULL=1 pytest bench/ ...          # the full grid of `ptuning-fast bench`

Each test prepares one case outside the timed region and times its step with pytest-benchmark
(host timer, the CUDA stream synchronized inside each call); FLOPs, bytes and tokens per step go
to `extra_info`, so TFLOP/s, GB/s and tokens/s follow from the stats. A case whose dependency is
missing is skipped with its reason. `ptuning-fast bench` remains the reference measurement
(do_bench with CUDA events and L2 flushes).
"""
import os

import pytest
import torch

from ptuning_fast.benchmarks import build_cases
from ptuning_fast.benchmarks.case import Unavailable
from ptuning_fast.benchmarks.providers import PROVIDERS

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("PTUNING_FAST_BENCH_FULL", "0") != "1"
if DEVICE.type == "cpu":
    torch.set_num_threads(1)   # as `ptuning-fast bench` does: steadier on a small shared CPU


def cases(op: str):
    """pytest params for every case of `op` on this machine, named by the case's label."""
    return [pytest.param(c, id=c.label().replace(" ", "-"))
            for c in build_cases([op], PROVIDERS, DEVICE, QUICK)]


@pytest.fixture
def measure(benchmark):
    def run(case):
        try:
            prepared = case.prepare(case, DEVICE)
            prepared.step()                  # compile / warm up outside the measurement
        except Unavailable as e:
            pytest.skip(str(e))

        def timed():
            prepared.step()
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
        rounds, warmup = (3, 1) if prepared.heavy else ((20, 3) if DEVICE.type == "cuda" else (5, 1))
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)
        median_s = benchmark.stats.stats.median
        info = {**case.fields(), "device": torch.cuda.get_device_name() if DEVICE.type == "cuda"
                else "CPU", "flops": prepared.flops, "bytes": prepared.bytes,
                "tokens": prepared.tokens}
        if prepared.flops:
            info["tflops"] = prepared.flops / median_s / 1e12
        if prepared.bytes:
            info["gbps"] = prepared.bytes / median_s / 1e9
        if prepared.tokens:
            info["tokens_per_s"] = prepared.tokens / median_s
        benchmark.extra_info.update(info)
    return run
