"""Shared test set-up: interpreter switch, device choice, the one tolerance table, comparisons.

Without CUDA the kernels run under Triton's interpreter, which must be switched on before any
kernel module is imported (Triton reads TRITON_INTERPRET when it decorates the kernels).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Under pytest-xdist each worker is a process of its own, one per core: one intra-op thread each,
# or the workers' threads wait on each other (the model matrix measured a tiny linear backward
# at 16 ms with two threads on a loaded 2-core machine, 0.23 ms with one).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

from ptuning_fast.error_bound import check_error  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

# Dtypes the kernels are tested in here: the interpreter cannot do bf16 arithmetic
# (bf16 tl.dot returns garbage there, triton issue #11584), so bf16 runs only on a GPU.
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])

# (atol, rtol) per dtype, for outputs and (looser: longer reductions) for gradients.
# Compared against the float64 reference. fp32 depends on the dots: IEEE fp32 (the interpreter;
# a GPU under torch.set_float32_matmul_precision("highest"), where the kernels compile ieee dots)
# keeps 24 mantissa bits, tf32 (a GPU's default) 11, ~1e-3 relative on each product.
FP32_IEEE = {"fwd": (1e-5, 1e-4), "grad": (1e-4, 1e-3)}
FP32_TF32 = {"fwd": (2e-3, 2e-3), "grad": (5e-3, 5e-3)}
TOLERANCES = {
    torch.float16: {"fwd": (2e-3, 2e-3), "grad": (1e-2, 1e-2)},
    torch.bfloat16: {"fwd": (1.6e-2, 1.6e-2), "grad": (5e-2, 5e-2)},
}


def fp32_tolerances(on_gpu=HAS_CUDA, dots=None):
    """The fp32 row for the dots the kernels compile now (`dots`: "ieee" or "tf32", read at the
    call as the launchers read it: torch's per-backend setting first, then the legacy one)."""
    if dots is None:
        from ptuning_fast.kernels.attention_inputs import fp32_matmul_precision
        dots = fp32_matmul_precision()
    return FP32_TF32 if on_gpu and dots == "tf32" else FP32_IEEE


# GPU-only tests carry the `gpu` marker (declared in pyproject.toml), so `pytest -m gpu` selects
# them; without CUDA they are collected and skipped (pytest_collection_modifyitems below).
gpu = pytest.mark.gpu


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tolerance(dtype, kind="fwd"):
    table = fp32_tolerances() if dtype == torch.float32 else TOLERANCES[dtype]
    return table[kind]


def assert_close(actual, expected, dtype, kind="fwd", name="output"):
    """allclose against `expected` with the table's tolerance; the message shows the worst
    element and the share of elements off (as xformers reports it)."""
    atol, rtol = tolerance(dtype, kind)
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values in result"
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    off = err > bound
    if off.any():
        worst = int((err - bound).argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape))
        pytest.fail(f"{name} ({dtype}, {kind}): {off.float().mean().item():.2%} of elements off; "
                    f"worst at {idx}: got {actual[idx].item():.6g}, expected "
                    f"{expected[idx].item():.6g} (atol={atol}, rtol={rtol})")


def assert_error_within(actual, same_precision, exact, name="output", kind="fwd", dtype=None,
                        relative=False):
    """FlashAttention's rule, `ptuning_fast.error_bound` (the one `ptuning-fast verify` uses):
    the kernel's max error against an exact (float64) result at most 2x the error of a PyTorch
    implementation in the same low precision, plus a few ulps. kind: "fwd" (an output) or
    "grad" (a gradient: a larger floor). dtype: the precision the results were computed in
    (default: actual's; name it when a result is stored wider, as the fp32 parameter gradients
    of a bf16 model). relative: errors in units of max |exact|, so that the floor scales with
    the result (a model's parameter gradients lie far below the floor's magnitude of 1, which
    would pass anything)."""
    dtype = dtype or actual.dtype
    if relative:
        scale = exact.abs().max().item() or 1.0
        actual, same_precision, exact = (t.double() / scale
                                         for t in (actual, same_precision, exact))
    result = check_error(actual, same_precision, exact, kind=kind, dtype=dtype)
    assert result.ok, result.describe(name)


def poison_like(t):
    """A tensor full of NaN: kernels must overwrite every element they own."""
    return torch.full_like(t, float("nan"))


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(scope="module")
def one_torch_thread():
    """Whole-model tests on tiny configs run on one intra-op thread: their ops are microseconds
    long, and a second thread only adds synchronization; on a loaded 2-core machine it made a
    tiny linear backward ~70x slower (16 ms against 0.23 ms). Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
