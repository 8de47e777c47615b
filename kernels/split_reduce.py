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

from .launch import define_kernels
from .compile_specs import CompileSpec
from .launch import WAVES, cdiv, device_target

BLOCKS = (16, 64, 256, 1024)    # elements a program sums; a power of two, 16 at least


define_kernels()     # before the first @triton.jit: see launch.interpreting


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


def block_size(numel: int, device: torch.device) -> int:
    """The largest block that still gives WAVES waves of programs on the target (a prefix's
    gradient can be only a few thousand elements: 1024-element blocks would run it on a
    handful of SMs, each adding up every split serially); under the interpreter, see below."""
    target = device_target(device)
    # The interpreter runs programs one after another, each at a fixed cost of milliseconds:
    # there, the largest block that still leaves two programs (a task prefix's gradient in the
    # tests: 9360 programs of 16 elements; that case's backward took 24 s, 2.5 s with 147
    # programs of 1024).
    programs = 2 if target is None else WAVES * target.sm_count
    fitting = [b for b in BLOCKS if cdiv(numel, b) >= programs]
    return fitting[-1] if fitting else BLOCKS[0]


def sum_splits(partials: torch.Tensor, out: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """out (dense, any float dtype) = scale * partials.sum(0) in split order; partials is a
    dense fp32 (num_splits, *out.shape) tensor."""
    numel = out.numel()
    if numel:
        block = block_size(numel, out.device)
        _sum_splits_kernel[(cdiv(numel, block),)](
            out, partials, partials.shape[0], numel, float(scale), BLOCK=block,
            num_warps=_warps(block))
    return out


def _warps(block: int) -> int:
    return max(1, min(4, block // 128))


def compile_specs():
    for i, block in enumerate(BLOCKS):
        for elem in ("fp16", "bf16", "fp32")[i % 2:][:2]:
            constexprs = dict(BLOCK=block)
            yield CompileSpec(f"sum_splits[{elem},BLOCK={block}]", _sum_splits_kernel,
                              {"Out": f"*{elem}", "Partials": "*fp32", "num_splits": "i32",
                               "numel": "i32", "scale": "fp32"}, constexprs, _warps(block), 1)
