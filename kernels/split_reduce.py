"""Fixed-order sum of fp32 split partials: the second half of every split reduction.

A reduction too long for one program (a shared prefix's gradient over every row, head and
query block; a prompt's gradient over every batch row) is cut into `num_splits` ranges, each
program writing an fp32 partial for its range; this kernel adds the partials in split order
0, 1, ... and stores `scale * sum` in the output's dtype. The same inputs always give the same
bits: no atomics, and the split boundaries depend only on the shapes and the target.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .compile_specs import CompileSpec

BLOCK = 1024


@triton.jit
def _sum_splits_kernel(
    Out, Partials,               # Out: numel elements, dense; Partials: (num_splits, numel) fp32
    num_splits, numel, scale,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, num_splits):
        acc += tl.load(Partials + s * numel + offs, mask=ok, other=0.0)
    tl.store(Out + offs, (acc * scale).to(Out.dtype.element_ty), mask=ok)


def sum_splits(partials: torch.Tensor, out: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """out (dense, any float dtype) = scale * partials.sum(0) in split order; partials is a
    dense fp32 (num_splits, *out.shape) tensor."""
    numel = out.numel()
    if numel:
        _sum_splits_kernel[(triton.cdiv(numel, BLOCK),)](
            out, partials, partials.shape[0], numel, float(scale), BLOCK=BLOCK, num_warps=4)
    return out


def compile_specs():
    for elem in ("fp16", "bf16", "fp32"):
        constexprs = dict(BLOCK=BLOCK)
        yield CompileSpec(f"sum_splits[{elem}]", _sum_splits_kernel,
                          {"Out": f"*{elem}", "Partials": "*fp32", "num_splits": "i32",
                           "numel": "i32", "scale": "fp32"}, constexprs, 4, 1)
