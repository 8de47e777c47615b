"""What one benchmark case is: its shape (the fields of a results record) and how to prepare it.

A case is data plus a `prepare(case, device)` function. Preparing does everything that must stay
out of the timed region (allocating fresh input sets, building masks, compiling) and returns a
`Prepared`: a zero-argument `step` that does one timed unit of work, and the work it does (FLOPs,
bytes, tokens) for the throughput columns. A case whose dependency is missing raises
`Unavailable(reason)` from `prepare`, checked at run time, so it starts working as soon as the
dependency lands.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import flops


class Unavailable(Exception):
    """This case cannot run here; the message says why (recorded as `skipped`)."""


@dataclass
class Prepared:
    step: Callable[[], object]          # one unit of timed work; cycles through fresh input sets
    flops: float | None = None          # unmasked floating-point operations per step
    bytes: float | None = None          # fewest bytes one step must move through memory
    tokens: int | None = None           # tokens processed (train) or produced (generate) per step
    whole_process_memory: bool = False  # peak = all allocated (models), not just the step's own
    heavy: bool = False                 # seconds per step: a few timed calls instead of do_bench


@dataclass
class Case:
    op: str         # prefix_attention | attention_terms | prompt_embedding | decode |
                    # train_step | generate
    mode: str       # fwd | fwd_bwd | step | greedy
    provider: str
    dtype: str
    B: int | None = None
    Hq: int | None = None
    Hkv: int | None = None
    Lq: int | None = None
    Lk: int | None = None
    P: int | None = None
    D: int | None = None
    causal: bool | None = None
    method: str | None = None   # train_step / generate: prefix_tuning | prompt_tuning | ...
    terms: str | None = None    # attention_terms: none | window | softcap | bias | ...
    prepare: Callable[["Case", torch.device], Prepared] | None = field(
        default=None, repr=False, compare=False)

    def fields(self) -> dict:
        """The record fields that describe this case (everything but `prepare`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "prepare"}

    def label(self) -> str:
        shape = " ".join(f"{k}={v}" for k, v in self.fields().items()
                         if k not in ("op", "mode", "provider", "dtype", "method", "causal", "terms")
                         and v is not None)
        what = f"{self.op}/{self.mode}" + (f"/{self.method}" if self.method else "") \
            + (f"/{self.terms}" if self.terms else "")
        return f"{what} {self.provider} {self.dtype} {shape}"


def torch_dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def device_copy(numel: int, device: torch.device, dtype: torch.dtype) -> Prepared:
    """The bandwidth yardstick of the memory-bound ops (provider "copy"): a plain device copy of
    `numel` elements, two source/destination pairs in rotation (no pair stays in cache between
    calls). Its GB/s count every byte read and written."""
    pairs = [(torch.randn(numel, device=device, dtype=dtype),
              torch.empty(numel, device=device, dtype=dtype)) for _ in range(2)]
    rotation = itertools.cycle(pairs)

    def copy_step():
        src, dst = next(rotation)
        return dst.copy_(src)
    return Prepared(step=copy_step, bytes=flops.copy_bytes(numel, dtype.itemsize))
