"""The "torch" backend (`ptuning_fast.torch_path`, what backend="auto" runs where the Triton
kernels cannot) against the float64 reference: forward and every gradient, with and without the
attention terms (bias, window, soft-cap, sinks, packed sequences), dropout, prompt embedding,
the fast paths it promises, backend dispatch, and wrapped models equal to PEFT."""
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, HAS_CUDA, assert_close, gpu
from test_integration_peft import CONFIGS, assert_same_training_step, peft_name
from test_prefix_attention import CASES, Case, check_against_reference, exact, make_inputs, run
from test_prefix_attention_terms import TERM_CASES, make_terms

import ptuning_fast as pf
from ptuning_fast import ops, reference, torch_path


def torch_backend(*args, **kwargs):
    return pf.prefix_attention(*args, backend="torch", **kwargs)


# The kernels' cases plus what the torch path branches on: one query (grouped-query layout),
# no prefix with padding or an empty row (the no-visible-key fix), Lq > Lk with a prefix,
# D = 1, Hq = Hkv, a prefix alone with one query.
TORCH_CASES = CASES + [
    Case(3, 6, 2, 1, 9, 16, 4, "task", "left"),
    Case(2, 4, 2, 1, 12, 16, 0, "none", "right"),
    Case(2, 4, 2, 5, 5, 16, 0, "none", "empty_row", causal=False),
    Case(2, 4, 2, 9, 4, 16, 3, "shared", "random"),
    Case(1, 3, 3, 2, 3, 1, 1, "row", "none", causal=False),
    Case(2, 2, 1, 1, 0, 8, 2),
    Case(2, 6, 3, 7, 11, 24, 5, "row", "left", layout="d_strided"),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", TORCH_CASES, ids=str)
def test_matches_reference(case, dtype):
    check_against_reference(case, dtype, fn=torch_backend)


def test_float64_matches_the_float64_reference():
    case = Case(2, 4, 2, 13, 17, 32, 5, "task", "left")
    inputs, mask, index = make_inputs(case, torch.float64)
    grad_out = torch.randn(2, 4, 13, 32, dtype=torch.float64, device=DEVICE)
    out, grads = run(torch_backend, inputs, mask, index, case, grad_out)
    want, want_grads = run(exact, inputs, mask, index, case, grad_out)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", [
    Case(2, 4, 2, 7, 7, 16, 0, "none", "empty_row"),
    Case(1, 4, 2, 9, 3, 16, 0, "none"),                  # Lq > Lk: the first 6 queries see nothing
], ids=str)
def test_no_visible_key_gives_zeros_and_zero_gradient(case):
    inputs, mask, index = make_inputs(case, torch.float32)
    q = inputs[0]
    out = torch_backend(*inputs, causal=case.causal, attention_mask=mask, prefix_index=index)
    if mask is not None:
        empty = ~mask.bool().any(-1)                      # (B,): rows that see no key at all
        rows = out[empty]
    else:
        rows = out[:, :, :case.Lq - case.Lk]
    assert rows.numel() and torch.equal(rows, torch.zeros_like(rows))
    (dq,) = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(dq).all()
    dq_rows = dq[empty] if mask is not None else dq[:, :, :case.Lq - case.Lk]
    assert torch.equal(dq_rows, torch.zeros_like(dq_rows))


@pytest.mark.parametrize("case, spec", [(Case(2, 4, 2, 11, 13, 16, 5, "shared", "right"), ""),
                                        (Case(2, 4, 2, 13, 13, 16, 5, "task", "right"), "bw"),
                                        (Case(2, 4, 2, 13, 13, 16, 5, "task", "right"), "bwcsp")],
                         ids=str)
def test_dropout_applies_the_reference_backends_mask(case, spec):
    """Same seed, same keep-mask (`dropout_seeds.reference_dropout_mask`): torch and reference agree,
    alone and with the terms (the explicit-scores path with SDPA's float mask, soft-cap,
    sinks, packing)."""
    inputs, mask, index = make_inputs(case, torch.float32)
    terms = make_terms(case, spec, torch.float32)
    grad_out = torch.randn(case.B, case.Hq, case.Lq, case.D, device=DEVICE)
    kw = dict(dropout_p=0.3, dropout_seed=1234, **terms)
    out, grads = run(torch_backend, inputs, mask, index, case, grad_out, **kw)
    want, want_grads = run(lambda *a, **k: pf.prefix_attention(*a, backend="reference", **k),
                           inputs, mask, index, case, grad_out, **kw)
    assert_close(out, want, torch.float32)
    for name, g, w in zip("q k v prefix_k prefix_v".split(), grads, want_grads):
        assert_close(g, w, torch.float32, "grad", name=f"d{name}")
    plain = torch_backend(*inputs, attention_mask=mask, prefix_index=index, **terms)
    assert not torch.allclose(out, plain)                 # dropout did something


