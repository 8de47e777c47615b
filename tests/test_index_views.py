"""Index tensors given as views (strided, expanded, offset) read the right entries.

`task_ids` often arrive as a column of a batch tensor (`batch[:, 1]`, stride 2) or broadcast
from one value (stride 0); the kernels index them as dense vectors, so the launchers must hand
them over dense. Each case is compared with the same index made contiguous, forward and
gradients, through the Triton path.
"""
import pytest
import torch
from conftest import DEVICE

import ptuning_fast as pf


def _views(T, B):
    """(name, view) pairs of (B,) int64 indices in [0, T) with non-trivial layouts."""
    table = torch.randint(0, T, (B, 3), device=DEVICE)
    yield "column", table[:, 1]                                      # stride 3, offset 1
    yield "expanded", torch.randint(0, T, (1,), device=DEVICE).expand(B)   # stride 0
    yield "reversed", torch.randint(0, T, (2 * B,), device=DEVICE)[1::2].flip(0)


@pytest.mark.parametrize("which", ["column", "expanded", "reversed"])
def test_prefix_index_views(which):
    B, Hq, Hkv, L, D, P, T = 3, 4, 2, 9, 16, 5, 3
    index = dict(_views(T, B))[which]
    q = torch.randn(B, Hq, L, D, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(B, Hkv, L, D, device=DEVICE, requires_grad=True) for _ in range(2))
    pk, pv = (torch.randn(T, Hkv, P, D, device=DEVICE, requires_grad=True) for _ in range(2))
    grads = []
    for idx in (index, index.contiguous()):
        out = pf.prefix_attention(q, k, v, pk, pv, prefix_index=idx, backend="triton")
        grads.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v, pk, pv))))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("which", ["column", "expanded", "reversed"])
def test_prompt_index_views(which):
    B, L, V, d, P, T = 3, 7, 50, 24, 4, 3
    index = dict(_views(T, B))[which]
    ids = torch.randint(0, V, (B, 2 * L), device=DEVICE)[:, ::2]      # strided ids too
    weight = torch.randn(V, d, device=DEVICE)
    prompt = torch.randn(T, P, d, device=DEVICE, requires_grad=True)
    results = []
    for idx in (index, index.contiguous()):
        out = pf.prompt_embedding(ids, weight, prompt, prompt_index=idx, backend="triton")
        results.append((out, *torch.autograd.grad(out.square().sum(), prompt)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    expected = pf.reference.prompt_embedding(ids, weight, prompt, prompt_index=index)
    torch.testing.assert_close(results[0][0], expected)
