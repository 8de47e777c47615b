"""Prefix-attention cases: forward and forward + backward over a prefilled sequence, and a decode
step (Lq = 1 against a cache, with a prefix). Shapes follow the targets in docs/design.md."""
from __future__ import annotations

import itertools

import torch

from . import flops, providers
from .case import Case, Prepared, device_copy, torch_dtype

TOKENS_PER_BATCH = 16384   # B = 16384 // Lk: enough work to fill an H100 at every length
HIDDEN = 2048              # Hq = HIDDEN // D, Hkv = Hq // 4 (GQA 4:1), as in Llama-3.2-1B


def _gpu_shape(D: int, Lk: int) -> dict:
    Hq = HIDDEN // D
    return {"B": max(1, TOKENS_PER_BATCH // Lk), "Hq": Hq, "Hkv": Hq // 4, "D": D}


def attention_cases(device: torch.device, quick: bool, provider_names) -> list[Case]:
    """prefix_attention fwd and fwd_bwd. FlexAttention compiles one graph per shape (seconds
    each), so on CUDA it runs on the bf16, D = 128, P = 64 slice only."""
    if device.type == "cuda":
        grid = ([("bf16", 128, 64, Lk) for Lk in (1024, 8192)] if quick else
                list(itertools.product(("bf16", "fp16"), (64, 128), (16, 64, 256),
                                       (512, 1024, 2048, 8192))))
        shapes = [(dt, P, Lk, _gpu_shape(D, Lk)) for dt, D, P, Lk in grid]
        flex_slice = {("bf16", 128, 64, 1024), ("bf16", 128, 64, 8192)}
    else:
        # CPU: reference-style paths against each other at small sizes; fp32 (CPU bf16 and fp16
        # matrix products say nothing about a GPU).
        lengths = (256, 512) if quick else (256, 512, 1024)
        shapes = [("fp32", P, Lk, {"B": 1, "Hq": 8, "Hkv": 2, "D": 64})
                  for P in (16, 64) for Lk in lengths]
        flex_slice = None
    cases = []
    for mode in ("fwd", "fwd_bwd"):
        for dtype, P, Lk, shape in shapes:
            for name in provider_names:
                if name == "flex" and flex_slice is not None and \
                        (dtype, shape["D"], P, Lk) not in flex_slice:
                    continue
                cases.append(Case("prefix_attention", mode, name, dtype, Lq=Lk, Lk=Lk, P=P,
                                  causal=True, prepare=prepare_attention, **shape))
    return _compiled_last(cases)


def _compiled_last(cases: list[Case]) -> list[Case]:
    """FlexAttention's cases last: they compile for seconds each, and a run cut short by a time
    limit should lose those rather than the kernel comparisons."""
    return sorted(cases, key=lambda c: c.provider == "flex")


# The issue's decode shape (a Llama-3-8B-like attention layer: Hq = 32, Hkv = 8, D = 128) at a
# 4k cache: on 132 SMs its B x Hkv = 64 (row, kv head) pairs need the keys split to fill the GPU.
DECODE_ISSUE_SHAPE = (4096, {"B": 8, "Hq": 32, "Hkv": 8, "D": 128})


def decode_cases(device: torch.device, quick: bool, provider_names) -> list[Case]:
    """One new token per row against a cache of Lk - 1 past tokens, with a P = 64 prefix.
    GB/s counts the bytes one step must move: the K/V cache, the prefix, q and the output once
    (`flops.attention_fwd_bytes`). Every shape also times "copy", a device copy moving those
    bytes: the bandwidth this device measurably reaches, which the decode target is a share of."""
    if device.type == "cuda":
        grid = [(64, 8192)] if quick else [(D, Lk) for D in (64, 128) for Lk in (1024, 8192)]
        shapes = [("bf16", 64, Lk, {"B": 8, "Hq": HIDDEN // D, "Hkv": HIDDEN // D // 4, "D": D})
                  for D, Lk in grid]
        shapes.append(("bf16", 64, *DECODE_ISSUE_SHAPE))
    else:
        shapes = [("fp32", 16, 512, {"B": 2, "Hq": 8, "Hkv": 2, "D": 64})]
    cases = [Case("decode", "fwd", name, dtype, Lq=1, Lk=Lk, P=P, causal=True,
                  prepare=prepare_decode_copy if name == "copy" else prepare_attention, **shape)
             for dtype, P, Lk, shape in shapes for name in [*provider_names, "copy"]]
    if device.type == "cuda":     # one compiled FlexAttention decode shape is enough
        cases = [c for c in cases if c.provider != "flex" or (c.D, c.Lk) == (64, 8192)]
    return _compiled_last(cases)


def _inputs(case: Case, device, requires_grad: bool) -> providers.AttnInputs:
    dtype = torch_dtype(case.dtype)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(requires_grad)
    return providers.AttnInputs(
        q=randn(case.B, case.Hq, case.Lq, case.D), k=randn(case.B, case.Hkv, case.Lk, case.D),
        v=randn(case.B, case.Hkv, case.Lk, case.D), prefix_k=randn(case.Hkv, case.P, case.D),
        prefix_v=randn(case.Hkv, case.P, case.D), causal=case.causal)


def _input_sets(case: Case, device) -> int:
    """Fresh inputs for every call: rotate among a few sets (one when they would be large)."""
    if device.type != "cuda":
        return 2
    per_set = flops.attention_fwd_bytes(case.B, case.Hq, case.Hkv, case.Lq, case.Lk, case.P,
                                        case.D, torch_dtype(case.dtype).itemsize)
    return 3 if per_set < 2**30 else 1


def timed_step(attend, x: providers.AttnInputs, backward: bool):
    """One timed unit: `attend()` without autograd, or with the gradients of every input."""
    if not backward:
        def step():
            with torch.no_grad():
                return attend()
        return step
    leaves = (x.q, x.k, x.v, x.prefix_k, x.prefix_v)
    grad_out = torch.randn_like(x.q)
    # autograd.grad, not .backward(): no gradient accumulation into .grad
    return lambda: torch.autograd.grad(attend(), leaves, grad_out)


def prepare_attention(case: Case, device: torch.device) -> Prepared:
    backward = case.mode == "fwd_bwd"
    decode = case.op == "decode"
    steps = []
    for _ in range(_input_sets(case, device)):
        x = _inputs(case, device, requires_grad=backward)
        steps.append(timed_step(providers.setup(case.provider, x, decode=decode), x, backward))
    rotation = itertools.cycle(steps)
    element = torch_dtype(case.dtype).itemsize
    return Prepared(
        step=lambda: next(rotation)(),
        flops=flops.attention_flops(case.B, case.Hq, case.Lq, case.Lk, case.P, case.D,
                                    case.causal, case.mode),
        bytes=(flops.attention_fwd_bytes(case.B, case.Hq, case.Hkv, case.Lq, case.Lk, case.P,
                                         case.D, element) if decode else None))


def prepare_decode_copy(case: Case, device: torch.device) -> Prepared:
    """A device copy of as many bytes as the decode step moves (half read, half written)."""
    dtype = torch_dtype(case.dtype)
    step_bytes = flops.attention_fwd_bytes(case.B, case.Hq, case.Hkv, case.Lq, case.Lk, case.P,
                                           case.D, dtype.itemsize)
    return device_copy(step_bytes // (2 * dtype.itemsize), device, dtype)
