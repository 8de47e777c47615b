"""What bench/ parametrizes over: the cases of `ptuning_fast.benchmarks` on this machine.

(A module of its own rather than conftest.py, which `pytest tests bench` would import twice
under one name.)
"""
import os

import pytest
import torch

from ptuning_fast.benchmarks import build_cases
from ptuning_fast.benchmarks.providers import PROVIDERS

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("PTUNING_FAST_BENCH_FULL", "0") != "1"
if DEVICE.type == "cpu":
    torch.set_num_threads(1)   # as `ptuning-fast bench` does: steadier on a small shared CPU


def cases(op: str):
    """pytest params for every case of `op` on this machine, named by the case's label."""
    return [pytest.param(c, id=c.label().replace(" ", "-"))
            for c in build_cases([op], PROVIDERS, DEVICE, QUICK)]
