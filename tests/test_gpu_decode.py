"""The decode kernel on a GPU (bf16, which the interpreter cannot run, and fp16, with the GPU's
tiles and SM-count split rule): against the reference under FlashAttention's rule, with
caches up to 32k, shared / per-row / per-task prefixes and padding; its keys-major and
row-major tiles on the same inputs; a CUDA graph of a static-cache decoding step.

Every test here needs CUDA (marked `gpu`, skipped without it); the interpreter runs the same
checks at small sizes in tests/test_prefix_attention_decode.py.
"""
import pytest
import torch
from conftest import assert_close, assert_error_within, gpu
from test_prefix_attention import Case, exact, make_inputs
from test_prefix_attention_decode import check_against_reference, decode

import ptuning_fast as pf
from ptuning_fast import reference
from ptuning_fast.kernels import prefix_attention_decode as decode_kernels
from ptuning_fast.kernels.launch import A100, H100, device_target

DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])

# Llama-like decoding shapes: GQA 4:1 and 8:1, MQA, D = 64 / 128, every prefix kind, every
# padding, caches from 1k to 32k (the 32k ones split across many programs), speculative Lq.
DECODE_CASES = [
    Case(4, 32, 8, 1, 4096, 128, 64, "shared", "left"),        # the shape, B = 4
    Case(2, 32, 8, 1, 32768, 128, 16, "task", "left"),         # 32k cache, mixed tasks
    Case(2, 16, 2, 1, 32768, 64, 256, "row", "right"),         # 32k, GQA 8:1, long prefix
    Case(3, 8, 1, 1, 8191, 128, 33, "shared", "random", layout="blhd"),   # MQA, odd lengths
    Case(2, 8, 8, 4, 1027, 64, 0, "none", "left"),             # Lq = 4 at 1:1, no prefix
    Case(2, 32, 8, 4, 2053, 128, 64, "task", "right"),         # speculative: 16 rows, row-major
    Case(2, 8, 2, 1, 1500, 128, 0, "shared", "empty_row"),     # a row with no key: zeros
]


@gpu
@DTYPES
@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
def test_gpu_decode_matches_reference(case, dtype):
    # The prefill kernel's LSE too (against_prefill): the two forward kernels agree on a GPU.
    check_against_reference(case, dtype)


def _decode_error_check(case, dtype, inputs, mask, index):
    """The launcher's output within the rule, and that output (for comparing tiles)."""
    got, _ = decode(case, inputs, mask, index)
    kw = dict(causal=case.causal, attention_mask=mask, prefix_index=index)
    assert_error_within(got, reference.prefix_attention(*inputs, **kw), exact(*inputs, **kw))
    return got


# Packed rows (group x Lq) up to KEYS_MAJOR_ROWS: the planner picks keys-major; with that limit
# set to 0 the same launch takes the row-major tile. Both must compute the reference's function.
KEYS_MAJOR_CASES = [
    Case(2, 32, 8, 1, 4096, 128, 64, "shared", "left"),        # 4 rows: half the 8 columns
    Case(2, 16, 2, 1, 3001, 64, 17, "task", "random"),         # 8 rows: all 8 columns
]


@gpu
@DTYPES
@pytest.mark.parametrize("case", KEYS_MAJOR_CASES, ids=str)
def test_gpu_keys_major_and_row_major_tiles_agree(case, dtype, monkeypatch):
    inputs, mask, index = make_inputs(case, dtype, requires_grad=False)
    target = device_target(inputs[0].device)

    def plan():
        return decode_kernels.decode_plan(case.B, case.Hq, case.Hkv, case.Lq, case.Lk, case.P,
                                          case.D, dtype, target)

    assert plan().keys_major
    keys_major = _decode_error_check(case, dtype, inputs, mask, index)
    monkeypatch.setattr(decode_kernels, "KEYS_MAJOR_ROWS", 0)
    assert not plan().keys_major and plan().block_m >= decode_kernels.MIN_ROWS
    row_major = _decode_error_check(case, dtype, inputs, mask, index)
    # Different tiles sum in a different order: close, not necessarily bitwise equal.
    assert_close(row_major, keys_major, dtype, name="row-major vs keys-major")


@gpu
@DTYPES
def test_gpu_decode_step_in_a_cuda_graph(dtype):
    """A static-cache decoding loop as transformers' compiled decoding runs it: the K/V buffer,
    the mask of written slots and the query live at fixed addresses; one step's attention is
    captured once and replayed after each in-place write. Replays equal eager calls bitwise
    (the decode kernel has no timed choice: the same launch) and the reference by the rule."""
    B, Hq, Hkv, D, P, L, steps = 3, 32, 8, 128, 64, 1024, 4
    case = Case(B, Hq, Hkv, 1, L, D, P, "task", "left")
    (q, k, v, pk, pv), mask, index = make_inputs(case, dtype, requires_grad=False)
    mask = mask.clone()
    written = L - steps                                 # the prompt filled the first slots
    mask[:, written:] = False

    def step():
        return pf.prefix_attention(q, k, v, pk, pv, attention_mask=mask, prefix_index=index,
                                   backend="triton")

    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):                   # warm-up: compiles, outside the graph
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        for t in range(written, L):
            q.copy_(torch.randn_like(q))
            k[:, :, t].copy_(torch.randn_like(k[:, :, t]))
            v[:, :, t].copy_(torch.randn_like(v[:, :, t]))
            mask[:, t] = True
            graph.replay()
            eager = step()
            assert torch.equal(captured, eager), f"step {t}: replay != eager"
            kw = dict(attention_mask=mask, prefix_index=index)
            assert_error_within(captured, reference.prefix_attention(q, k, v, pk, pv, **kw),
                                exact(q, k, v, pk, pv, **kw), name=f"step {t}")



# --------------------------------------------- the GPU cases, checked here before a GPU runs them
@pytest.mark.parametrize("target", [H100, A100], ids=["H100", "A100"])
def test_gpu_decode_cases_take_the_tiles_they_name(target):
    """The decode cases reach the decode kernel (few queries), the 32k caches split across
    programs, and the keys-major cases are keys-major on the GPUs the sessions are lent, so the
    keys-major test's flip to row-major compares two tiles."""
    for case in DECODE_CASES + KEYS_MAJOR_CASES:
        assert decode_kernels.supports(case.Lq), case
        plan = decode_kernels.decode_plan(case.B, case.Hq, case.Hkv, case.Lq, case.Lk, case.P,
                                          case.D, torch.bfloat16, target)
        if case.Lk >= 32768:
            assert plan.num_splits > 1, case
        if case in KEYS_MAJOR_CASES:
            assert plan.keys_major, case
    assert any(not decode_kernels.decode_plan(c.B, c.Hq, c.Hkv, c.Lq, c.Lk, c.P, c.D,
                                              torch.bfloat16, target).keys_major
               for c in DECODE_CASES), "a row-major decode case"