class _SdpaSpy:
    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, attn_mask=None, **kwargs):
        self.calls.append((q.shape, k.shape, None if attn_mask is None else attn_mask.shape,
                           kwargs))
        return _REAL_SDPA(q, k, v, attn_mask=attn_mask, **kwargs)


_REAL_SDPA = F.scaled_dot_product_attention


@pytest.mark.parametrize("Lq, padded, causal, want_mask", [
    (8, False, True, (1, 1, 8, 13)),        # causal: one (Lq, P + Lk) plane for every row
    (8, True, True, (2, 1, 8, 13)),         # causal + padding
    (8, False, False, None),                # every key visible: no mask at all
    (8, True, False, (2, 1, 1, 13)),        # padding only: one row of keys per batch row
])
def test_fast_path_shapes(monkeypatch, Lq, padded, causal, want_mask):
    """GQA heads reach SDPA unrepeated, the shared prefix is not copied per row before the
    concatenation, and the mask is only as large as it must be."""
    spy = _SdpaSpy()
    monkeypatch.setattr(torch_path.F, "scaled_dot_product_attention", spy)
    case = Case(2, 8, 2, Lq, 8, 16, 5, "shared", "right" if padded else "none", causal)
    (q, k, v, pk, pv), mask, _ = make_inputs(case, torch.float32, requires_grad=False)
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", None)   # would raise if called
    torch_backend(q, k, v, pk, pv, causal=causal, attention_mask=mask)
    (q_shape, k_shape, mask_shape, kwargs), = spy.calls
    assert k_shape == (2, 2, 13, 16) and kwargs["enable_gqa"] is True
    assert mask_shape == want_mask


def test_decode_stacks_the_group_queries(monkeypatch):
    spy = _SdpaSpy()
    monkeypatch.setattr(torch_path.F, "scaled_dot_product_attention", spy)
    case = Case(2, 8, 2, 1, 9, 16, 5, "shared", "left")
    (q, k, v, pk, pv), mask, _ = make_inputs(case, torch.float32, requires_grad=False)
    out = torch_backend(q, k, v, pk, pv, attention_mask=mask)
    (q_shape, k_shape, mask_shape, _), = spy.calls
    assert q_shape == (2, 2, 4, 16) and k_shape == (2, 2, 14, 16) and mask_shape == (2, 1, 1, 14)
    assert_close(out, exact(q, k, v, pk, pv, attention_mask=mask), torch.float32)


