"""Attention terms beside the prefix — additive bias, sliding window, soft-capping, sinks,
packed sequences — in the Triton kernels against the reference: forward and every gradient,
each term alone and combined, with GQA, padding, per-row and per-task prefixes, dropout;
packed rows against the same sequences run one per row; blocks outside a window never read;
bad arguments named."""
import pytest
import torch
from conftest import DEVICE, HAS_CUDA, assert_close
from test_prefix_attention import (NAMES, Case, check_against_reference, exact, fused,
                                   make_inputs, run)

import ptuning_fast as pf
from ptuning_fast import reference
from ptuning_fast.kernels.launch import Target, pretend_target
from ptuning_fast.kernels.attention_dropout import dropout_keep_mask


def make_terms(case, spec, dtype):
    """Keyword arguments of the terms named in `spec` (a string of letters: b = bias,
    w = window, W = window with the prefix always visible, c = softcap, s = sinks,
    p = packed as position ids, u = packed as cu_seqlens), on fresh random data."""
    P = case.P if case.prefix != "none" else 0
    terms = {}
    if "b" in spec:                               # per-row bias shared by the heads (T5: per
        terms["bias"] = torch.randn(case.B, 1, case.Lq, P + case.Lk, dtype=dtype,   # head)
                                    device=DEVICE)
    if "w" in spec or "W" in spec:
        terms["window_size"] = (7, -1) if case.causal else (5, 6)
        terms["prefix_in_window"] = "W" not in spec
    if "c" in spec:
        terms["softcap"] = 2.5                    # small: most logits land on tanh's bend
    if "s" in spec:
        terms["sinks"] = torch.randn(case.Hq, device=DEVICE)
    if "p" in spec or "u" in spec:
        lengths = _packed_lengths(case.Lk)
        if "p" in spec:
            row = torch.cat([torch.arange(n) for n in lengths])
            terms["position_ids"] = row.expand(case.B, -1).to(DEVICE)
        else:
            starts = torch.tensor([0] + lengths).cumsum(0)[:-1]
            flat = torch.cat([starts + b * case.Lk for b in range(case.B)]
                             + [torch.tensor([case.B * case.Lk])])
            terms["cu_seqlens"] = flat.to(torch.int32).to(DEVICE)
    return terms


