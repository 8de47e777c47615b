"""Attention-probability dropout in prefix attention: the fused kernels against the reference
fed the kernels' own keep-mask (FlashAttention's test approach), forward and all five
gradients; the mask's statistics, its independence from tile sizes, reproducibility, and
argument checks.
"""
import math

import pytest
import torch
from conftest import DEVICE, assert_close, assert_error_within, gpu
from test_prefix_attention import NAMES, Case, exact, fused, make_inputs, run

import ptuning_fast as pf
from ptuning_fast import reference
from ptuning_fast.dropout_seeds import reference_dropout_mask
from ptuning_fast.kernels import prefix_attention_fwd as fwd_kernels
from ptuning_fast.kernels import tiles
from ptuning_fast.kernels.attention_dropout import dropout_keep_mask
from ptuning_fast.kernels.attention_options import AttentionSpec
from ptuning_fast.kernels.tiles import TileConfig

SEED = 0x5EED_1234_ABCD


def kernel_mask(case, p, seed=SEED):
    return dropout_keep_mask(seed, case.B, case.Hq, case.Lq, case.P, case.Lk, p, DEVICE)


def check_dropout_against_reference(case, dtype, p=0.25, seed=SEED):
    """Fused with dropout vs the reference applying `dropout_keep_mask`'s mask for the same seed:
    fp32 through the tolerance table, fp16 through FlashAttention's error rule."""
    inputs, mask, index = make_inputs(case, dtype)
    keep = kernel_mask(case, p, seed)
    grad_out = torch.randn(case.B, case.Hq, case.Lq, case.D, dtype=torch.float64, device=DEVICE)
    out, grads = run(fused, inputs, mask, index, case, grad_out, dropout_p=p, dropout_seed=seed)
    ref, ref_grads = run(exact, inputs, mask, index, case, grad_out, dropout_p=p,
                         dropout_mask=keep)
    if dtype == torch.float32:
        assert_close(out, ref, dtype, "fwd")
    else:
        low, low_grads = run(reference.prefix_attention, inputs, mask, index, case, grad_out,
                             dropout_p=p, dropout_mask=keep)
        assert_error_within(out, low, ref)
    for name, t, g, want in zip(NAMES, inputs, grads, ref_grads):
        if t is None or t.numel() == 0:
            continue
        want = torch.zeros_like(t, dtype=torch.float64) if want is None else want
        assert g is not None and g.shape == t.shape and g.dtype == t.dtype, name
        if dtype == torch.float32:
            assert_close(g, want, dtype, "grad", name=f"d{name}")
        else:
            low_g = low_grads[NAMES.index(name)]
            low_g = torch.zeros_like(t) if low_g is None else low_g
            assert_error_within(g, low_g, want, name=f"d{name}", kind="grad")
    return out


CASES = [
    Case(2, 4, 2, 37, 53, 64, 37),                                    # odd P, GQA 2:1, Lq < Lk
    Case(2, 2, 2, 23, 23, 32, 0, "none", "left"),                     # P = 0, left padding
    Case(2, 4, 4, 21, 30, 48, 40, "task", "random", False, "blhd"),   # P > blocks, not causal
    Case(2, 4, 1, 1, 30, 32, 5, "row", "right"),                      # decode step, MQA
    Case(2, 2, 1, 19, 13, 32, 0, "shared", "empty_row"),              # Lq > Lk, a row sees nothing
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference_with_kernel_mask(case, dtype):
    out = check_dropout_against_reference(case, dtype)
    if case.mask == "empty_row":                     # nothing visible: zeros, not NaN
        assert torch.equal(out[0], torch.zeros_like(out[0]))


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [
    Case(2, 8, 2, 300, 300, 128, 64, "shared", "left"),
    Case(2, 4, 4, 200, 260, 64, 130, "task", "random", False, "blhd"),
], ids=str)
def test_gpu_matches_reference_with_kernel_mask(case, dtype):
    # GPU tiles (BLOCK_M up to 128) and bf16, which the interpreter cannot run.
    check_dropout_against_reference(case, dtype, p=0.1)


