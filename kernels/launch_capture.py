"""Captures the kernel launches a launcher makes, instead of running them.

Inside `capture_launches(arch)`, every `kernel[grid](*args, **kwargs)` of a @triton.jit kernel
is recorded — kernel, grid, and the specialization Triton's JIT would compile for sm_<arch>
(see compile_specs.jit_specialize) — and nothing runs. So the real launchers can be driven on
CPU tensors (torch.empty: pages never touched, 16-byte aligned like a CUDA allocation) at full
benchmark sizes; with `launch.pretend_target(...)` around the call they size grids and pick
tiles for that GPU. Run without TRITON_INTERPRET: the interpreter replaces the kernels.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

from .compile_specs import Specialized, jit_specialize


@dataclass
class Launch:
    kernel: str                      # the @triton.jit function's name
    module: str                      # where it is defined
    phase: str | None                # the caller's label (e.g. "fwd", "bwd")
    grid: tuple[int, int, int]
    spec: Specialized
    partial_bytes: int = 0           # fp32 split partials it writes or sums (arguments Partial*)

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


def _grid3(grid, bound: dict) -> tuple[int, int, int]:
    if callable(grid):                       # grid = lambda meta: (...), as Triton allows
        grid = grid(bound)
    grid = tuple(int(g) for g in grid)
    return grid + (1,) * (3 - len(grid))


class LaunchRecorder:
    def __init__(self, arch: int):
        self.arch = arch
        self.launches: list[Launch] = []
        self._phase: str | None = None

    @contextlib.contextmanager
    def phase(self, name: str):
        """Labels the launches made inside (restored after: phases nest)."""
        previous, self._phase = self._phase, name
        try:
            yield self
        finally:
            self._phase = previous

    def record(self, fn, args, grid, kwargs) -> None:
        spec, bound = jit_specialize(fn, args, kwargs, self.arch)
        partials = sum(v.numel() * v.element_size() for k, v in bound.items()
                       if k.startswith("Partial") and hasattr(v, "numel"))
        self.launches.append(Launch(fn.__name__, fn.__module__, self._phase,
                                    _grid3(grid, bound), spec, partials))


@contextlib.contextmanager
def capture_launches(arch: int):
    """Yields a LaunchRecorder that receives every @triton.jit launch made inside."""
    from triton.runtime.jit import JITFunction
    recorder = LaunchRecorder(arch)
    real_run = JITFunction.run

    # `kernel[grid](...)` calls JITFunction.run(*args, grid=grid, warmup=False, **kwargs) on
    # Triton 3.6 and 3.9 alike; nothing below that point (driver, stream) is reached.
    def run(self, *args, grid, warmup, **kwargs):
        recorder.record(self, args, grid, kwargs)

    JITFunction.run = run
    try:
        yield recorder
    finally:
        JITFunction.run = real_run
