"""Launch-side helpers shared by every kernel module (plain torch, no Triton)."""
from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (set before the kernels are imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def contiguous_last(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its last dim is contiguous (kernels take every other stride as given),
    else a contiguous copy: unit-stride last dims let the loads vectorize."""
    return t if t.stride(-1) == 1 else t.contiguous()
