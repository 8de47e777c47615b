"""Degenerate inputs on every backend, against the float64 reference: an empty prefix (P = 0,
as None or as a zero-size tensor of each layout) on the shapes where the torch path takes its
merged two-call route; padded positions holding NaN or inf (never read); rows whose bias hides
every key (zeros, zero gradient).

An empty prefix once reached a torch kernel that divides by the number of keys (SIGFPE: the
whole interpreter dies, pytest worker included), so those cases run in a subprocess that saves
its inputs and results; this process compares them with the reference.
"""
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import DEVICE, assert_close, assert_error_within
from test_prefix_attention import NAMES, Case, exact, make_inputs, run

import ptuning_fast as pf
from ptuning_fast import reference, torch_path

PREFIX_LAYOUTS = ("none", "shared", "row", "task")


def _merged_shapes():
    """(B, Hq, Hkv, Lq, Lk, D, P) of the smallest decode step and causal prefill the torch path
    computes in two calls (`torch_path._merged_applies`), read from its thresholds, with an
    empty prefix; and a prefill with no rows (B = 0: no queries) and a real prefix."""
    B, Hq, Hkv, D = 2, 4, 2, 32
    decode_keys = -(-torch_path.MERGED_DECODE_MIN_ELEMENTS // (B * Hkv * D))
    prefill = torch_path.MERGED_PREFILL_MIN_QUERIES
    return {"decode": (B, Hq, Hkv, 1, decode_keys, D, 0),
            "prefill": (1, Hq // 2, Hkv // 2, prefill, prefill, D, 0),
            "prefill_no_rows": (0, Hq, Hkv, prefill, prefill, D, 3)}


# Runs in a fresh interpreter: builds q, k, v and a prefix of each layout, runs the
# backend without gradients (where the merged path applies) and with every gradient, and
# saves it all for the parent to check against the reference. Without CUDA the kernels run
# under the interpreter: TRITON_INTERPRET comes from this process's environment (conftest).
_CHILD = textwrap.dedent("""
    import sys, torch
    import ptuning_fast as pf
    backend, path, device = sys.argv[1:4]
    B, Hq, Hkv, Lq, Lk, D, P = map(int, sys.argv[4:11])
    results = {}
    for layout in sys.argv[11:]:
        q, k, v = (torch.randn(B, h, n, D, device=device)
                   for h, n in ((Hq, Lq), (Hkv, Lk), (Hkv, Lk)))
        lead = {"none": None, "shared": (), "row": (B,), "task": (3,)}[layout]
        pk = pv = index = None
        if lead is not None:
            pk, pv = (torch.randn(*lead, Hkv, P, D, device=device) for _ in range(2))
        if layout == "task":
            index = torch.randint(0, 3, (B,), device=device)
        inputs = [q, k, v, pk, pv]
        with torch.no_grad():
            plain = pf.prefix_attention(*inputs, prefix_index=index, backend=backend)
        for t in inputs:
            if t is not None:
                t.requires_grad_(True)
        out = pf.prefix_attention(*inputs, prefix_index=index, backend=backend)
        grad_out = torch.randn_like(out)
        wanted = [t for t in inputs if t is not None]
        grads = torch.autograd.grad(out, wanted, grad_out, allow_unused=True)
        results[layout] = dict(inputs=[None if t is None else t.detach() for t in inputs],
                               index=index, plain=plain, out=out.detach(), grad_out=grad_out,
                               grads=list(grads) + [None] * (len(inputs) - len(wanted)))
    torch.save(results, path)
""")


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
@pytest.mark.parametrize("shape", ["decode", "prefill", "prefill_no_rows"])
def test_empty_prefix_or_batch_on_every_backend(tmp_path, backend, shape):
    """P = 0 (None, or (Hkv, 0, D), (B, Hkv, 0, D), (T, Hkv, 0, D) with prefix_index) is plain
    attention on every backend, with and without gradients: the reference's output and
    gradients, and the process survives (it died with SIGFPE on the torch path's merged
    route: no grad, a long decode cache or a long causal prefill; and so did a batch of no
    rows there, with a prefix)."""
    path = tmp_path / "results.pt"
    dims = _merged_shapes()[shape]
    if backend == "triton" and DEVICE == "cpu":
        # The lengths are the torch path's merged-route thresholds; the kernels gain nothing
        # from them under the interpreter but its time (about 80 s of the suite): a few query
        # and key blocks each way still cross every block edge, bottom-right causal included.
        B, Hq, Hkv, Lq, Lk, D, P = dims
        dims = (B, Hq, Hkv, min(Lq, 70), min(Lk, 90), D, P)
    done = subprocess.run([sys.executable, "-c", _CHILD, backend, str(path), DEVICE,
                           *map(str, dims), *PREFIX_LAYOUTS],
                          capture_output=True, text=True, timeout=600)
    died = f" ({signal.Signals(-done.returncode).name})" if done.returncode < 0 else ""
    assert done.returncode == 0, (f"{backend} {shape} {dims}: exit {done.returncode}{died}\n"
                                  f"{done.stderr[-2000:]}")
    results = torch.load(path)
    for layout in PREFIX_LAYOUTS:
        r = results[layout]
        inputs = [None if t is None else t.clone().requires_grad_(True) for t in r["inputs"]]
        want = exact(*inputs, prefix_index=r["index"])
        wanted = [t for t in inputs if t is not None]
        want_grads = torch.autograd.grad(want, wanted, r["grad_out"].double(), allow_unused=True)
        assert_close(r["plain"], want, torch.float32, name=f"{layout}: output without grad")
        assert_close(r["out"], want, torch.float32, name=f"{layout}: output")
        for name, t, g, w in zip(NAMES, wanted, r["grads"], want_grads):
            if t.numel() == 0:         # an empty tensor: its gradient is empty or None
                assert g is None or g.shape == t.shape, f"{layout}: d{name}"
                continue
            assert_close(g, w, torch.float32, "grad", name=f"{layout}: d{name}")


# ------------------------------------------------------------------- padding holding NaN / inf
BACKENDS = ["reference", "torch", "triton"]
DTYPES = [torch.float32, torch.float16]
PADDED_CASES = [
    Case(2, 4, 2, 1, 23, 16, 0, "none", "random"),           # decode step, no prefix
    Case(3, 4, 2, 1, 19, 16, 5, "task", "random"),           # decode step, mixed tasks
    Case(2, 4, 2, 13, 13, 16, 0, "none", "random"),          # prefill, no prefix
    Case(2, 6, 3, 11, 17, 24, 4, "shared", "random"),        # Lq < Lk, shared prefix
    Case(2, 4, 4, 9, 9, 16, 3, "row", "random", causal=False),
]


def _poisoned(t, mask, value):
    """A copy of k or v (B, H, L, D) holding `value` at every position `mask` (B, L) hides."""
    out = t.detach().clone()
    out.transpose(1, 2)[~mask.bool()] = value
    return out.requires_grad_(t.requires_grad)


def _check(out, grads, want, want_grads, low, low_grads, inputs, dtype, label):
    """Output and every gradient against the float64 result: the tolerance table in fp32,
    FlashAttention's rule (against the same-precision reference's own error) in fp16."""
    for name, got, exact_value, same_precision, t in zip(
            ("output",) + NAMES, [out] + grads, [want] + want_grads, [low] + low_grads,
            [out] + inputs):
        if t is None or got is None and t.numel() == 0:
            continue
        kind = "fwd" if name == "output" else "grad"
        name = f"{label}: {name if kind == 'fwd' else 'd' + name}"
        assert torch.isfinite(got).all(), f"{name}: not finite"
        if dtype == torch.float32:
            assert_close(got, exact_value, dtype, kind, name=name)
        else:
            assert_error_within(got, same_precision, exact_value, name=name, kind=kind)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", PADDED_CASES, ids=str)
def test_padded_positions_are_never_read(case, backend, dtype, poison):
    """Keys that `attention_mask` hides are never read (FlashAttention removes them before it
    attends): NaN or inf in k and v there gives the output and every gradient of the same
    inputs with finite values there, and zero dk, dv at those positions; without gradients
    too (the torch path then zeroes them only when the output shows it must)."""
    inputs, mask, index = make_inputs(case, dtype)
    q, k, v, pk, pv = inputs
    bad = [q, _poisoned(k, mask, poison), _poisoned(v, mask, poison), pk, pv]
    grad_out = torch.randn(case.B, case.Hq, case.Lq, case.D, dtype=torch.float64, device=DEVICE)
    fn = lambda *a, **kw: pf.prefix_attention(*a, backend=backend, **kw)      # noqa: E731
    out, grads = run(fn, bad, mask, index, case, grad_out)
    want, want_grads = run(exact, inputs, mask, index, case, grad_out)
    low, low_grads = run(reference.prefix_attention, inputs, mask, index, case, grad_out)
    _check(out, grads, want, want_grads, low, low_grads, inputs, dtype, backend)
    with torch.no_grad():
        plain = fn(*bad, causal=case.causal, attention_mask=mask, prefix_index=index)
    _check(plain, [], want, [], low, [], [], dtype, f"{backend} without gradients")
    hidden = ~mask.bool()
    for name, g in (("dk", grads[1]), ("dv", grads[2])):
        at_padding = g.transpose(1, 2)[hidden]
        assert torch.equal(at_padding, torch.zeros_like(at_padding)), f"{name} at padding"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", [c for c in PADDED_CASES if c.P and c.causal], ids=str)
def test_padded_positions_are_never_read_by_the_merged_path(monkeypatch, case, dtype):
    """The torch path's two-call route (CPU, no gradient; here at any size) too."""
    monkeypatch.setattr(torch_path, "MERGED_DECODE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(torch_path, "MERGED_PREFILL_MIN_QUERIES", 0)
    if case.Lq != 1:
        case = Case(case.B, case.Hq, case.Hkv, case.Lk, case.Lk, case.D, case.P, case.prefix,
                    case.mask)                      # the merged prefill takes Lq == Lk
    (q, k, v, pk, pv), mask, index = make_inputs(case, dtype, requires_grad=False)
    with torch.no_grad():
        out = pf.prefix_attention(q, _poisoned(k, mask, float("nan")),
                                  _poisoned(v, mask, float("nan")), pk, pv,
                                  attention_mask=mask, prefix_index=index, backend="torch")
        want = exact(q, k, v, pk, pv, attention_mask=mask, prefix_index=index)
        low = reference.prefix_attention(q, k, v, pk, pv, attention_mask=mask,
                                         prefix_index=index)
    assert q.device.type != "cpu" or torch_path._merged_applies(
        q, k, v, pk, pv, True, (-1, -1), None, None, 0.0, None, 0.0)
    _check(out, [], want, [], low, [], [], dtype, "merged")


# ---------------------------------------------------------------- rows a bias hides entirely
@pytest.mark.parametrize("terms", ["", "c", "s"], ids=["bias", "bias+softcap", "bias+sinks"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [Case(2, 4, 2, 9, 9, 16, 0, "none", "left"),
                                  Case(2, 4, 2, 1, 13, 16, 0, "none", "none"),
                                  Case(2, 4, 2, 7, 11, 16, 3, "shared", "right")], ids=str)
def test_a_row_whose_bias_hides_every_key_is_zero(case, backend, dtype, terms):
    """A query whose bias is -inf on every key sees no key: zeros and zero gradient, never NaN
    (FlashAttention's rule for a row of -inf logits), on every backend; the other rows are
    the reference's."""
    inputs, mask, index = make_inputs(case, dtype)
    keys = case.P + case.Lk
    bias = torch.randn(case.B, case.Hq, case.Lq, keys, dtype=dtype, device=DEVICE)
    hidden = torch.zeros(case.B, case.Hq, case.Lq, dtype=torch.bool, device=DEVICE)
    hidden[0, 1, case.Lq - 1] = True                  # the last query: it could see every key
    hidden[-1, :, 0] = True                           # every head of a row's first query
    bias[hidden] = float("-inf")
    extra = {"softcap": 2.5} if terms == "c" else {}
    if terms == "s":
        extra["sinks"] = torch.randn(case.Hq, device=DEVICE)
    grad_out = torch.randn(case.B, case.Hq, case.Lq, case.D, dtype=torch.float64, device=DEVICE)
    fn = lambda *a, **kw: pf.prefix_attention(*a, backend=backend, **kw)      # noqa: E731
    out, grads = run(fn, inputs, mask, index, case, grad_out, bias=bias, **extra)
    assert torch.equal(out[hidden], torch.zeros_like(out[hidden]))
    assert torch.equal(grads[0][hidden], torch.zeros_like(grads[0][hidden]))
    want, want_grads = run(exact, inputs, mask, index, case, grad_out, bias=bias, **extra)
    low, low_grads = run(reference.prefix_attention, inputs, mask, index, case, grad_out,
                         bias=bias, **extra)
    _check(out, grads, want, want_grads, low, low_grads, inputs, dtype, backend)
