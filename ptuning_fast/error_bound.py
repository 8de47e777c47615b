"""The one rule for "close enough", shared by `ptuning-fast verify` and the tests.

FlashAttention's rule: a result computed in a low precision passes when its max error against
an exact (float64) result is at most FACTOR times the error of the reference path run in the
same low precision, plus a floor of a few units in the last place of that precision, scaled by
the result's magnitude (at least 1). The floor matters when the same-precision error is zero
or tiny: on small shapes a max over a handful of elements hinges on which side of one rounding
the reference happened to land, and storing the result alone costs half an ulp. Gradients
reduce over more terms than outputs, hence a larger floor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FACTOR = 2.0
FLOOR_ULPS = {"fwd": 2.0, "grad": 8.0}


@dataclass(frozen=True)
class ErrorCheck:
    """One compared tensor: errors against the exact result, the allowed error, the verdict."""
    error: float             # max |actual - exact|
    reference_error: float   # max |same_precision - exact|
    allowed: float           # FACTOR * reference_error + floor
    magnitude: float         # max(1, max |exact|): the floor's scale
    finite: bool             # no NaN / inf in `actual`

    @property
    def ok(self) -> bool:
        return self.finite and self.error <= self.allowed

    @property
    def relative_error(self) -> float:
        return self.error / self.magnitude

    def describe(self, name: str) -> str:
        if not self.finite:
            return f"{name}: non-finite values in the result"
        return (f"{name}: error {self.error:.3g} vs float64 > allowed {self.allowed:.3g} "
                f"({FACTOR:g} x the same-precision reference's error {self.reference_error:.3g} "
                f"+ floor)")


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_error(actual: torch.Tensor, same_precision: torch.Tensor, exact: torch.Tensor, *,
                kind: str = "fwd", dtype: torch.dtype | None = None) -> ErrorCheck:
    """`actual` and `same_precision` computed in `dtype` (default: actual's), `exact` in float64.
    kind: "fwd" (an output) or "grad" (a gradient)."""
    if kind not in FLOOR_ULPS:
        raise ValueError(f"`kind` must be one of {sorted(FLOOR_ULPS)}, got {kind!r}")
    if actual.shape != exact.shape or same_precision.shape != exact.shape:
        raise ValueError(f"shapes differ: actual {tuple(actual.shape)}, same_precision "
                         f"{tuple(same_precision.shape)}, exact {tuple(exact.shape)}")
    eps = torch.finfo(dtype or actual.dtype).eps
    magnitude = max(1.0, exact.abs().max().item()) if exact.numel() else 1.0
    reference_error = _max_abs_diff(same_precision, exact)
    allowed = FACTOR * reference_error + FLOOR_ULPS[kind] * eps * magnitude
    return ErrorCheck(error=_max_abs_diff(actual, exact), reference_error=reference_error,
                      allowed=allowed, magnitude=magnitude,
                      finite=bool(torch.isfinite(actual).all()))