MERGED_CASES = [
    Case(3, 8, 2, 1, 37, 16, 5, "shared", "none"),
    Case(3, 8, 2, 1, 37, 16, 5, "shared", "left"),
    Case(3, 8, 2, 1, 37, 16, 5, "task", "random"),
    Case(2, 6, 3, 1, 29, 24, 4, "row", "empty_row"),      # a row whose cache is all padding
    Case(2, 4, 4, 1, 19, 8, 7, "shared", "right", layout="blhd"),
    # prefills (Lq == Lk, causal): left padding leaves queries that see no sequence key
    Case(3, 8, 2, 37, 37, 16, 5, "shared", "left"),
    Case(3, 8, 2, 29, 29, 16, 5, "task", "right"),
    Case(2, 6, 3, 23, 23, 24, 4, "row", "empty_row"),
    Case(2, 4, 4, 19, 19, 8, 7, "shared", "none", layout="blhd"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", MERGED_CASES, ids=str)
def test_merged_prefix_and_sequence(monkeypatch, case, dtype):
    """On CPU without gradients, a decoding step with a long cache and a long causal prefill
    (here any: the thresholds set to 0) attend to the prefix and the sequence in two flash
    calls merged by their log-sum-exps, never concatenating them: the reference's output.
    With a gradient wanted, the general path runs."""
    monkeypatch.setattr(torch_path, "MERGED_DECODE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(torch_path, "MERGED_PREFILL_MIN_QUERIES", 0)
    merged = []
    real = torch_path._merged
    monkeypatch.setattr(torch_path, "_merged", lambda *a, **k: merged.append(1) or real(*a, **k))
    (q, k, v, pk, pv), mask, index = make_inputs(case, dtype, requires_grad=False)
    with torch.no_grad():
        out = torch_backend(q, k, v, pk, pv, attention_mask=mask, prefix_index=index, scale=0.3)
    assert merged and out.dtype == dtype
    assert_close(out, exact(q, k, v, pk, pv, attention_mask=mask, prefix_index=index,
                            scale=0.3), dtype)
    q.requires_grad_(True)
    torch_backend(q, k, v, pk, pv, attention_mask=mask, prefix_index=index)
    assert len(merged) == 1


def test_merged_only_for_long_caches_and_prefills_on_cpu():
    (q, k, v, pk, pv), _, _ = make_inputs(Case(2, 8, 2, 1, 40, 16, 5), torch.float32,
                                          requires_grad=False)
    rest = (True, (-1, -1), None, None, 0.0, None, 0.0)
    long = torch.randn(2, 2, 4096, 16)
    prefill = torch.randn(2, 8, 600, 16)
    with torch.no_grad():
        applies = torch_path._merged_applies
        assert not applies(q, k, v, pk, pv, *rest)                       # 2.6k cached elements
        assert applies(q, long, long, pk, pv, *rest)
        # Never an empty tensor: the flash kernel it calls divides by the key and query counts.
        assert not applies(q, long, long, pk[:, :0], pv[:, :0], *rest)       # P = 0
        assert not applies(q[:0], long[:0], long[:0], pk, pv, *rest)         # B = 0
        assert not applies(q.double(), long.double(), long.double(), pk.double(), pv.double(),
                           *rest)
        assert not applies(q, long, long, pk, pv, True, (8, 0), None, None, 0.0, None, 0.0)
        assert applies(prefill, prefill[:, :2], prefill[:, :2], pk, pv, *rest)
        assert not applies(prefill[:, :, :300], prefill[:, :2, :300], prefill[:, :2, :300], pk,
                           pv, *rest)                                    # a short prefill
        assert not applies(prefill, prefill[:, :2], prefill[:, :2], pk, pv, False,
                           *rest[1:])                                    # not causal


# ----------------------------------------------------------------------------- attention terms
# The kernels' term cases plus what the torch path branches on: decode steps (SDPA's stacked
# group queries, the explicit path with one query), Lq != Lk under a window, P = 0 and a window
# over the prefix leaving queries with no key (bias's float mask and the sink softmax on such
# rows), every term without a prefix, non-causal windows, MHA with an odd head dim in
# transformers' layout, a prefix alone (Lk = 0) under a window.
TORCH_TERM_CASES = TERM_CASES + [
    (Case(3, 8, 2, 1, 19, 16, 5, "task", "left"), "bwcs"),
    (Case(3, 8, 2, 1, 19, 16, 5, "shared", "right"), "w"),
    (Case(2, 6, 2, 1, 23, 16, 4, "row", "none"), "s"),
    (Case(2, 4, 2, 9, 23, 16, 6, "row", "right"), "wcs"),
    (Case(1, 4, 2, 15, 7, 16, 0, "none", "none"), "bw"),
    (Case(2, 4, 2, 23, 23, 32, 0, "shared", "empty_row"), "b"),
    (Case(2, 4, 2, 23, 23, 32, 0, "shared", "empty_row"), "bc"),
    (Case(2, 3, 1, 17, 17, 8, 0, "none", "random"), "bsu"),
    (Case(2, 4, 2, 12, 18, 16, 7, "task", "random", False), "bwcs"),
    (Case(2, 3, 3, 13, 13, 24, 4, "shared", "right", layout="blhd"), "bWcsu"),
    (Case(1, 2, 1, 4, 0, 32, 9), "bw"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case, spec", TORCH_TERM_CASES,
                         ids=[f"{c}-{s}" for c, s in TORCH_TERM_CASES])
def test_terms_match_reference(case, spec, dtype):
    check_against_reference(case, dtype, fn=torch_backend, **make_terms(case, spec, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("softcap", [30.0, 50.0])
def test_model_sized_softcaps(softcap, dtype):
    """Grok's and Gemma 2's caps, logits large enough to bend: float32 (tanh) within the
    tolerance table, float16 (through a sigmoid, logits rounded at 2 x cap) within FlashAttention's
    rule. The sigmoid form in float32 failed the table on some draws (bench/NOTES.md)."""
    case = Case(2, 8, 2, 33, 33, 32, 7, "shared", "right")
    check_against_reference(case, dtype, fn=torch_backend, softcap=softcap, scale=3.0)


@pytest.mark.parametrize("case, spec", [
    (Case(2, 4, 2, 13, 17, 32, 5, "task", "left"), "bwcs"),
    (Case(2, 4, 2, 21, 21, 16, 6, "row", "right"), "bWcsp"),
    (Case(2, 8, 2, 1, 30, 16, 3, "shared", "left"), "bwcs"),
], ids=str)
def test_float64_terms_match_the_float64_reference(case, spec):
    inputs, mask, index = make_inputs(case, torch.float64)
    terms = make_terms(case, spec, torch.float64)
    grad_out = torch.randn(case.B, case.Hq, case.Lq, case.D, dtype=torch.float64, device=DEVICE)
    out, grads = run(torch_backend, inputs, mask, index, case, grad_out, **terms)
    want, want_grads = run(exact, inputs, mask, index, case, grad_out, **terms)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("bias_shape", ["1h", "bh", "11"])
@pytest.mark.parametrize("Lq, spec", [(11, ""), (11, "c"), (1, ""), (1, "s")])
def test_bias_shapes(bias_shape, Lq, spec, dtype):
    """Every shape `bias` may have (B and Hq each 1 or full), through SDPA's float mask (also
    split per kv head for a decode step's stacked queries) and the explicit path."""
    case = Case(2, 6, 2, Lq, 14, 16, 5, "task", "left")
    B, H = case.B if bias_shape[0] == "b" else 1, case.Hq if bias_shape[1] == "h" else 1
    bias = torch.randn(B, H, Lq, case.P + case.Lk, dtype=dtype, device=DEVICE)
    terms = make_terms(case, spec, dtype)
    check_against_reference(case, dtype, fn=torch_backend, bias=bias, **terms)


def test_window_hiding_every_key_gives_zeros():
    """A left window over the prefix and left padding: queries whose window holds only padding
    and no prefix key see nothing (as the reference: zeros, zero gradient, no NaN), with a
    bias (SDPA's float mask), soft-capped (the explicit path, whose softmax of a row of -inf
    would be NaN) and with sinks."""
    case = Case(2, 4, 2, 16, 16, 8, 2, "shared", "none")
    inputs, _, _ = make_inputs(case, torch.float32)
    mask = torch.ones(2, 16, dtype=torch.bool, device=DEVICE)
    mask[0, :10] = False                     # row 0: queries 5..9 see only padding
    grad_out = torch.randn(2, 4, 16, 8, dtype=torch.float64, device=DEVICE)
    for terms in (dict(bias=torch.randn(1, 4, 16, 18, device=DEVICE)),
                  dict(softcap=3.0), dict(sinks=torch.randn(4, device=DEVICE))):
        out, grads = run(torch_backend, inputs, mask, None, case, grad_out,
                         window_size=(4, -1), **terms)
        want, want_grads = run(exact, inputs, mask, None, case, grad_out, window_size=(4, -1),
                               **terms)
        assert torch.equal(out[0, :, 5:10], torch.zeros_like(out[0, :, 5:10]))
        assert_close(out, want, torch.float32)
        assert torch.equal(grads[0][0, :, 5:10], torch.zeros_like(grads[0][0, :, 5:10]))
        for name, g, w in zip("q k v prefix_k prefix_v".split(), grads, want_grads):
            assert_close(g, w, torch.float32, "grad", name=f"d{name}")


@pytest.mark.parametrize("Lq, Lk, P", [(1, 13, 5), (2, 5, 3), (7, 7, 0), (7, 7, 4), (5, 12, 3),
                                      (9, 4, 6), (6, 0, 3), (11, 11, 20)])
def test_visible_mask_is_the_references_visible_keys(Lq, Lk, P):
    """The torch path's mask (shared planes, bands of diagonals, skipped conditions) marks the
    keys `reference.visible_keys` does, for every window, causal or not, packed or not."""
    B = 2
    padding = torch.rand(B, Lk, device=DEVICE) > 0.3
    packed = [None]
    if Lq == Lk and Lk:
        from ptuning_fast.packing import packed_segments
        ids = torch.cat([torch.arange(Lk // 3 + 1), torch.arange(Lk - Lk // 3 - 1)])
        packed.append(packed_segments(ids.expand(B, -1).to(DEVICE), batch=B, length=Lk))
    windows = [(-1, -1), (0, -1), (2, -1), (3, 1), (-1, 2), (0, 0), (40, -1), (1, 30)]
    # Either side of where a window starts to hide a key (of the sequence, of the prefix).
    edges = [(-1, Lq - 2), (-1, Lq - 1), (Lk - 2, -1), (Lk - 1, -1), (Lk + P - 2, -1),
             (Lk + P - 1, -1)]
    windows += [w for w in edges if min(w) >= -1]
    for causal in (True, False):
        for window in windows:
            for prefix_in_window in (True, False):
                for segments in packed:
                    for mask in (None, padding):
                        kw = dict(causal=causal, attention_mask=mask, device=DEVICE,
                                  window_size=window, prefix_in_window=prefix_in_window,
                                  segments=segments)
                        want = reference.visible_keys(B, Lq, Lk, P, **kw)
                        got = torch_path.visible_mask(B, Lq, Lk, P, **kw)
                        got = torch.ones_like(want) if got is None else got.expand_as(want)
                        assert torch.equal(got, want), kw


@pytest.mark.parametrize("Lq, terms, want_keys, want_mask", [
    (8, dict(window_size=(4096, -1)), 13, (1, 1, 8, 13)),       # hides no key: causal only
    (1, dict(window_size=(4096, -1)), 13, None),                # decode: no mask at all
    (8, dict(window_size=(3, -1)), 11, (1, 1, 8, 11)),          # one plane for every row;
    (8, dict(window_size=(3, 2), causal=False), 11, (1, 1, 8, 11)),   # 2 prefix keys unreached
    (1, dict(window_size=(3, -1)), 4, None),                    # decode past the window:
    (1, dict(window_size=(3, -1), prefix_in_window=False), 9, None),  # only what it sees
    (8, dict(position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]] * 2)), 13, (2, 1, 8, 13)),
    (8, dict(bias=torch.zeros(1, 8, 8, 13)), 13, (1, 8, 8, 13)),    # float mask, bias's shape
    (8, dict(bias=torch.zeros(2, 1, 8, 13), window_size=(3, -1)), 11, (2, 1, 8, 11)),
    (3, dict(bias=torch.zeros(1, 1, 3, 13), window_size=(3, -1), prefix_in_window=False), 11,
     (1, 1, 3, 11)),                                            # the bias's middle cut out
])
def test_terms_fast_path_shapes(monkeypatch, Lq, terms, want_keys, want_mask):
    """Windows and packing reach SDPA inside the one bool mask (shared by rows and heads where
    they allow it), a bias as the float mask; keys no query's window reaches are left out
    (without gradients to keep); heads unrepeated."""
    spy = _SdpaSpy()
    monkeypatch.setattr(torch_path.F, "scaled_dot_product_attention", spy)
    case = Case(2, 8, 2, Lq, 8, 16, 5, "shared", "none")
    (q, k, v, pk, pv), _, _ = make_inputs(case, torch.float32, requires_grad=False)
    terms = {n: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for n, t in terms.items()}
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", None)   # would raise if called
    out = torch_backend(q, k, v, pk, pv, **terms)
    (_, k_shape, mask_shape, _), = spy.calls
    assert k_shape == (2, 2, want_keys, 16)
    if Lq == 1 and want_mask is not None:                 # decode: per kv head, group stacked
        want_mask = (want_mask[0], 1, 1, want_mask[3])
    assert mask_shape == want_mask
    monkeypatch.undo()
    assert_close(out, exact(q, k, v, pk, pv, **terms), torch.float32)


@pytest.mark.parametrize("case, spec", [
    (Case(3, 8, 2, 1, 19, 16, 5, "task", "left"), "bwcs"),
    (Case(3, 8, 2, 1, 19, 16, 5, "row", "right"), "bWs"),
    (Case(2, 4, 2, 9, 23, 16, 6, "shared", "random"), "bwc"),
    (Case(2, 4, 2, 5, 21, 16, 4, "task", "right"), "bW"),
    (Case(1, 4, 1, 1, 12, 16, 0, "none", "left"), "w"),
], ids=str)
def test_unreached_keys_left_out_without_gradients(case, spec):
    """Inference (what generation runs): keys before every query's window, the whole prefix
    included, are left out; the same output as the reference, with dropout the same drops."""
    inputs, mask, index = make_inputs(case, torch.float32, requires_grad=False)
    terms = make_terms(case, spec, torch.float32)
    with torch.no_grad():
        got = torch_backend(*inputs, attention_mask=mask, prefix_index=index, **terms)
        assert_close(got, exact(*inputs, attention_mask=mask, prefix_index=index, **terms),
                     torch.float32)
        kw = dict(attention_mask=mask, prefix_index=index, dropout_p=0.25, dropout_seed=7,
                  **terms)
        dropped = torch_backend(*inputs, **kw)
        want = pf.prefix_attention(*inputs, backend="reference", **kw)
        assert_close(dropped, want, torch.float32)


def test_a_prefix_no_window_reaches_still_gets_zero_gradients():
    """In training a wholly unreached prefix stays in (leaving it out would give it no
    gradient at all): zeros, as the reference's."""
    case = Case(2, 4, 2, 1, 15, 8, 3, "shared", "none")
    inputs, _, _ = make_inputs(case, torch.float32)
    out = torch_backend(*inputs, window_size=(4, -1))
    grads = torch.autograd.grad(out.sum(), inputs)
    assert torch.equal(grads[3], torch.zeros_like(grads[3]))
    assert torch.equal(grads[4], torch.zeros_like(grads[4]))
    assert_close(out, exact(*inputs, window_size=(4, -1)), torch.float32)


@pytest.mark.parametrize("terms", [dict(softcap=5.0), dict(sinks=torch.randn(8))])
def test_softcap_and_sinks_take_explicit_scores_without_repeated_heads(monkeypatch, terms):
    spy = _SdpaSpy()
    monkeypatch.setattr(torch_path.F, "scaled_dot_product_attention", spy)
    case = Case(2, 8, 2, 6, 9, 16, 3, "shared", "right")
    inputs, mask, _ = make_inputs(case, torch.float32)
    terms = {n: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for n, t in terms.items()}
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", None)
    out = torch_backend(*inputs, attention_mask=mask, **terms)
    torch.autograd.grad(out.sum(), inputs)
    monkeypatch.undo()
    assert spy.calls == []
    assert_close(out, exact(*inputs, attention_mask=mask, **terms), torch.float32)


# ---------------------------------------------------------------------------- prompt embedding
@pytest.mark.parametrize("B, L, V, d, P, T", [(3, 7, 50, 40, 5, None), (1, 1, 11, 16, 0, None),
                                              (4, 9, 30, 100, 3, 3), (2, 3, 20, 48, 1, 2)])
@pytest.mark.parametrize("dtype, prompt_dtype", [(torch.float32, torch.float32),
                                                 (torch.bfloat16, torch.float32),
                                                 (torch.float16, torch.float16)])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_prompt_embedding_matches_reference(B, L, V, d, P, T, dtype, prompt_dtype, weight_grad):
    ids = torch.randint(0, V, (B, L), device=DEVICE)
    weight = torch.randn(V, d, dtype=dtype, device=DEVICE, requires_grad=weight_grad)
    prompt = torch.randn((P, d) if T is None else (T, P, d), dtype=prompt_dtype, device=DEVICE,
                         requires_grad=True)
    index = None if T is None else torch.randint(0, T, (B,), device=DEVICE, dtype=torch.int32)
    out = pf.prompt_embedding(ids, weight, prompt, prompt_index=index, backend="torch")
    ref = reference.prompt_embedding(ids, weight, prompt, prompt_index=index)
    assert out.dtype == weight.dtype and torch.equal(out, ref)     # copies: exact
    grad = torch.randn_like(out)
    wanted = (prompt, weight) if weight_grad else (prompt,)
    got = torch.autograd.grad(out, wanted, grad)
    want = torch.autograd.grad(ref, wanted, grad)
    for name, g, w in zip(("dprompt", "dweight"), got, want):
        assert_close(g, w, prompt_dtype if name == "dprompt" else dtype, "grad", name=name)
    if not weight_grad:
        assert weight.grad is None


def test_prompt_embedding_checks_ids():
    ids = torch.tensor([[0, 7]])
    weight, prompt = torch.randn(5, 4), torch.randn(2, 4)
    with pytest.raises(ValueError, match="input_ids.*7.*outside \\[0, 5\\)"):
        pf.prompt_embedding(ids, weight, prompt, backend="torch")


# ---------------------------------------------------------------------------------- dispatch
def _q(dtype=torch.float32):
    return {"q": torch.randn(1, 2, 3, 4, dtype=dtype, device=DEVICE)}


@pytest.mark.skipif(HAS_CUDA, reason="CPU dispatch")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_auto_on_cpu_takes_the_torch_path_even_under_the_interpreter(dtype):
    assert ops.choose_backend("auto", "prefix_attention", _q(dtype), {}) == "torch"
    reasons = ops.not_supported_reasons("triton", "prefix_attention", _q(dtype), {}, auto=True)
    assert reasons and all(isinstance(r, str) for r in reasons)
    assert ops.not_supported_reasons("torch", "prefix_attention", _q(dtype), {}) == []


@gpu
def test_auto_on_cuda_takes_the_kernels_and_falls_back_for_float64():
    assert ops.choose_backend("auto", "prefix_attention", _q(), {}) == "triton"
    assert ops.choose_backend("auto", "prefix_attention", _q(torch.float64), {}) == "torch"


def test_explicit_backend_lists_every_reason():
    options = {"a_future_term": 30.0, "another_term": (4, 0), "softcap": 2.0, "causal": True,
               "sinks": None}
    with pytest.raises(NotImplementedError) as info:
        ops.choose_backend("torch", "prefix_attention", _q(), options)
    message = str(info.value)
    assert "`a_future_term`=30.0" in message and "`another_term`=(4, 0)" in message
    assert all(name not in message for name in ("softcap", "sinks", "causal"))  # computed
    with pytest.raises(TypeError, match="float64"):
        ops.choose_backend("triton", "prefix_attention", _q(torch.float64), {})


def test_auto_with_an_option_no_backend_computes_names_every_backend():
    with pytest.raises(NotImplementedError) as info:
        ops.choose_backend("auto", "prefix_attention", _q(), {"a_future_term": 2.0})
    assert all(f"'{name}'" in str(info.value) for name in ops.AUTO_ORDER)


@pytest.mark.skipif(HAS_CUDA, reason="CPU dispatch")
@pytest.mark.parametrize("spec", ["b", "w", "W", "c", "s", "p", "u", "bwcsp"])
def test_auto_on_cpu_takes_the_torch_path_for_the_terms(monkeypatch, spec):
    """With any attention term in use, "auto" on CPU runs the torch path (it used to fall back
    to the reference) and gives the reference's result."""
    case = Case(2, 4, 2, 9, 9, 8, 3, "task", "right")
    (q, k, v, pk, pv), mask, index = make_inputs(case, torch.float32, requires_grad=False)
    terms = make_terms(case, spec, torch.float32)
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)
    real = torch_path.prefix_attention
    monkeypatch.setattr(torch_path, "prefix_attention", spy)
    got = pf.prefix_attention(q, k, v, pk, pv, attention_mask=mask, prefix_index=index, **terms)
    assert len(calls) == 1
    assert_close(got, exact(q, k, v, pk, pv, attention_mask=mask, prefix_index=index, **terms),
                 torch.float32)
    options = {"window_size": (-1, -1), "prefix_in_window": True, "softcap": 0.0, "sinks": None,
               "bias": None, "segments": None}
    options.update({n: t for n, t in terms.items() if n not in ("position_ids", "cu_seqlens")})
    if "p" in spec:
        options["segments"] = (mask, mask)          # any pair of tensors: in use
    assert ops.choose_backend("auto", "prefix_attention", {"q": q}, options) == "torch"
    assert ops.not_supported_reasons("torch", "prefix_attention", {"q": q}, options) == []


@pytest.mark.parametrize("value, used", [(None, False), (False, False), (0, False), (0.0, False),
                                         ((-1, -1), False), (True, True), (2.5, True),
                                         ((4, 0), True), ([-1, -1], False), (torch.zeros(2), True),
                                         ((torch.zeros(2), torch.ones(2)), True)])
def test_option_in_use(value, used):
    from ptuning_fast.validation import option_in_use
    assert option_in_use(value) is used


def test_reference_computes_every_keyword_of_its_own():
    for name in ("causal", "attention_mask", "scale", "prefix_index", "dropout_p"):
        assert ops.not_supported_reasons("reference", "prefix_attention", _q(),
                                         {name: 1.0}) == []


# ------------------------------------------------------------------ models: auto equals PEFT
@pytest.mark.parametrize("model_name", ["llama", "qwen2", "bert"])
@pytest.mark.parametrize("method", ["prefix", "prefix_proj", "prompt", "ptuning_mlp",
                                    "ptuning_lstm"])
def test_auto_backend_training_step_matches_peft(model_name, method):
    from models import peft_refusal_reason, peft_refuses, wrapped_and_twin
    pytest.importorskip("peft")
    ours, twin = wrapped_and_twin(model_name, CONFIGS[method], backend="auto")
    try:
        assert_same_training_step(ours, twin, model_name, "left", peft_name)
    except ValueError as error:
        if not peft_refuses(error):
            raise
        pytest.skip(peft_refusal_reason(twin, error))


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_torch_backend_training_step_compiles_fullgraph(method):
    from models import VOCAB, tiny_llama
    torch._dynamo.reset()
    config = {"prefix": pf.PrefixTuningConfig(4, num_tasks=2),
              "prompt": pf.PromptTuningConfig(4, num_tasks=2)}[method]
    model = pf.wrap(tiny_llama(), config, backend="torch").train()
    ids = torch.randint(3, VOCAB, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :2] = 0
    tasks = torch.tensor([1, 0, 1])

    def step(m):
        loss = m(input_ids=ids, attention_mask=mask, labels=ids, task_ids=tasks).loss
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        return loss.detach(), grads
    eager_loss, eager_grads = step(model)
    loss, grads = step(torch.compile(model, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(loss, eager_loss)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


# ----------------------------------------------------- models with terms: the torch backend
@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3", "gpt_oss"])
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_models_with_terms_training_step_matches_peft(arch, method):
    """Sliding windows (Mistral, Gemma 2/3, GPT-OSS), soft-capping (Gemma 2), sinks (GPT-OSS)
    through the torch backend: logits, loss, gradients and one AdamW step equal PEFT's."""
    from test_integration_terms import ours_and_twin

    from models import peft_refusal_reason, peft_refuses
    ours, twin = ours_and_twin(arch, method, "torch")
    try:
        assert_same_training_step(ours, twin, "llama", "left", peft_name)
    except ValueError as error:
        if not peft_refuses(error):
            raise
        pytest.skip(peft_refusal_reason(twin, error))


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gpt_oss"])
def test_models_with_terms_greedy_tokens_past_the_window(arch):
    """Generation past the window (decode steps through the sliding-window cache) gives the
    tokens of the unwrapped model with the prefix materialized in its cache."""
    from test_integration_terms import ours_and_twin

    from models import MaterializedPrompt, batch
    ours, _ = ours_and_twin(arch, "prefix", "torch")
    ids, mask, _ = batch("llama", padding="left")
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
              pad_token_id=0)
    assert torch.equal(ours.generate(**kw), MaterializedPrompt(ours).generate(**kw))


def test_prefix_tuned_t5_bias_through_the_torch_backend():
    """T5's relative position bias over the prefix (the float mask path): the torch backend's
    logits and prefix gradient equal the reference backend's (equal to PEFT's:
    tests/test_integration_terms.py)."""
    from test_integration_terms import _t5
    seq2seq = dict(pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
    models = [pf.wrap(_t5(**seq2seq), pf.PrefixTuningConfig(3), backend=b).train()
              for b in ("torch", "reference")]
    with torch.no_grad():
        models[0].prompt_encoder.embedding.weight.normal_(0, 0.5)
    models[1].prompt_encoder.load_state_dict(models[0].prompt_encoder.state_dict())
    ids = torch.randint(3, 50, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    labels = torch.randint(3, 50, (2, 5))
    outs = [m(input_ids=ids, attention_mask=mask, labels=labels) for m in models]
    assert_close(outs[0].logits, outs[1].logits, torch.float32, name="logits")
    grads = [torch.autograd.grad(o.loss, m.prompt_encoder.embedding.weight)[0]
             for o, m in zip(outs, models)]
    assert_close(grads[0], grads[1], torch.float32, "grad", name="prefix grad")


@pytest.mark.parametrize("name, value", [("bias", torch.zeros(1, 1, 5, 8)),
                                         ("sinks", torch.zeros(4))])
def test_no_gradient_for_bias_or_sinks(name, value):
    """Bias and sinks come from frozen weights: one that requires grad is a clear error (as
    for every backend), never a silently missing gradient."""
    q = torch.randn(2, 4, 5, 8, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(2, 2, 5, 8, device=DEVICE) for _ in range(2))
    pk, pv = (torch.randn(2, 3, 8, device=DEVICE) for _ in range(2))
    value = value.to(DEVICE).requires_grad_(True)
    with pytest.raises(ValueError, match=f"`{name}` requires grad"):
        torch_backend(q, k, v, pk, pv, **{name: value})
    out = torch_backend(q, k, v, pk, pv, **{name: value.detach()})
    assert out.requires_grad


def test_terms_compile_fullgraph():
    """Every term at once, as a model layer calls it: one graph under torch.compile, the same
    output and gradients as eager."""
    from ptuning_fast.packing import packed_segments
    torch._dynamo.reset()
    case = Case(2, 4, 2, 9, 9, 8, 3, "shared", "right")
    inputs, mask, _ = make_inputs(case, torch.float32)
    segments = packed_segments(torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5]] * 2, device=DEVICE),
                               batch=2, length=9)
    terms = dict(bias=torch.randn(2, 1, 9, 12, device=DEVICE), window_size=(3, -1),
                 softcap=2.0, sinks=torch.randn(4, device=DEVICE), segments=segments)

    def layer(*tensors):
        return ops.layer_prefix_attention(*tensors, attention_mask=mask, backend="torch",
                                          **terms)
    eager = layer(*inputs)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(*inputs)
    torch.testing.assert_close(compiled, eager)
    grad = torch.randn_like(eager)
    for g, e in zip(torch.autograd.grad(compiled, inputs, grad),
                    torch.autograd.grad(eager, inputs, grad)):
        torch.testing.assert_close(g, e)
