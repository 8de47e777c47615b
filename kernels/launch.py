"""Launch-side helpers shared by every kernel module (plain torch, no Triton)."""
from __future__ import annotations

import contextlib
import functools
import os
import sys
from dataclasses import dataclass

import torch


# Triton picks its interpreter or its compiler when a kernel is decorated, from TRITON_INTERPRET
# at that moment; ptuning_fast imports its kernel modules at their first use. Once one has been
# imported, that choice holds, whatever the variable says later.
_defined_interpreted: bool | None = None


def _interpreter_now() -> bool:
    """What Triton would decorate a kernel as now: TRITON_INTERPRET=1, unless Triton's own
    library (tl.cdiv, ...) was already decorated for a GPU when triton was first imported
    (transformers' model classes import it, through torch._dynamo): kernels calling it cannot
    be interpreted then, whatever the variable says."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    language = sys.modules.get("triton.language")
    if language is None:
        return True
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(language.cdiv, InterpretedFunction)


def define_kernels() -> None:
    """Called by each kernel module before its first @triton.jit: records the mode Triton
    decorates in."""
    global _defined_interpreted
    if _defined_interpreted is None:
        _defined_interpreted = _interpreter_now()


def interpreting() -> bool:
    """True when the kernels run in Triton's interpreter: the mode they were decorated in once
    a kernel module was imported; before, the mode they would be decorated in now."""
    if _defined_interpreted is not None:
        return _defined_interpreted
    return _interpreter_now()


def on_device(device: torch.device):
    """Makes `device` the current CUDA device for the block (a no-op where it already is, and
    off CUDA). Triton launches on the current device and its stream, not on the device of the
    tensors it is given: a model spread over GPUs (transformers' device_map) runs layers on
    cuda:1 while cuda:0 is current, and a launch there would be refused ("cannot be accessed
    from Triton") or read another device's memory."""
    if device.type != "cuda" or device.index is None \
            or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def on_input_device(launcher):
    """Decorator for a kernel module's entry point: runs it with the device of its first
    tensor argument current (see `on_device`), so every launch inside goes there."""
    @functools.wraps(launcher)
    def run(*args, **kwargs):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is None:
            return launcher(*args, **kwargs)
        with on_device(first.device):
            return launcher(*args, **kwargs)
    run.on_input_device = True
    return run


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the host side of a launch. `triton.cdiv` is a constexpr-function object
    there, costly on the host, and a decode launch's plan made many of them (bench/NOTES.md,
    "Per-call host cost", gives the figures and how they were taken)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): `triton.next_power_of_2` on the host,
    without its wrapper's cost (see `cdiv`)."""
    return 1 << max(0, n - 1).bit_length()


def contiguous_last(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its last dim is contiguous (kernels take every other stride as given),
    else a contiguous copy: unit-stride last dims let the loads vectorize."""
    return t if t.stride(-1) == 1 else t.contiguous()


@dataclass(frozen=True)
class Target:
    """What a launcher sizes its work for: the CUDA architecture (80 = A100, 90 = H100/H200)
    and the number of SMs (grids that split a reduction aim at >= 2 waves of programs)."""
    arch: int
    sm_count: int


# The static report compiles launches for these without a GPU (H100 SXM: 132 SMs; A100: 108).
H100 = Target(90, 132)
A100 = Target(80, 108)

_PRETEND: Target | None = None


@contextlib.contextmanager
def pretend_target(target: Target):
    """Launchers size grids and pick tiles for `target` instead of the tensors' device: how the
    static report captures, on a CPU, exactly the launches a GPU would get."""
    global _PRETEND
    previous, _PRETEND = _PRETEND, target
    try:
        yield target
    finally:
        _PRETEND = previous


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int) -> Target:
    props = torch.cuda.get_device_properties(index)
    return Target(props.major * 10 + props.minor, props.multi_processor_count)


def device_target(device: torch.device) -> Target | None:
    """The target a launch on `device` is built for; None under the interpreter (which runs
    programs one after another: launchers then use small tiles and few programs)."""
    if _PRETEND is not None:
        return _PRETEND
    if device.type == "cuda":
        return _cuda_target(device.index if device.index is not None
                            else torch.cuda.current_device())
    return None


def dense_index(index: torch.Tensor | None) -> torch.Tensor | None:
    """A (B,) index as the kernels read it: int64 with unit stride. Kernels index it as
    `Index + b`; a strided or expanded view (task_ids = batch[:, 1], a stride-0 expand) is
    copied first — B elements, no host sync — instead of being read as if it were dense."""
    return None if index is None else index.to(torch.int64).contiguous()


def as_seed_tensor(seed, device) -> torch.Tensor:
    """An int seed (or 0-d integer tensor) as the 0-d int64 tensor on `device` the kernels read.
    An int becomes a fill on the device (the value travels as a kernel argument), not
    `torch.tensor(seed, device=...)`: that copies from pageable host memory, a blocking copy
    on every call that a CUDA graph cannot capture."""
    if isinstance(seed, torch.Tensor):
        return seed.to(device=device, dtype=torch.int64).reshape(())
    return torch.full((), int(seed), dtype=torch.int64, device=device)


# Programs per SM that a split reduction aims at: two full waves hide the tail of the last one.
WAVES = 2
# Splits under the interpreter: more than one, so tests cover the partials and their reduction.
INTERPRETER_SPLITS = 3


def resident_programs(num_warps: int) -> int:
    """Programs of `num_warps` warps one SM holds at once, as the static report measures the
    split kernels (bench/NOTES.md): 4-warp tiles ~4 (registers), 8-warp tiles ~2. An estimate
    on the high side: too many splits cost a little partial memory, too few leave SMs idle."""
    return 4 if num_warps <= 4 else 2


def num_splits(device: torch.device, programs: int, work_items: int, num_warps: int) -> int:
    """How many programs share one output tile's reduction (Liger's split-then-sum, made
    deterministic by a fixed order): enough that `programs` tiles x splits fill WAVES waves of
    the target (SMs x resident programs each), at most one split per work item (a split never
    gets empty work)."""
    target = device_target(device)
    if target is None:
        wanted = INTERPRETER_SPLITS
    else:
        slots = WAVES * target.sm_count * resident_programs(num_warps)
        wanted = -(-slots // max(programs, 1))
    return max(1, min(wanted, work_items))