def _packed_lengths(L):
    """Sequence lengths of one packed row of length L: uneven, one of length 1."""
    cuts = sorted({1, L // 3, L // 3 + 1, (2 * L) // 3} - {0, L})
    bounds = [0, *cuts, L]
    return [b - a for a, b in zip(bounds, bounds[1:]) if b > a]


TERM_CASES = [
    # (case, terms): odd lengths, GQA, padding, every prefix kind, Lq != Lk where allowed.
    (Case(2, 4, 2, 37, 53, 32, 5, "shared", "right"), "b"),
    (Case(2, 4, 1, 29, 29, 64, 13, "task", "left"), "w"),
    (Case(2, 4, 2, 21, 40, 32, 17, "row", "random"), "W"),
    (Case(2, 2, 2, 33, 33, 48, 7, "shared", "none", False), "w"),       # two-sided window
    (Case(2, 4, 2, 30, 45, 32, 9, "task", "right"), "c"),
    (Case(2, 4, 4, 19, 27, 32, 0, "none", "empty_row"), "s"),           # sinks, no prefix
    (Case(2, 4, 2, 35, 35, 32, 6, "shared", "right"), "p"),
    (Case(2, 4, 1, 34, 34, 32, 3, "task", "none", False), "u"),          # packed, not causal
    (Case(2, 4, 2, 41, 41, 64, 11, "shared", "left"), "bwcsp"),          # everything at once
    (Case(1, 2, 2, 50, 50, 32, 40, "row", "none"), "wp"),                # P > window, packed
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case, spec", TERM_CASES, ids=[f"{c}-{s}" for c, s in TERM_CASES])
def test_terms_match_reference(case, spec, dtype):
    check_against_reference(case, dtype, **make_terms(case, spec, dtype))


@pytest.mark.skipif(HAS_CUDA, reason="interpreter check of the GPU tiles; the GPU runs them")
@pytest.mark.parametrize("arch, dtype, D", [(90, torch.float16, 64), (90, torch.float32, 80),
                                            (80, torch.float16, 128)])
def test_terms_gpu_tiles_under_interpreter(arch, dtype, D):
    """Launches with terms take their own tiles (tiles.terms_tile: 128-row query blocks, a
    shorter key block): every term at once through the tiles and splits a GPU of that arch
    gets."""
    case = Case(1, 2, 1, 75, 75, D, 21, "shared", "left")
    with pretend_target(Target(arch, 132 if arch == 90 else 108)):
        check_against_reference(case, dtype, **make_terms(case, "bwcsp", dtype))


@pytest.mark.parametrize("spec", ["w", "bcs"])
def test_terms_decode_step(spec):
    """Few queries without gradients would take the decode kernel, which computes no terms:
    such calls must run the prefill kernel and still match."""
    case = Case(2, 8, 2, 1, 45, 32, 6, "shared", "right")
    (q, k, v, pk, pv), mask, _ = make_inputs(case, torch.float32, requires_grad=False)
    terms = make_terms(case, spec, torch.float32)
    with torch.no_grad():
        got = fused(q, k, v, pk, pv, attention_mask=mask, **terms)
    assert_close(got, exact(q, k, v, pk, pv, attention_mask=mask, **terms), torch.float32)


def test_terms_with_dropout():
    case = Case(2, 4, 2, 23, 23, 32, 5, "task", "right")
    inputs, mask, index = make_inputs(case, torch.float32)
    terms = make_terms(case, "bwcsp", torch.float32)
    p, seed = 0.25, 1234
    keep = dropout_keep_mask(seed, case.B, case.Hq, case.Lq, case.P, case.Lk, p, DEVICE)
    grad_out = torch.randn(case.B, case.Hq, case.Lq, case.D, dtype=torch.float64, device=DEVICE)
    out, grads = run(fused, inputs, mask, index, case, grad_out, dropout_p=p, dropout_seed=seed,
                     **terms)
    ref, ref_grads = run(exact, inputs, mask, index, case, grad_out, dropout_p=p,
                         dropout_mask=keep, **terms)
    assert_close(out, ref, torch.float32)
    for name, g, want in zip(NAMES, grads, ref_grads):
        assert_close(g, want, torch.float32, "grad", name=f"d{name}")


@pytest.mark.parametrize("form", ["position_ids", "cu_seqlens"])
@pytest.mark.parametrize("window", [False, True])
def test_packed_rows_equal_separate_rows(form, window):
    """Correct for packing means: the same as running each sequence as its own row, each
    seeing the (task's) prefix from position 0 — outputs and summed prefix gradients."""
    torch.manual_seed(0)
    Hq, Hkv, D, P, lengths = 4, 2, 32, 6, [9, 1, 17, 5]
    L = sum(lengths)
    q = torch.randn(1, Hq, L, D, device=DEVICE)
    k, v = (torch.randn(1, Hkv, L, D, device=DEVICE) for _ in range(2))
    pk, pv = (torch.randn(Hkv, P, D, device=DEVICE, requires_grad=True) for _ in range(2))
    terms = dict(window_size=(4, -1)) if window else {}
    if form == "position_ids":
        packing = dict(position_ids=torch.cat([torch.arange(n) for n in lengths])[None])
    else:
        packing = dict(cu_seqlens=torch.tensor([0, *lengths]).cumsum(0).to(DEVICE))
    packed = fused(q, k, v, pk, pv, **packing, **terms)
    grad_out = torch.randn_like(packed)
    packed_grads = torch.autograd.grad(packed, (pk, pv), grad_out)
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    pieces, sep_grads = [], [torch.zeros_like(pk), torch.zeros_like(pv)]
    for a, b in zip(starts, starts[1:]):
        out = fused(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], pk, pv, **terms)
        for acc, g in zip(sep_grads, torch.autograd.grad(out, (pk, pv), grad_out[:, :, a:b])):
            acc += g
        pieces.append(out)
    assert_close(packed, torch.cat(pieces, dim=2), torch.float32)
    for got, want in zip(packed_grads, sep_grads):
        assert_close(got, want, torch.float32, "grad")


def test_blocks_outside_the_window_are_never_read():
    """Keys (and a prefix) that no query's window reaches are NaN: a kernel that loaded and
    multiplied them would spread NaN (0 * NaN) into the output and the gradients."""
    torch.manual_seed(0)
    B, Hq, Hkv, Lq, Lk, D, P, left = 2, 4, 2, 20, 200, 32, 9, 19
    q = torch.randn(B, Hq, Lq, D, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(B, Hkv, Lk, D, device=DEVICE) for _ in range(2))
    pk, pv = (torch.full((Hkv, P, D), float("nan"), device=DEVICE) for _ in range(2))
    # The first query (i = 0 at key 180) sees keys >= 161; blocks of 16 keys below 144 (and
    # the whole prefix, at -P..-1) lie outside every window.
    hidden = 144
    clean_k, clean_v = k.clone(), v.clone()
    k[:, :, :hidden] = float("nan")
    v[:, :, :hidden] = float("nan")
    k.requires_grad_(True)
    v.requires_grad_(True)
    out = fused(q, k, v, pk, pv, window_size=(left, -1))
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    want = exact(q, clean_k, clean_v, window_size=(left, -1))
    assert_close(out, want, torch.float32)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert (dk[:, :, :hidden] == 0).all() and (dv[:, :, :hidden] == 0).all()


def test_window_counts_the_prefix_like_a_cache():
    """prefix_in_window=True is PEFT's result: the prefix at cache positions before the
    sequence. Equal to plain attention over the explicit concatenation with the window."""
    torch.manual_seed(0)
    B, H, L, D, P, left = 1, 2, 12, 16, 5, 6
    q = torch.randn(B, H, L, D, dtype=torch.float64)
    k, v = (torch.randn(B, H, L, D, dtype=torch.float64) for _ in range(2))
    pk, pv = (torch.randn(H, P, D, dtype=torch.float64) for _ in range(2))
    got = reference.prefix_attention(q, k, v, pk, pv, window_size=(left, -1), upcast=True)
    keys = torch.cat([pk[None], k], 2)
    values = torch.cat([pv[None], v], 2)
    i = torch.arange(L)[:, None] + P                      # query positions in the cache
    j = torch.arange(P + L)[None, :]
    visible = (j <= i) & (j >= i - left)
    scores = (q @ keys.transpose(-1, -2)) * D ** -0.5
    want = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ values
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kwargs, match", [
    (dict(bias=torch.zeros(2, 4, 5, 9)), r"`bias` must broadcast to \(B, Hq, Lq, P \+ Lk\)"),
    (dict(bias=torch.zeros(1, 1, 5, 10, requires_grad=True)), "`bias` requires grad"),
    (dict(window_size=(3,)), "`window_size` must be a pair"),
    (dict(window_size=(-2, 0)), "`window_size` must be a pair"),
    (dict(softcap=-1.0), "`softcap` must be a finite float >= 0"),
    (dict(softcap=float("inf")), "`softcap` must be a finite float >= 0"),
    (dict(sinks=torch.zeros(3)), r"`sinks` must have shape \(Hq,\) = \(4,\)"),
    (dict(sinks=torch.zeros(4, requires_grad=True)), "`sinks` requires grad"),
    (dict(position_ids=torch.zeros(2, 5, dtype=torch.long),
          cu_seqlens=torch.tensor([0, 10])), "not both"),
    (dict(position_ids=torch.zeros(2, 4, dtype=torch.long)), r"`position_ids` must have shape"),
    (dict(cu_seqlens=torch.tensor([0, 3, 2, 10])), "`cu_seqlens` must start at 0, never "),
    (dict(cu_seqlens=torch.tensor([0, 3, 9])), r"end at B \* L = 10"),
])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_bad_terms_are_named(kwargs, match, backend):
    B, Hq, Hkv, L, D, P = 2, 4, 2, 5, 8, 5
    q = torch.randn(B, Hq, L, D, device=DEVICE)
    k, v = (torch.randn(B, Hkv, L, D, device=DEVICE) for _ in range(2))
    pk, pv = (torch.randn(Hkv, P, D, device=DEVICE) for _ in range(2))
    kwargs = {n: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for n, t in kwargs.items()}
    with pytest.raises((ValueError, TypeError), match=match):
        pf.prefix_attention(q, k, v, pk, pv, backend=backend, **kwargs)


def test_packing_needs_equal_lengths():
    q = torch.randn(1, 2, 4, 8, device=DEVICE)
    k = v = torch.randn(1, 2, 6, 8, device=DEVICE)
    with pytest.raises(ValueError, match="packed sequences need Lq == Lk"):
        pf.prefix_attention(q, k, v, position_ids=torch.arange(6, device=DEVICE)[None])
