"""Launch-path defects that only a GPU would hit (issue 26), each shown on CPU where the path
allows (the interpreter, a pretended H100 for grids and splits) and again under `-m gpu`:
torch's per-backend TF32 API, the TMA allocator in another thread, the autotuner under CUDA
graph capture, the dropout seed's host copy, grid axes past 65,535, and the per-task prefix
gradient's splits and partials.
"""
import contextvars
import inspect
import math
import threading

import pytest
import torch
import torch.utils._pytree as pytree
import triton
from conftest import DEVICE, assert_close, assert_error_within, gpu
from test_prefix_attention import Case, check_against_reference, exact, fused, make_inputs
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime import _allocation

import ptuning_fast as pf
from ptuning_fast import dropout_seeds, reference
from ptuning_fast.kernels import attention_dropout, attention_inputs, autotune, split_reduce, tiles
from ptuning_fast.kernels import prefix_attention_bwd as bwd_kernels
from ptuning_fast.kernels import prefix_attention_fwd as fwd_kernels
from ptuning_fast.kernels import prompt_embedding as embedding_kernels
from ptuning_fast.kernels.attention_options import AttentionSpec
from ptuning_fast.kernels.launch import H100, as_seed_tensor, pretend_target

# --------------------------------------------------------------------------------------------
# 1. torch's per-backend fp32 precision API (torch >= 2.9)

NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")


@pytest.fixture
def fp32_precision_restored():
    """Puts torch's fp32 matmul settings back as they were: the legacy one first (setting it
    writes the per-backend one), then the generic level (which overwrites the levels under it),
    then CUDA matmul's own."""
    legacy = torch.get_float32_matmul_precision()
    if NEW_API:
        generic, matmul = torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    yield
    torch.set_float32_matmul_precision(legacy)
    if NEW_API:
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
    assert attention_inputs.input_precision(torch.float32) == "tf32"
    assert attention_inputs.input_precision(torch.float16) == "tf32"
    set_api("ieee")
    assert attention_inputs.input_precision(torch.float32) == "ieee"
    # Every fp32 launch (forward, decode, each backward kernel) reads the setting; under the
    # interpreter the dots are exact either way, so the result is checked against the reference.
    set_api("tf32")
    check_against_reference(TF32_CASE, torch.float32)
    check_decode_against_reference(DECODE_CASE)


def test_legacy_tf32_api_still_decides(fp32_precision_restored):
    torch.set_float32_matmul_precision("high")
    assert attention_inputs.input_precision(torch.float32) == "tf32"
    torch.set_float32_matmul_precision("highest")
    assert attention_inputs.input_precision(torch.float32) == "ieee"
    if NEW_API:      # neither per-backend level set: the legacy value is the one left
        torch.backends.fp32_precision = "none"
        torch.backends.cuda.matmul.fp32_precision = "none"
        torch.set_float32_matmul_precision("medium")
        torch.backends.cuda.matmul.fp32_precision = "none"
        assert attention_inputs.input_precision(torch.float32) == "tf32"


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
            q, k, v, pk, pv, AttentionSpec(attention_mask=mask, prefix_index=index),
            config=tiles.TileConfig(64, 64, 4, 2, tma=tma))[0]
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


@pytest.mark.parametrize("make", [dropout_seeds.dropout_seed_tensor, as_seed_tensor],
                         ids=["dropout_seeds", "kernels"])
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
    for value in (seed, -2 ** 63, 2 ** 63 - 1, dropout_seeds.SEED_BOUND - 1):
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


# --------------------------------------------------------------------------------------------
# 6. Grid axes 1 and 2 hold at most 65,535 programs on CUDA (axis 0: 2**31 - 1)

AXIS_LIMITS = (2 ** 31 - 1, 65_535, 65_535)


