"""Prompt-embedding cases: GB/s of `[prompt; weight[input_ids]]` against a plain device copy of
the same output bytes (the bandwidth ceiling this op can approach).

Record fields: Lq is the sequence length L, D the hidden size d, P the prompt length.
Providers: fused (`pf.prompt_embedding(..., backend="triton")`), torch (`backend="torch"`, what
"auto" runs on CPU), naive (PEFT's way: the prompt looked up once per row from expanded indices,
the words looked up, torch.cat), copy.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from . import flops
from .case import Case, Prepared, Unavailable, device_copy, torch_dtype

PROVIDERS = ("fused", "torch", "naive", "copy")
VOCAB_GPU = 128256   # Llama-3's vocabulary


def prompt_embedding_cases(device: torch.device, quick: bool, provider_names) -> list[Case]:
    names = [p for p in PROVIDERS if p in provider_names or p == "copy"]
    if device.type == "cuda":
        shapes = [("bf16", 32, 2048, 64, 2048)] if quick else \
            [("bf16", 8, 512, 64, 2048), ("bf16", 32, 2048, 64, 2048), ("fp16", 32, 2048, 64, 2048)]
    else:
        shapes = [("fp32", 4, 512, 64, 1024)]
    return [Case("prompt_embedding", "fwd", name, dtype, B=B, Lq=L, P=P, D=d,
                 prepare=prepare_prompt_embedding)
            for dtype, B, L, P, d in shapes for name in names]


def naive_prompt_embedding(input_ids: torch.Tensor, weight: torch.Tensor,
                           prompt: torch.Tensor) -> torch.Tensor:
    """PEFT's prompt tuning: `prompt_encoder(prompt_tokens)` on per-row indices, then torch.cat."""
    B, P = input_ids.shape[0], prompt.shape[0]
    prompt_tokens = torch.arange(P, device=input_ids.device).unsqueeze(0).expand(B, -1)
    return torch.cat([F.embedding(prompt_tokens, prompt), F.embedding(input_ids, weight)], dim=1)


def prepare_prompt_embedding(case: Case, device: torch.device) -> Prepared:
    dtype = torch_dtype(case.dtype)
    B, L, P, d = case.B, case.Lq, case.P, case.D
    vocab = VOCAB_GPU if device.type == "cuda" else 32000
    weight = torch.randn(vocab, d, device=device, dtype=dtype)
    element = dtype.itemsize
    if case.provider == "copy":
        return device_copy(B * (P + L) * d, device, dtype)
    if case.provider == "fused":
        if device.type != "cuda":
            raise Unavailable("kernel timings need a GPU (on CPU the Triton kernels run only "
                              "under the interpreter, which is not worth timing)")
        from .. import ops

        def compute(ids, prompt):
            return ops.prompt_embedding(ids, weight, prompt, backend="triton")
    elif case.provider == "torch":
        from .. import ops

        def compute(ids, prompt):
            return ops.prompt_embedding(ids, weight, prompt, backend="torch")
    elif case.provider == "naive":
        def compute(ids, prompt):
            return naive_prompt_embedding(ids, weight, prompt)
    else:
        raise ValueError(f"unknown prompt_embedding provider {case.provider!r}")
    sets = [(torch.randint(0, vocab, (B, L), device=device),
             torch.randn(P, d, device=device, dtype=dtype)) for _ in range(3)]
    rotation = itertools.cycle(sets)

    def step():
        with torch.no_grad():
            return compute(*next(rotation))
    return Prepared(step=step, bytes=flops.prompt_embedding_bytes(B, L, P, d, element))