def test_reference_backend_draws_the_kernels_mask():
    # Under the interpreter backend="reference" materializes the kernels' mask for the seed.
    case = Case(2, 4, 2, 17, 21, 32, 6, "shared", "right")
    inputs, mask, _ = make_inputs(case, torch.float32, requires_grad=False)
    kw = dict(attention_mask=mask, dropout_p=0.3, dropout_seed=77)
    torch.testing.assert_close(pf.prefix_attention(*inputs, backend="reference", **kw),
                               fused(*inputs, **kw), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU fallback without the interpreter")
def test_reference_backend_without_mask_kernel_uses_bernoulli(monkeypatch):
    # Plain CPU (no interpreter): torch.bernoulli from a generator seeded with the seed, so a
    # seed still reproduces the run, but the mask differs from the kernels' (documented).
    from ptuning_fast.fused import support
    monkeypatch.setattr(support, "interpreting", lambda: False)
    case = Case(2, 4, 2, 17, 21, 32, 6, "shared", "right")
    inputs, mask, _ = make_inputs(case, torch.float32, requires_grad=False)
    kw = dict(attention_mask=mask, dropout_p=0.3, dropout_seed=77, backend="reference")
    first = pf.prefix_attention(*inputs, **kw)
    assert torch.equal(first, pf.prefix_attention(*inputs, **kw))
    keep = reference_dropout_mask(torch.tensor(77), (64, 8, 64, 32), 16, 48, 0.3)
    assert keep.dtype == torch.bool and abs(keep.float().mean().item() - 0.7) < 0.01
    assert not torch.equal(keep[:2, :4, :17, :27], kernel_mask(case, 0.3, 77))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_rate_and_independence(p):
    # n Bernoulli(1 - p) draws: the kept share lies within 6 standard deviations of 1 - p
    # (a false alarm has probability ~2e-9); so do the shares in the prefix and sequence
    # columns, and the agreement of neighbouring rows, heads and batch rows with the value
    # independent draws give, p^2 + (1 - p)^2 (a shared random stream would agree everywhere).
    B, Hq, Lq, P, Lk = 2, 4, 96, 20, 180
    keep = dropout_keep_mask(SEED, B, Hq, Lq, P, Lk, p, DEVICE).cpu()
    assert keep.shape == (B, Hq, Lq, P + Lk) and keep.dtype == torch.bool

    def within(values, expected):
        n = values.numel()
        sigma = math.sqrt(expected * (1 - expected) / n)
        share = values.float().mean().item()
        assert abs(share - expected) <= 6 * sigma, (share, expected, n)

    within(keep, 1 - p)
    within(keep[..., :P], 1 - p)
    within(keep[..., P:], 1 - p)
    agree = p * p + (1 - p) ** 2
    within(keep[:, :, 1:] == keep[:, :, :-1], agree)          # neighbouring queries
    within(keep[..., 1:] == keep[..., :-1], agree)            # neighbouring key columns
    within(keep[:, 1:] == keep[:, :-1], agree)                # neighbouring heads
    within(keep[1:] == keep[:-1], agree)                      # batch rows
    other = dropout_keep_mask(SEED + 1, B, Hq, Lq, P, Lk, p, DEVICE).cpu()
    within(keep == other, agree)                              # another seed


def _dropped_probabilities(config, p):
    """Forward through the launcher with tile `config` and identity values: output column c is
    then probability c (kept and scaled, or exactly 0 when dropped)."""
    B, Hq, Hkv, Lq, P, Lk, D = 2, 2, 1, 40, 19, 37, 64
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    q = torch.randn(B, Hq, Lq, D, device=DEVICE, generator=gen) * 0.1
    k = torch.randn(B, Hkv, Lk, D, device=DEVICE, generator=gen)
    pk = torch.randn(Hkv, P, D, device=DEVICE, generator=gen)
    eye = torch.eye(P + Lk, D, device=DEVICE)
    pv, v = eye[:P].unsqueeze(0), eye[P:].expand(B, Hkv, Lk, D)
    seed = torch.tensor(SEED, dtype=torch.int64, device=DEVICE)
    spec = AttentionSpec(causal=False, dropout_p=p, dropout_seed=seed)
    out, _ = fwd_kernels.prefix_attention_fwd(q, k, v, pk, pv, spec, config=config)
    return out[..., :P + Lk], (B, Hq, Lq, P, Lk)


def test_mask_does_not_depend_on_tile_sizes(monkeypatch):
    p = 0.4
    first, shape = _dropped_probabilities(TileConfig(32, 16, 4, 1), p)
    second, _ = _dropped_probabilities(TileConfig(16, 64, 4, 1), p)
    keep = dropout_keep_mask(SEED, *shape, p, DEVICE)
    # Every probability is > 0 (no causal or padding mask, small scores): nonzero iff kept.
    assert torch.equal(first != 0, keep) and torch.equal(second != 0, keep)
    torch.testing.assert_close(first, second, atol=1e-6, rtol=1e-5)
    # The backward kernels regenerate the same mask with other tiles too.
    case = Case(2, 4, 2, 29, 35, 32, 21, "shared", "random")
    monkeypatch.setitem(tiles.INTERPRETER, "dq", TileConfig(16, 32, 4, 1))
    monkeypatch.setitem(tiles.INTERPRETER, "dkdv", TileConfig(32, 16, 4, 1))
    check_dropout_against_reference(case, torch.float32, p=0.3)


def test_same_seed_is_bitwise_reproducible():
    case = Case(2, 4, 2, 25, 31, 32, 7, "task", "right")
    inputs, mask, index = make_inputs(case, torch.float16)
    grad_out = torch.randn(2, 4, 25, 32, device=DEVICE)
    kw = dict(dropout_p=0.2, dropout_seed=123)
    out1, grads1 = run(fused, inputs, mask, index, case, grad_out, **kw)
    out2, grads2 = run(fused, inputs, mask, index, case, grad_out, **kw)
    assert torch.equal(out1, out2)
    for name, a, b in zip(NAMES, grads1, grads2):
        assert torch.equal(a, b), name
    other, _ = run(fused, inputs, mask, index, case, grad_out, dropout_p=0.2, dropout_seed=124)
    assert not torch.equal(out1, other)
    # No seed: drawn from torch's generator, so torch.manual_seed reproduces the run.
    torch.manual_seed(5)
    drawn1, _ = run(fused, inputs, mask, index, case, grad_out, dropout_p=0.2)
    torch.manual_seed(5)
    drawn2, _ = run(fused, inputs, mask, index, case, grad_out, dropout_p=0.2)
    assert torch.equal(drawn1, drawn2) and not torch.equal(drawn1, out1)


def test_zero_dropout_is_the_dropout_free_call():
    case = Case(2, 4, 2, 19, 23, 32, 5, "shared", "left")
    inputs, mask, index = make_inputs(case, torch.float32)
    grad_out = torch.randn(2, 4, 19, 32, device=DEVICE)
    plain, plain_grads = run(fused, inputs, mask, index, case, grad_out)
    state = torch.get_rng_state()
    zero, zero_grads = run(fused, inputs, mask, index, case, grad_out, dropout_p=0.0)
    assert torch.equal(state, torch.get_rng_state())          # no seed drawn
    seeded, _ = run(fused, inputs, mask, index, case, grad_out, dropout_p=0, dropout_seed=9)
    assert torch.equal(plain, zero) and torch.equal(plain, seeded)
    for name, a, b in zip(NAMES, plain_grads, zero_grads):
        assert torch.equal(a, b), name


def test_torch_compile_fullgraph_with_dropout():
    case = Case(2, 4, 2, 13, 17, 32, 5, "task", "right")
    inputs, mask, index = make_inputs(case, torch.float32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss_fn(q, k, v, pk, pv, mask, index):
        out = pf.prefix_attention(q, k, v, pk, pv, attention_mask=mask, prefix_index=index,
                                  backend="triton", dropout_p=0.2, dropout_seed=11)
        return out.square().sum()

    compiled = torch.autograd.grad(loss_fn(*inputs, mask, index), inputs)
    eager = torch.autograd.grad(
        fused(*inputs, attention_mask=mask, prefix_index=index, dropout_p=0.2,
              dropout_seed=11).square().sum(), inputs)
    for name, a, b in zip(NAMES, compiled, eager):
        assert torch.equal(a, b), name

    # No seed: drawn inside the graph (a tensor, no .item()), so fullgraph still traces.
    @torch.compile(fullgraph=True, backend="aot_eager")
    def drawn(q, k, v, pk, pv):
        return pf.prefix_attention(q, k, v, pk, pv, attention_mask=mask, prefix_index=index,
                                   backend="triton", dropout_p=0.2)

    torch.manual_seed(3)
    first = drawn(*inputs)
    torch.manual_seed(3)
    assert torch.equal(first, drawn(*inputs))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_bad_dropout_arguments_name_the_argument(backend):
    q = torch.randn(1, 2, 4, 32, device=DEVICE)
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="dropout_p"):
            pf.prefix_attention(q, q, q, backend=backend, dropout_p=bad)
    with pytest.raises(TypeError, match="dropout_p"):
        pf.prefix_attention(q, q, q, backend=backend, dropout_p="0.1")
    with pytest.raises(TypeError, match="dropout_seed"):
        pf.prefix_attention(q, q, q, backend=backend, dropout_p=0.1, dropout_seed=1.5)


def test_reference_needs_an_explicit_mask():
    q = torch.randn(1, 2, 4, 32, device=DEVICE)
    pk = torch.randn(2, 3, 32, device=DEVICE)
    with pytest.raises(ValueError, match="dropout_mask"):
        reference.prefix_attention(q, q, q, dropout_p=0.1)
    with pytest.raises(ValueError, match="dropout_mask"):          # misses the prefix columns
        reference.prefix_attention(q, q, q, pk, pk, dropout_p=0.1,
                                   dropout_mask=torch.ones(1, 2, 4, 4, dtype=torch.bool))
    keep = torch.rand(1, 2, 4, 7, device=DEVICE) > 0.5
    got = reference.prefix_attention(q, q, q, pk, pk, dropout_p=0.5, dropout_mask=keep)
    plain = reference.prefix_attention(q, q, q, pk, pk, dropout_p=0.5,
                                       dropout_mask=torch.ones_like(keep))
    assert not torch.equal(got, plain)
    torch.testing.assert_close(plain, 2 * reference.prefix_attention(q, q, q, pk, pk))