class _GridSpy:
    """Stands in for a @triton.jit kernel: records each launch's grid and bound arguments,
    runs nothing (the shapes here would take the interpreter hours)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, num_stages=3, **kwargs):
            bound = inspect.signature(self.kernel.fn).bind_partial(*args, **kwargs).arguments
            self.launches.append((tuple(grid) + (1,) * (3 - len(grid)), bound))
        return launch


def _spy(monkeypatch, module, name):
    spy = _GridSpy(getattr(module, name))
    monkeypatch.setattr(module, name, spy)
    return spy


def _assert_grids_fit(spy):
    assert spy.launches
    for grid, _ in spy.launches:
        assert all(0 < n <= limit for n, limit in zip(grid, AXIS_LIMITS)), grid


def test_dropout_mask_grid_fits_at_2048_rows_of_32_heads(monkeypatch):
    spy = _spy(monkeypatch, attention_dropout, "_dropout_mask_kernel")
    attention_dropout.dropout_keep_mask(1234, 2048, 32, 1, 0, 1, 0.1, DEVICE)
    _assert_grids_fit(spy)


def test_prompt_gradient_grid_fits_past_65535_tasks(monkeypatch):
    prompt_spy = _spy(monkeypatch, embedding_kernels, "_prompt_grad_kernel")
    sum_spy = _spy(monkeypatch, split_reduce, "_sum_splits_kernel")
    tasks, B, P, d = 70_000, 4, 3, 16
    index = torch.tensor([5, 69_999, 5, 0], device=DEVICE)
    with pretend_target(H100):
        embedding_kernels.prompt_grad(torch.empty(B, P + 2, d, device=DEVICE), index, tasks, P,
                                      torch.float32)
    _assert_grids_fit(prompt_spy)
    _assert_grids_fit(sum_spy)


def test_prefix_gradient_grid_fits_past_65535_tasks(monkeypatch):
    # The old grid put splits x task slots on axis 2: a 70,000-task table passed the limit.
    # (Other grids put B on axis 2; a batch of 65,536 sequences is out of scope.)
    prefix_spy = _spy(monkeypatch, bwd_kernels, "_prefix_dkdv_kernel")
    sum_spy = _spy(monkeypatch, split_reduce, "_sum_splits_kernel")
    _spy(monkeypatch, bwd_kernels, "_delta_kernel")
    B, H, Lq, D, P = 4, 1, 16, 16, 16
    lead = (70_000,)
    index = torch.tensor([3, 69_999, 3, 0], device=DEVICE)
    q = torch.empty(B, H, Lq, D, dtype=torch.float16, device=DEVICE)
    pk = torch.empty(*lead, H, P, D, dtype=torch.float16, device=DEVICE)
    lse = torch.empty(B, H, Lq, device=DEVICE)
    with pretend_target(H100):
        bwd_kernels.prefix_attention_bwd(q, q, q, q, pk, pk, q, lse,
                                         AttentionSpec(prefix_index=index),
                                         needs=(False, False, False, True, True))
    _assert_grids_fit(prefix_spy)
    _assert_grids_fit(sum_spy)


# --------------------------------------------------------------------------------------------
# 2. Per-task prefix gradient: splits and partials for the tasks in use, not the table

ISSUE_SHAPE = dict(B=8, Hq=32, Hkv=8, L=32768, P=128, D=128)      # bf16 on an H100


def _prefix_grad_launch(monkeypatch, lead, index):
    """(grid, bound arguments) of the prefix dK/dV launch at the issue's shape on a pretended
    H100, nothing run (torch.empty: no page of the 2 GiB inputs is touched)."""
    spy = _spy(monkeypatch, bwd_kernels, "_prefix_dkdv_kernel")
    _spy(monkeypatch, split_reduce, "_sum_splits_kernel")
    _spy(monkeypatch, bwd_kernels, "_delta_kernel")
    s = ISSUE_SHAPE
    q = torch.empty(s["B"], s["Hq"], s["L"], s["D"], dtype=torch.bfloat16)
    kv = torch.empty(s["B"], s["Hkv"], s["L"], s["D"], dtype=torch.bfloat16)
    pk = torch.empty(*lead, s["Hkv"], s["P"], s["D"], dtype=torch.bfloat16)
    lse = torch.empty(s["B"], s["Hq"], s["L"])
    with pretend_target(H100):
        bwd_kernels.prefix_attention_bwd(q, q, kv, kv, pk, pk, q, lse,
                                         AttentionSpec(prefix_index=index),
                                         needs=(False, False, False, True, True))
    (launch,) = spy.launches
    monkeypatch.undo()
    return launch


@pytest.mark.parametrize("tasks", [1, 33, 1000])
@pytest.mark.parametrize("rows", ["one_task", "spread"])
def test_task_prefix_gradient_splits_follow_the_batch(monkeypatch, tasks, rows):
    B, Hkv, P, D = (ISSUE_SHAPE[k] for k in ("B", "Hkv", "P", "D"))
    shared_grid, shared = _prefix_grad_launch(monkeypatch, (), None)
    index = torch.zeros(B, dtype=torch.int64) if rows == "one_task" else torch.arange(B) % tasks
    grid, bound = _prefix_grad_launch(monkeypatch, (tasks,), index)
    tiles = -(-P // shared["BLOCK_N"]) * Hkv                 # one prefix's output tiles
    shared_splits = math.prod(shared_grid) // tiles
    most = shared_splits + min(tasks, B) - 1
    # Each program walks as many items as a shared prefix's do, whatever the table's size...
    assert bound["items_per_split"] == shared["items_per_split"]
    # ... the splits are the batch's work cut as for a shared prefix, plus one per other task
    # in use at the most ...
    assert shared_splits <= math.prod(grid) // tiles <= most
    # ... and the fp32 partials hold one tile per split, not per split and task of the table.
    for name in ("PartialK", "PartialV"):
        assert bound[name].numel() <= most * Hkv * P * D


def _task_table_inputs(tasks, index, Lq=21, Lk=30, D=32, P=7, dtype=torch.float32):
    B = index.numel()
    q = torch.randn(B, 4, Lq, D, dtype=dtype, device=DEVICE)
    k, v = (torch.randn(B, 2, Lk, D, dtype=dtype, device=DEVICE) for _ in range(2))
    pk, pv = (torch.randn(tasks, 2, P, D, dtype=dtype, device=DEVICE) for _ in range(2))
    return [t.requires_grad_(True) for t in (q, k, v, pk, pv)], index.to(DEVICE)


def _grads(fn, inputs, index, grad_out):
    out = fn(*inputs, prefix_index=index)
    return torch.autograd.grad(out, inputs, grad_out.to(out.dtype))


@pytest.mark.parametrize("index", [[7, 2, 7], [4, 4, 4], [8, 0, 3]], ids=str)
def test_task_table_larger_than_the_batch_matches_reference(index):
    # 9 tasks, 3 rows: the plan's splits follow the tasks in use; every other task's gradient
    # is exactly zero, and two backward passes give the same bits.
    inputs, index = _task_table_inputs(9, torch.tensor(index))
    grad_out = torch.randn(3, 4, 21, 32, dtype=torch.float64, device=DEVICE)
    got = _grads(fused, inputs, index, grad_out)
    want = _grads(exact, inputs, index, grad_out)
    for name, g, w in zip(("q", "k", "v", "prefix_k", "prefix_v"), got, want):
        assert_close(g, w, torch.float32, "grad", name=f"d{name}")
    unused = [t for t in range(9) if t not in index.tolist()]
    assert not got[3][unused].any() and not got[4][unused].any()
    again = _grads(fused, inputs, index, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(got, again))


def _check_prefix_grads(inputs, index, grad_out):
    """16-bit prefix gradients by FlashAttention's rule: the kernels' error against float64
    at most ~2x the same-precision reference's."""
    got = _grads(fused, inputs, index, grad_out)
    want = _grads(exact, inputs, index, grad_out)
    low = _grads(reference.prefix_attention, inputs, index, grad_out)
    for name, i in (("prefix_k", 3), ("prefix_v", 4)):
        assert_error_within(got[i], low[i], want[i], name=f"d{name}", kind="grad")


