"""Launch-path defects that only a GPU would hit (issue 26), each shown on CPU where the path
allows (the interpreter, a pretended H100 for grids and splits) and again under `-m gpu`:
torch's per-backend TF32 API, the TMA allocator in another thread, the autotuner under CUDA
graph capture, the dropout seed's host copy, grid axes past 65,535, and the per-task prefix
gradient's splits and partials.
"""
import contextvars
import threading

import pytest
import torch
import torch.utils._pytree as pytree
import triton
from conftest import DEVICE, assert_close, gpu
from test_prefix_attention import Case, check_against_reference, exact, fused, make_inputs
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime import _allocation

import ptuning_fast as pf
from ptuning_fast import ops
from ptuning_fast.kernels import autotune, tiles
from ptuning_fast.kernels import prefix_attention_fwd as fwd_kernels
from ptuning_fast.kernels.launch import as_seed_tensor

# --------------------------------------------------------------------------------------------
# 1. torch's per-backend fp32 precision API (torch >= 2.9)

NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")


@pytest.fixture
def fp32_precision_restored():
    """Puts torch's fp32 matmul settings back as they were: the legacy one first (setting it
    writes the per-backend one), then the generic level (which overwrites the levels under it),
    then CUDA matmul's own."""
    legacy = torch.get_float32_matmul_precision()
    generic, matmul = torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    yield
    torch.set_float32_matmul_precision(legacy)
    torch.backends.fp32_precision = generic
    torch.backends.cuda.matmul.fp32_precision = matmul


def _set_matmul(value):
    torch.backends.cuda.matmul.fp32_precision = value


def _set_generic(value):
    torch.backends.cuda.matmul.fp32_precision = "none"     # inherit from the generic level
    torch.backends.fp32_precision = value


TF32_CASE = Case(2, 4, 2, 21, 30, 32, 7, "task", "right")
DECODE_CASE = Case(2, 4, 2, 3, 30, 32, 7)        # Lq <= 16 without gradients: the decode kernel


def check_decode_against_reference(case):
    inputs, mask, index = make_inputs(case, torch.float32, requires_grad=False)
    got = fused(*inputs, attention_mask=mask, prefix_index=index)
    assert_close(got, exact(*inputs, attention_mask=mask, prefix_index=index), torch.float32)


@pytest.mark.skipif(not NEW_API, reason="torch without the per-backend fp32 precision API")
@pytest.mark.parametrize("set_api", [_set_matmul, _set_generic], ids=["cuda.matmul", "generic"])
def test_new_tf32_api_drives_the_fp32_dots(fp32_precision_restored, set_api):
    set_api("tf32")
    assert fwd_kernels.input_precision(torch.float32) == "tf32"
    assert fwd_kernels.input_precision(torch.float16) == "tf32"
    set_api("ieee")
    assert fwd_kernels.input_precision(torch.float32) == "ieee"
    # Every fp32 launch (forward, decode, each backward kernel) reads the setting; under the
    # interpreter the dots are exact either way, so the result is checked against the reference.
    set_api("tf32")
    check_against_reference(TF32_CASE, torch.float32)
    check_decode_against_reference(DECODE_CASE)


def test_legacy_tf32_api_still_decides(fp32_precision_restored):
    torch.set_float32_matmul_precision("high")
    assert fwd_kernels.input_precision(torch.float32) == "tf32"
    torch.set_float32_matmul_precision("highest")
    assert fwd_kernels.input_precision(torch.float32) == "ieee"
    if NEW_API:      # neither per-backend level set: the legacy value is the one left
        torch.backends.fp32_precision = "none"
        torch.backends.cuda.matmul.fp32_precision = "none"
        torch.set_float32_matmul_precision("medium")
        torch.backends.cuda.matmul.fp32_precision = "none"
        assert fwd_kernels.input_precision(torch.float32) == "tf32"


@gpu
@pytest.mark.skipif(not NEW_API, reason="torch without the per-backend fp32 precision API")
def test_gpu_new_tf32_api(fp32_precision_restored):
    _set_matmul("tf32")
    case = TF32_CASE
    inputs, mask, index = make_inputs(case, torch.float32, requires_grad=False)
    got = fused(*inputs, attention_mask=mask, prefix_index=index)
    # tf32 keeps 10 mantissa bits: ~1e-3 relative error on each score.
    torch.testing.assert_close(got.double(), exact(*inputs, attention_mask=mask,
                                                   prefix_index=index), atol=1e-2, rtol=1e-2)
    _set_matmul("ieee")
    check_against_reference(case, torch.float32)


# --------------------------------------------------------------------------------------------
# 3. The TMA path's allocator lives in a ContextVar: every thread and context needs its own

