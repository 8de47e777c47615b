"""Attention dropout's seeds and the keep-mask the non-Triton backends apply for a seed.

A seed is a 0-d int64 tensor on the inputs' device (drawn there: no host sync, capturable in a
CUDA graph). The Triton kernels regenerate their mask from it; the "torch" and "reference"
backends draw the kernels' mask for it where the mask kernel can run and otherwise a
`torch.bernoulli` mask (the same for both); see `ptuning_fast.prefix_attention`.
"""
from __future__ import annotations

import torch

from .fused.support import kernels_can_run
from .kernels.launch import as_seed_tensor

# Seeds are drawn from [0, 2**62): any int64 works for Philox; this range is what gets drawn.
SEED_BOUND = 2 ** 62


def dropout_seed_tensor(dropout_seed, device) -> torch.Tensor:
    """0-d int64 seed on `device`: the given int, or one drawn from torch's generator there;
    either is made on the device itself (no host sync, capturable in a CUDA graph)."""
    if dropout_seed is None:
        return torch.randint(0, SEED_BOUND, (), device=device, dtype=torch.int64)
    return as_seed_tensor(dropout_seed, device)


def reference_dropout_mask(seed, q_shape, P, Lk, dropout_p) -> torch.Tensor:
    """Keep-mask (B, Hq, Lq, P + Lk) for the "torch" and "reference" backends."""
    B, Hq, Lq, _ = q_shape
    device = seed.device
    if kernels_can_run(device):
        from .kernels.attention_dropout import dropout_keep_mask
        return dropout_keep_mask(seed, B, Hq, Lq, P, Lk, dropout_p, device)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed) % 2 ** 63)
    keep = torch.full((B, Hq, Lq, P + Lk), 1.0 - dropout_p, device=device)
    return torch.bernoulli(keep, generator=generator).bool()