@gpu
@pytest.mark.parametrize("tasks", [1, 33, 1000])
def test_gpu_task_table_gradient(tasks):
    index = torch.randint(0, tasks, (8,))
    inputs, index = _task_table_inputs(tasks, index, Lq=300, Lk=300, D=64, P=64,
                                       dtype=torch.bfloat16)
    grad_out = torch.randn(8, 4, 300, 64, dtype=torch.float64, device=DEVICE)
    _check_prefix_grads(inputs, index, grad_out)
    got = _grads(fused, inputs, index, grad_out)
    assert all(torch.equal(a, b) for a, b in zip(got, _grads(fused, inputs, index, grad_out)))


@gpu
def test_gpu_grids_past_65535():
    keep = attention_dropout.dropout_keep_mask(1234, 2048, 32, 2, 3, 29, 0.25, DEVICE)
    # Every (row, head) block written: the last one's keep rate is Bernoulli(0.75) too.
    rates = keep.float().mean(dim=(2, 3)).flatten()
    assert abs(rates.mean().item() - 0.75) < 0.01 and 0.3 < rates[-1].item() < 1.0
    tasks, index = 70_000, torch.tensor([5, 69_999, 5, 0], device=DEVICE)
    grad_out = torch.randn(4, 3 + 2, 16, device=DEVICE)
    grad = embedding_kernels.prompt_grad(grad_out, index, tasks, 3, torch.float32)
    want = torch.zeros_like(grad).index_add_(0, index, grad_out[:, :3])
    assert torch.equal(grad, want)
    inputs, index = _task_table_inputs(tasks, index.cpu(), D=16, P=16, dtype=torch.float16)
    grad_out = torch.randn(4, 4, 21, 16, dtype=torch.float64, device=DEVICE)
    _check_prefix_grads(inputs, index, grad_out)
