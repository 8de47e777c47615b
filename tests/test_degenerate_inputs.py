"""Degenerate inputs on every backend, against the float64 reference: an empty prefix (P = 0,
as None or as a zero-size tensor of each layout) on the shapes where the torch path takes its
merged two-call route, and rows that see no key at all.

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
from conftest import assert_close
from test_prefix_attention import NAMES, exact

from ptuning_fast import torch_path

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
# saves it all for the parent to check against the reference.
_CHILD = textwrap.dedent("""
    import sys, torch
    import ptuning_fast as pf
    backend, path = sys.argv[1], sys.argv[2]
    B, Hq, Hkv, Lq, Lk, D, P = map(int, sys.argv[3:10])
    results = {}
    for layout in sys.argv[10:]:
        q, k, v = (torch.randn(B, h, n, D) for h, n in ((Hq, Lq), (Hkv, Lk), (Hkv, Lk)))
        lead = {"none": None, "shared": (), "row": (B,), "task": (3,)}[layout]
        pk = pv = index = None
        if lead is not None:
            pk, pv = (torch.randn(*lead, Hkv, P, D) for _ in range(2))
        if layout == "task":
            index = torch.randint(0, 3, (B,))
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
    done = subprocess.run([sys.executable, "-c", _CHILD, backend, str(path),
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
