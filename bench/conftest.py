"""pytest-benchmark front end for the cases of `ptuning_fast.benchmarks` (defined there, once).

    pytest bench/ --benchmark-json=bench.json            # the --quick grid
    PTUNING_FAST_BENCH_FULL=1 pytest bench/ ...          # the full grid of `ptuning-fast bench`

Each test prepares one case outside the timed region and times its step with pytest-benchmark
(host timer, the CUDA stream synchronized inside each call); FLOPs, bytes and tokens per step go
to `extra_info`, so TFLOP/s, GB/s and tokens/s follow from the stats. A case whose dependency is
missing is skipped with its reason. `ptuning-fast bench` remains the reference measurement
(do_bench with CUDA events and L2 flushes).
"""
import pytest
import torch

from bench_helpers import DEVICE
from ptuning_fast.benchmarks.case import Unavailable


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
        if prepared.heavy:
            rounds, warmup = 3, 1
        else:
            rounds, warmup = (20, 3) if DEVICE.type == "cuda" else (5, 1)
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup, iterations=1)
        info = {**case.fields(), "device": torch.cuda.get_device_name() if DEVICE.type == "cuda"
                else "CPU", "flops": prepared.flops, "bytes": prepared.bytes,
                "tokens": prepared.tokens}
        if benchmark.stats is not None:      # None under --benchmark-disable (a smoke run)
            median_s = benchmark.stats.stats.median
            if prepared.flops:
                info["tflops"] = prepared.flops / median_s / 1e12
            if prepared.bytes:
                info["gbps"] = prepared.bytes / median_s / 1e9
            if prepared.tokens:
                info["tokens_per_s"] = prepared.tokens / median_s
        benchmark.extra_info.update(info)
    return run