def _in_new_thread(fn):
    """fn()'s result, run in a thread of its own (which starts with an empty context)."""
    result = []
    worker = threading.Thread(target=lambda: result.append(fn()))
    worker.start()
    worker.join()
    return result[0]


def test_tma_allocator_is_set_in_a_second_thread():
    fwd_kernels._ensure_descriptor_allocator()            # a first TMA launch, this thread

    def second_thread_launch():
        fwd_kernels._ensure_descriptor_allocator()
        return _allocation._allocator.get()
    assert not isinstance(_in_new_thread(second_thread_launch), _allocation.NullAllocator)


def test_tma_launch_keeps_the_callers_allocator():
    def own(size, alignment, stream):
        raise AssertionError("never called on CPU")

    def launch_with_own_allocator():
        triton.set_allocator(own)
        fwd_kernels._ensure_descriptor_allocator()
        return _allocation._allocator.get()
    assert contextvars.copy_context().run(launch_with_own_allocator) is own


@gpu
def test_gpu_tma_forward_from_a_second_thread():
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90")
    case = Case(2, 4, 2, 100, 130, 64, 19, "task", "right")
    (q, k, v, pk, pv), mask, index = make_inputs(case, torch.bfloat16, requires_grad=False)
    assert fwd_kernels.tma_ready(pk, pv, k, v)

    def forward(tma):
        return fwd_kernels.prefix_attention_fwd(
            q, k, v, pk, pv, mask, index, config=tiles.TileConfig(64, 64, 4, 2, tma=tma))[0]
    pointer = forward(False)
    assert torch.equal(_in_new_thread(lambda: forward(True)), pointer)


# --------------------------------------------------------------------------------------------
# 4. CUDA graph capture takes the tuned tile (test_autotune.py shows it with a fake timer)

def _capture(fn):
    """fn()'s output as a CUDA graph replays it (captured after a warm-up on a side stream,
    as torch.cuda.graphs asks)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    return out


@gpu
def test_gpu_graph_replays_the_eager_tile(monkeypatch):
    monkeypatch.delenv("PTUNING_FAST_AUTOTUNE", raising=False)
    monkeypatch.setattr(autotune, "_BEST", {})
    case = Case(2, 8, 2, 256, 256, 64, 16)
    inputs, mask, index = make_inputs(case, torch.bfloat16, requires_grad=False)
    fused(*inputs)                                       # tunes the key
    assert autotune._BEST
    # Whatever won the timing, make the key's choice one that is not the first candidate:
    # the first is what a bypassed tuner runs.
    for key in autotune._BEST:
        kernel, arch, dtype, _, dropout, _ = key
        autotune._BEST[key] = tiles.candidates(kernel, arch, dtype, case.D, dropout)[-1]
    eager = fused(*inputs)
    assert torch.equal(_capture(lambda: fused(*inputs)), eager)


# --------------------------------------------------------------------------------------------
# 5. An int dropout_seed becomes a device tensor without a host-to-device copy

class _DeviceOps(TorchDispatchMode):
    """Records every op torch dispatches: (name, devices of its tensor inputs, its output)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t.device.type for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)]
        self.ops.append((str(func), inputs, out))
        return out


@pytest.mark.parametrize("make", [ops._dropout_seed_tensor, as_seed_tensor],
                         ids=["ops", "kernels"])
def test_int_seed_is_made_on_the_device(make):
    # `torch.tensor(seed, device=...)` copies from pageable host memory (blocking, and not
    # capturable) outside the dispatcher's view; a fill on the device is an op taking no host
    # tensor. The meta device stands in for a GPU.
    seed = 0x5EED_1234_ABCD
    with _DeviceOps() as seen:
        made = make(seed, torch.device("meta"))
    assert made.shape == () and made.dtype == torch.int64 and made.device.type == "meta"
    assert any(out is made for _, _, out in seen.ops), "the seed came from outside torch's ops"
    assert all("cpu" not in inputs for _, inputs, _ in seen.ops), seen.ops
    for value in (seed, -2 ** 63, 2 ** 63 - 1, ops.SEED_BOUND - 1):
        assert make(value, torch.device(DEVICE)).item() == value


@gpu
def test_gpu_int_seed_dropout_never_syncs_and_is_captured():
    case = Case(2, 4, 2, 64, 64, 64, 16)
    inputs, mask, index = make_inputs(case, torch.float16, requires_grad=False)

    def forward():
        return pf.prefix_attention(*inputs, backend="triton", dropout_p=0.2, dropout_seed=1234)
    eager = forward()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        assert torch.equal(forward(), eager)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert torch.equal(_capture(forward), eager)
