"""The prefill kernels on a GPU, where only they run: every attention term in bf16 (forward and
every gradient under FlashAttention's rule, ptuning_fast/error_bound.py) with the GPU's own
tiles; the TMA forward against pointer loads (bitwise); the autotuner's pick per key against the
fixed tile; bitwise-repeatable backward passes; fp32 under "highest" to IEEE fp32's tolerance.

Every test here needs CUDA (marked `gpu`, skipped without it); the interpreter runs the same
checks at small sizes in tests/test_prefix_attention{,_terms}.py.
"""
import pytest
import torch
import triton
from conftest import FP32_IEEE, assert_error_within, gpu, tolerance
from test_prefix_attention import (NAMES, Case, check_against_reference, exact, fused,
                                   make_inputs, run)
from test_prefix_attention_terms import make_terms

from ptuning_fast import reference
from ptuning_fast.kernels import attention_inputs, autotune, tiles
from ptuning_fast.kernels import prefix_attention_fwd as fwd_kernels
from ptuning_fast.kernels.attention_options import AttentionSpec
from ptuning_fast.kernels.launch import device_target

BF16 = torch.bfloat16

# Lengths across the GPU tiles' 128-query and 64-key blocks (and not multiples of them), GQA,
# D = 64 and 128, every prefix kind and padding. Specs as in make_terms: b = bias, w = window,
# W = window with the prefix always visible, c = softcap, s = sinks, p / u = packed sequences
# as position ids / cu_seqlens.
GPU_TERM_CASES = [
    (Case(2, 8, 2, 300, 300, 128, 64, "shared", "right"), "b"),
    (Case(2, 8, 2, 257, 400, 128, 16, "task", "left"), "w"),
    (Case(2, 8, 2, 300, 300, 64, 100, "row", "random"), "W"),
    (Case(2, 4, 4, 200, 200, 128, 33, "shared", "none", False), "w"),     # two-sided window
    (Case(2, 8, 2, 190, 333, 128, 64, "task", "right"), "c"),
    (Case(2, 8, 8, 129, 257, 64, 0, "none", "empty_row"), "s"),
    (Case(2, 8, 2, 300, 300, 128, 64, "shared", "right"), "p"),
    (Case(2, 8, 1, 277, 277, 64, 17, "task", "none", False), "u"),
    (Case(2, 8, 2, 384, 384, 128, 64, "shared", "left"), "bwcsp"),        # every term at once
    (Case(1, 8, 2, 500, 500, 64, 200, "row", "none"), "wp"),              # P > window, packed
]


@gpu
@pytest.mark.parametrize("case, spec", GPU_TERM_CASES, ids=[f"{c}-{s}" for c, s in GPU_TERM_CASES])
def test_gpu_terms_match_reference_bf16(case, spec):
    check_against_reference(case, BF16, **make_terms(case, spec, BF16))


@gpu
@pytest.mark.parametrize("spec", ["", "bwcsp"], ids=["plain", "terms"])
def test_gpu_backward_is_bitwise_deterministic(spec):
    """Two backward passes on the same inputs: the same bits (no atomics in any reduction, the
    autotuner's pick kept for the key after the first call)."""
    case = Case(2, 8, 2, 300, 300, 128, 64, "task", "right")
    inputs, mask, index = make_inputs(case, BF16)
    terms = make_terms(case, spec, BF16)
    grad_out = torch.randn(case.B, case.Hq, case.Lq, case.D, device=inputs[0].device)
    first_out, first = run(fused, inputs, mask, index, case, grad_out, **terms)
    second_out, second = run(fused, inputs, mask, index, case, grad_out, **terms)
    assert torch.equal(first_out, second_out)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"d{name} differs between two backward passes"


# ------------------------------------------------------------------------------------- TMA
def _hopper():
    major, _ = torch.cuda.get_device_capability()
    if major < 9:
        pytest.skip("TMA (tensor descriptors) needs sm_90 or newer")


