"""What each attention term costs: prefix attention with a sliding window, soft-capping, an
additive bias, sinks or packed sequences, against the same call without the term (the
`terms="none"` case) and against the naive path that transformers' eager attention takes for
these models (the reference: materialized [prefix; K/V], dense masks, explicit logits — what
PEFT runs for Gemma 2's soft-capping and GPT-OSS's sinks, which SDPA cannot compute).

FLOPs count the (query, key) pairs each case actually attends to (a window attends to fewer).
"""
from __future__ import annotations

import itertools

import torch

from .. import ops, reference
from ..packing import packed_segments
from .attention import _gpu_shape, _input_sets, _inputs, timed_step
from .case import Case, Prepared, Unavailable, torch_dtype
from .flops import BACKWARD_OVER_FORWARD

TERM_SETS = ("none", "window", "softcap", "bias", "sinks", "packed", "gemma2")
PROVIDERS = ("fused", "torch", "naive")
# Provider -> the backend it runs: the kernels, the PyTorch path ("auto" off CUDA), the reference.
_BACKEND = {"fused": "triton", "torch": "torch", "naive": "reference"}


def terms_cases(device: torch.device, quick: bool, provider_names) -> list[Case]:
    """bf16, D = 128, P = 64 on a GPU (Llama-3.2-1B's attention shape); fp32 small on CPU,
    where the torch and naive paths run."""
    if device.type == "cuda":
        lengths = (1024,) if quick else (1024, 8192)
        shapes = [("bf16", 64, Lk, _gpu_shape(128, Lk)) for Lk in lengths]
    else:
        shapes = [("fp32", 16, 256, {"B": 1, "Hq": 8, "Hkv": 2, "D": 64})]
    names = [n for n in PROVIDERS if n in provider_names]
    sets = ("none", "window", "gemma2") if quick else TERM_SETS
    return [Case("attention_terms", mode, name, dtype, Lq=Lk, Lk=Lk, P=P, causal=True,
                 terms=terms, prepare=prepare_terms, **shape)
            for mode, (dtype, P, Lk, shape), terms, name in itertools.product(
                ("fwd", "fwd_bwd"), shapes, sets, names)]


def term_kwargs(terms: str, case: Case, device, make=torch.randn) -> dict:
    """The keyword arguments of one term set at `case`'s shape: a window of a quarter of the
    keys (Mistral's 4096 at 16k), Gemma 2's cap of 50, a T5-style per-head bias over
    [prefix; sequence], GPT-OSS-style sinks, four packed sequences per row. `make` fills the
    tensors (torch.empty where nothing will read them)."""
    dtype = torch_dtype(case.dtype)
    window = (max(1, case.Lk // 4) - 1, -1)
    return {
        "none": {},
        "window": dict(window_size=window),
        "softcap": dict(softcap=50.0),
        "bias": dict(bias=make(1, case.Hq, case.Lq, case.P + case.Lk, device=device,
                               dtype=dtype)),
        "sinks": dict(sinks=make(case.Hq, device=device)),
        "packed": dict(position_ids=(torch.arange(case.Lk, device=device) % (case.Lk // 4))
                       .expand(case.B, -1)),
        "gemma2": dict(window_size=window, softcap=50.0),
    }[terms]


def _visible(case: Case, kwargs: dict, device) -> int:
    """(query, key) pairs one (row, head) attends to under these terms."""
    segments = None
    if "position_ids" in kwargs:
        segments = packed_segments(kwargs["position_ids"][:1], batch=1, length=case.Lk)
    allowed = reference.visible_keys(1, case.Lq, case.Lk, case.P, causal=case.causal,
                                     attention_mask=None, device=device,
                                     window_size=kwargs.get("window_size", (-1, -1)),
                                     segments=segments)
    return int(allowed.sum())


def prepare_terms(case: Case, device: torch.device) -> Prepared:
    if case.provider == "fused" and device.type != "cuda":
        raise Unavailable("kernel timings need a GPU (on CPU the Triton kernels run only under "
                          "the interpreter, which is not worth timing)")
    backend = _BACKEND[case.provider]
    backward = case.mode == "fwd_bwd"
    steps = []
    for _ in range(_input_sets(case, device)):
        x = _inputs(case, device, requires_grad=backward)
        kwargs = term_kwargs(case.terms, case, device)

        def attend(x=x, kwargs=kwargs):
            return ops.prefix_attention(x.q, x.k, x.v, x.prefix_k, x.prefix_v, causal=True,
                                        backend=backend, **kwargs)
        steps.append(timed_step(attend, x, backward))
    rotation = itertools.cycle(steps)
    fwd = 4 * case.D * case.B * case.Hq * _visible(case, term_kwargs(case.terms, case, device),
                                                   device)
    return Prepared(step=lambda: next(rotation)(),
                    flops=float(fwd * (1 + BACKWARD_OVER_FORWARD if backward else 1)))