@gpu
@pytest.mark.parametrize("dtype", [BF16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [
    Case(2, 8, 2, 300, 1000, 128, 64, "shared", "left", layout="blhd"),
    Case(2, 8, 2, 257, 257, 64, 19, "task", "right"),
    Case(2, 4, 1, 130, 700, 128, 256, "row", "random", False),
], ids=str)
def test_gpu_tma_forward_equals_pointer_loads(case, dtype, monkeypatch):
    """The TMA candidate (sm_90's default where the strides allow descriptors) reads the same
    K/V tiles through tensor descriptors (their bounds give the zeros of masked loads): bit for
    bit the pointer path's output and LSE at the same tile."""
    _hopper()
    (q, k, v, pk, pv), mask, index = make_inputs(case, dtype, requires_grad=False)
    assert fwd_kernels.tma_ready(pk, pv, k, v)
    target = device_target(q.device)
    with_tma = [c for c in tiles.candidates("fwd", target.arch, dtype, case.D, tma=True)
                if c.tma]
    assert with_tma, "no TMA candidate at this head dim"
    spec = AttentionSpec(attention_mask=mask, prefix_index=index, causal=case.causal)
    outs = {}
    for tma in (False, True):
        cfg = tiles.TileConfig(with_tma[0].block_m, with_tma[0].block_n, with_tma[0].num_warps,
                               with_tma[0].num_stages, tma=tma)
        outs[tma] = fwd_kernels.prefix_attention_fwd(q, k, v, pk, pv, spec, config=cfg)
    assert torch.equal(outs[True][0], outs[False][0]), "output: TMA != pointer loads"
    assert torch.equal(outs[True][1], outs[False][1]), "LSE: TMA != pointer loads"
    kw = dict(causal=case.causal, attention_mask=mask, prefix_index=index)
    assert_error_within(outs[True][0], reference.prefix_attention(q, k, v, pk, pv, **kw),
                        exact(q, k, v, pk, pv, **kw))


# -------------------------------------------------------------------------------- autotune
def _timed_launches(monkeypatch):
    """Counts the autotuner's timings (each times one candidate with do_bench)."""
    count = []
    real = triton.testing.do_bench
    monkeypatch.setattr(triton.testing, "do_bench",
                        lambda fn, *a, **kw: count.append(1) or real(fn, *a, **kw))
    return count


@gpu
@pytest.mark.parametrize("D, tma", [(128, False), (64, False), (128, True)],
                         ids=["D128", "D64", "D128-tma"])
def test_gpu_autotune_pick_per_key_equals_fixed_tile(D, tma, monkeypatch):
    """The first call of a key times every candidate of each kernel that has several and
    records the fastest under that key; the next call with the key times nothing; another
    length bucket is a new key. The tuned forward and gradients compute the fixed tile's
    function: both within the rule against float64."""
    if tma:
        _hopper()
    else:
        monkeypatch.setenv("PTUNING_FAST_TMA", "0")      # pointer loads only
    monkeypatch.delenv("PTUNING_FAST_AUTOTUNE", raising=False)
    monkeypatch.setattr(autotune, "_BEST", {})
    timed = _timed_launches(monkeypatch)
    case = Case(2, 8, 2, 600, 600, D, 64, "task", "right")
    inputs, mask, index = make_inputs(case, BF16)
    device = inputs[0].device
    grad_out = torch.randn(case.B, case.Hq, case.Lq, D, device=device)
    tuned, tuned_grads = run(fused, inputs, mask, index, case, grad_out)
    arch = device_target(device).arch
    def candidates(kernel):          # the forward's inputs allow descriptors (TMA on or off)
        return tiles.candidates(kernel, arch, BF16, D, tma=kernel == "fwd")

    several = {k for k in ("fwd", "dq", "dkdv") if len(candidates(k)) > 1}
    picked = {key[0]: cfg for key, cfg in autotune._BEST.items()}
    assert set(picked) == several, f"recorded {sorted(picked)}, timed kernels {sorted(several)}"
    assert len(autotune._BEST) == len(several)           # one key per kernel for this call
    for kernel, cfg in picked.items():
        assert cfg in candidates(kernel), (kernel, cfg)
    assert len(timed) == sum(len(candidates(k)) for k in several)

    before = len(timed)
    again, again_grads = run(fused, inputs, mask, index, case, grad_out)
    assert len(timed) == before, "a recorded key was timed again"
    assert torch.equal(again, tuned) and all(torch.equal(a, b)
                                             for a, b in zip(again_grads, tuned_grads))
    shorter = Case(2, 8, 2, 200, 200, D, 64, "task", "right")
    s_inputs, s_mask, s_index = make_inputs(shorter, BF16)
    run(fused, s_inputs, s_mask, s_index, shorter,
        torch.randn(2, 8, 200, D, device=device))
    assert len(autotune._BEST) == 2 * len(several), "another length bucket is another key"

    monkeypatch.setenv("PTUNING_FAST_AUTOTUNE", "0")
    fixed, fixed_grads = run(fused, inputs, mask, index, case, grad_out)
    ref, ref_grads = run(exact, inputs, mask, index, case, grad_out)
    low, low_grads = run(reference.prefix_attention, inputs, mask, index, case, grad_out)
    for label, out in (("tuned", tuned), ("fixed", fixed)):
        assert_error_within(out, low, ref, name=f"{label} output")
    for name, t, g, f, want, lg in zip(NAMES, inputs, tuned_grads, fixed_grads, ref_grads,
                                       low_grads):
        for label, grad in (("tuned", g), ("fixed", f)):
            assert_error_within(grad, lg, want, name=f"{label} d{name}", kind="grad")


# ------------------------------------------------------------------------- fp32, "highest"
@gpu
def test_gpu_fp32_highest_meets_ieee_tolerance():
    """Under torch.set_float32_matmul_precision("highest") the kernels compile IEEE fp32 dots:
    the tolerance table's fp32 row is IEEE fp32's (the interpreter's), not tf32's, and every
    output and gradient meets it at GPU tile sizes."""
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert attention_inputs.input_precision(torch.float32) == "ieee"
        assert tolerance(torch.float32) == FP32_IEEE["fwd"]
        assert tolerance(torch.float32, "grad") == FP32_IEEE["grad"]
        check_against_reference(Case(2, 8, 2, 300, 333, 128, 64, "task", "left"), torch.float32)
        with_terms = Case(2, 4, 4, 200, 200, 64, 17, "shared", "right", False)
        check_against_reference(with_terms, torch.float32,
                                **make_terms(with_terms, "bcs", torch.float32))
    finally:
        torch.set_float32_matmul_precision(previous)


# --------------------------------------------- the GPU cases, checked here before a GPU runs them
@pytest.mark.parametrize("case, spec", GPU_TERM_CASES, ids=[f"{c}-{s}" for c, s in GPU_TERM_CASES])
def test_gpu_term_cases_are_valid_inputs(case, spec):
    """Every GPU term case is an input the reference accepts and computes (finite): a malformed
    case (packing with Lq != Lk, a bias of the wrong width) fails here, not in GPU minutes."""
    (q, k, v, pk, pv), mask, index = make_inputs(case, torch.float32, requires_grad=False)
    out = reference.prefix_attention(q, k, v, pk, pv, causal=case.causal, attention_mask=mask,
                                     prefix_index=index, **make_terms(case, spec, torch.float32))
    assert out.shape == q.shape and torch.isfinite(out).all()
