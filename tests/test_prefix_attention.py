"""Fused prefix attention vs ptuning_fast.reference: forward, all five gradients, numerics,
determinism, frozen inputs, torch.compile, bad inputs, every GPU tile config.

Under the interpreter the kernels run in fp32 and fp16; fp32 is compared with the float64
reference through the tolerance table, fp16 with FlashAttention's rule (the kernel's error at
most ~2x that of the reference computed in fp16).
"""
import math
from dataclasses import dataclass

import pytest
import torch
from conftest import DEVICE, HAS_CUDA, assert_close, assert_error_within, gpu, poison_like

import ptuning_fast as pf
from ptuning_fast import reference
from ptuning_fast.kernels import attention_inputs, attention_specs
from ptuning_fast.kernels import prefix_attention_bwd as bwd_kernels
from ptuning_fast.kernels import prefix_attention_bwd_dq as dq_kernels
from ptuning_fast.kernels import prefix_attention_fwd as fwd_kernels
from ptuning_fast.kernels import tiles
from ptuning_fast.kernels.attention_options import AttentionSpec
from ptuning_fast.kernels.launch import Target, pretend_target

NAMES = ("q", "k", "v", "prefix_k", "prefix_v")


@dataclass
class Case:
    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    P: int
    prefix: str = "shared"      # "none" | "shared" | "row" | "task"
    mask: str = "none"          # "none" | "left" | "right" | "random" | "empty_row"
    causal: bool = True
    layout: str = "bhld"        # "bhld" | "blhd" (transformers' transposed views) | "d_strided"

    def __str__(self):
        return (f"B{self.B}-H{self.Hq}:{self.Hkv}-Lq{self.Lq}-Lk{self.Lk}-D{self.D}-P{self.P}-"
                f"{self.prefix}-{self.mask}-{'causal' if self.causal else 'full'}-{self.layout}")


def _tensor(shape, dtype, layout):
    """Fresh random data in the requested memory layout, values unchanged by the layout."""
    if layout == "blhd" and len(shape) == 4:       # (B, H, L, D) seen through (B, L, H, D)
        B, H, L, D = shape
        return torch.randn(B, L, H, D, dtype=dtype, device=DEVICE).transpose(1, 2)
    if layout == "d_strided":                      # last dim not contiguous: the launcher copies
        return torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype, device=DEVICE)[..., ::2]
    return torch.randn(shape, dtype=dtype, device=DEVICE)


def _mask(case):
    B, Lk = case.B, case.Lk
    if case.mask == "none":
        return None
    lengths = torch.randint(max(1, Lk // 2), Lk + 1, (B,), device=DEVICE)
    j = torch.arange(Lk, device=DEVICE)
    if case.mask == "right":                        # right padding, int64 as tokenizers give
        return (j[None, :] < lengths[:, None]).long()
    if case.mask == "left":                         # left padding (generation), bool
        return j[None, :] >= (Lk - lengths)[:, None]
    mask = torch.rand(B, Lk, device=DEVICE) > 0.3
    if case.mask == "empty_row":                    # row 0 attends to nothing at all
        mask[0] = False
    return mask


def make_inputs(case, dtype, requires_grad=True):
    """(q, k, v, prefix_k, prefix_v) and (attention_mask, prefix_index) for `case`."""
    q = _tensor((case.B, case.Hq, case.Lq, case.D), dtype, case.layout)
    k = _tensor((case.B, case.Hkv, case.Lk, case.D), dtype, case.layout)
    v = _tensor((case.B, case.Hkv, case.Lk, case.D), dtype, case.layout)
    index = None
    if case.prefix == "none":
        pk = pv = None
    elif case.prefix == "shared":
        # A (Hkv, P, D) view of a (P, Hkv, D) tensor: strided rows, as an encoder might produce.
        pk = torch.randn(case.P, case.Hkv, case.D, dtype=dtype, device=DEVICE).transpose(0, 1)
        pv = torch.randn(case.Hkv, case.P, case.D, dtype=dtype, device=DEVICE)
    elif case.prefix == "row":
        pk = torch.randn(case.B, case.Hkv, case.P, case.D, dtype=dtype, device=DEVICE)
        pv = torch.randn_like(pk)
    else:
        tasks = 3
        pk = torch.randn(tasks, case.Hkv, case.P, case.D, dtype=dtype, device=DEVICE)
        pv = torch.randn_like(pk)
        index = torch.randint(0, tasks, (case.B,), device=DEVICE)
    inputs = [q, k, v, pk, pv]
    if requires_grad:
        for t in inputs:
            if t is not None:
                t.requires_grad_(True)
    return inputs, _mask(case), index


def run(fn, inputs, mask, index, case, grad_out, **kwargs):
    """Output and the gradient of every input that requires one (None for the others)."""
    out = fn(*inputs, causal=case.causal, attention_mask=mask, prefix_index=index, **kwargs)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, grad_out.to(out.dtype), allow_unused=True))
    return out, [next(grads) if t is not None and t.requires_grad else None for t in inputs]


def fused(*args, **kwargs):
    return pf.prefix_attention(*args, backend="triton", **kwargs)


def exact(*args, **kwargs):
    return reference.prefix_attention(*args, upcast=True, **kwargs)


def check_against_reference(case, dtype, rule="flash", fn=fused, **terms):
    """Forward and every gradient vs the float64 reference. fp32: the tolerance table. 16-bit:
    FlashAttention's rule (`rule="flash"`), or the table (`rule="table"`) for the property
    test's tiny shapes, where the max error is over a handful of elements and a single rounding
    of Delta = rowsum(dO * O) (O stored in 16 bits, as in every FA2 backward) can exceed
    twice the reference's error by luck. `fn`: the backend under test; `terms`: attention
    terms (bias, window_size, ...) passed to both."""
    inputs, mask, index = make_inputs(case, dtype)
    grad_out = torch.randn(case.B, case.Hq, case.Lq, case.D, dtype=torch.float64, device=DEVICE)
    out, grads = run(fn, inputs, mask, index, case, grad_out, **terms)
    ref, ref_grads = run(exact, inputs, mask, index, case, grad_out, **terms)
    assert out.shape == ref.shape and out.dtype == dtype
    if dtype == torch.float32 or rule == "table":
        assert_close(out, ref, dtype, "fwd")
    else:
        low, low_grads = run(reference.prefix_attention, inputs, mask, index, case, grad_out,
                             **terms)
        assert torch.isfinite(out).all()
        assert_error_within(out, low, ref)
    for name, t, g, want in zip(NAMES, inputs, grads, ref_grads):
        if t is None:
            continue
        # The reference never touches a P = 0 prefix: its gradient is an empty tensor.
        want = torch.zeros_like(t, dtype=torch.float64) if want is None else want
        if g is None and t.numel() == 0:
            continue                      # a backend that, like the reference, never reads it
        assert g is not None and g.shape == t.shape and g.dtype == t.dtype, name
        if t.numel() == 0:
            continue
        if dtype == torch.float32 or rule == "table":
            assert_close(g, want, dtype, "grad", name=f"d{name}")
        else:
            low_g = low_grads[NAMES.index(name)]
            low_g = torch.zeros_like(t) if low_g is None else low_g
            assert torch.isfinite(g).all(), name
            assert_error_within(g, low_g, want, name=f"d{name}", kind="grad")


CASES = [
    Case(2, 4, 2, 37, 53, 64, 37),                                    # odd P, GQA 2:1, Lq < Lk
    Case(2, 4, 1, 1, 53, 80, 5, "row", "right", layout="blhd"),       # decode step, MQA, D = 80
    Case(2, 2, 2, 70, 70, 32, 0, "none", "left"),                     # plain attention, padding
    Case(2, 4, 4, 33, 45, 96, 130, "task", "random", False, "blhd"),  # P > block, mixed tasks
    Case(2, 4, 1, 20, 20, 64, 1, layout="blhd"),                      # P = 1, GQA 4:1
    Case(2, 2, 1, 23, 23, 32, 0, "shared", "empty_row"),              # fully masked row, P = 0
    Case(1, 2, 2, 40, 20, 32, 0, "none"),                             # Lq > Lk: early rows empty
    Case(2, 8, 2, 17, 31, 128, 16, "shared", "left", layout="d_strided"),  # copied last dim
    Case(2, 2, 2, 64, 64, 32, 48, "row", "right", False),             # multiples of the blocks
    Case(1, 2, 1, 4, 0, 32, 9),                                       # prefix only (Lk = 0)
    Case(2, 2, 2, 19, 26, 48, 3, "task", "right"),                    # D not a multiple of 16
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case, dtype):
    check_against_reference(case, dtype)


def _explicit_attention(q, k, v, pk, pv, mask, index, causal, scale):
    """Float64 attention written out per (row, head, query) over an explicit concatenation."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    out = torch.zeros(B, Hq, Lq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            g = h // (Hq // Hkv)
            prefix = torch.zeros(0, D, dtype=torch.float64), torch.zeros(0, D, dtype=torch.float64)
            if pk is not None:
                row = pk if pk.dim() == 3 else pk[index[b] if index is not None else b]
                rowv = pv if pv.dim() == 3 else pv[index[b] if index is not None else b]
                prefix = row[g].double(), rowv[g].double()
            keys = torch.cat([prefix[0], k[b, g].double()])
            values = torch.cat([prefix[1], v[b, g].double()])
            P = prefix[0].shape[0]
            for i in range(Lq):
                seen = [p for p in range(P)] + [
                    P + j for j in range(Lk)
                    if (mask is None or bool(mask[b, j])) and (not causal or j <= i + Lk - Lq)]
                if not seen:
                    continue                                  # no visible key: zeros
                scores = torch.stack([q[b, h, i].double() @ keys[c] * scale for c in seen])
                weights = torch.softmax(scores, dim=0)
                out[b, h, i] = sum(w * values[c] for w, c in zip(weights, seen))
    return out


@pytest.mark.parametrize("case", [
    Case(2, 4, 2, 3, 7, 8, 2),                                  # bottom-right causal alignment
    Case(2, 2, 1, 6, 4, 8, 0, "none"),                          # Lq > Lk: rows with no key
    Case(2, 2, 2, 5, 5, 8, 0, "shared", "empty_row"),           # fully masked row -> zeros
    Case(3, 2, 1, 4, 6, 8, 3, "task", "random", False),
    Case(2, 2, 2, 4, 5, 8, 2, "row", "left"),
], ids=str)
def test_reference_matches_explicit_float64(case):
    (q, k, v, pk, pv), mask, index = make_inputs(case, torch.float64, requires_grad=False)
    scale = 0.3
    want = _explicit_attention(q, k, v, pk, pv, mask, index, case.causal, scale)
    got = reference.prefix_attention(q, k, v, pk, pv, causal=case.causal, attention_mask=mask,
                                     scale=scale, prefix_index=index, upcast=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if case.mask == "empty_row" or case.Lq > case.Lk:
        assert (want.abs().sum(-1) == 0).any()


def test_output_layout_and_poisoned_out():
    case = Case(2, 4, 2, 21, 30, 64, 7, "shared", "right")
    (q, k, v, pk, pv), mask, _ = make_inputs(case, torch.float32, requires_grad=False)
    out = fused(q, k, v, pk, pv, attention_mask=mask)
    # Laid out as (B, Lq, Hq, D): the caller's transpose(1, 2).reshape(B, Lq, -1) is free.
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()
    poisoned = poison_like(torch.empty(2, 4, 21, 64, device=DEVICE))
    written, lse = fwd_kernels.prefix_attention_fwd(q, k, v, pk, pv,
                                                    AttentionSpec(attention_mask=mask),
                                                    out=poisoned)
    assert written is poisoned and torch.isfinite(lse).all()
    assert torch.equal(poisoned, out)


@pytest.mark.parametrize("scale", [0.05, -0.3, 0.0])
def test_scale_argument(scale):
    # The forward scales inside exp2's argument, which needs a scale > 0: a negative one's sign
    # goes into q, and the backward's recomputed probabilities must still match its LSE; at 0
    # a hidden key's -inf times the scale would be NaN (causal: every row hides keys).
    # Logits of a few hundred (base 2): a row max taken on the wrong side overflows exp2.
    case = Case(1, 2, 2, 9, 9, 32, 4)
    inputs, _, _ = make_inputs(case, torch.float32, requires_grad=False)
    inputs[0] = (inputs[0] * 10.0).requires_grad_(True)
    for t in inputs[1:]:
        t.requires_grad_(True)
    grad_out = torch.randn(1, 2, 9, 32, dtype=torch.float64, device=DEVICE)
    got, grads = run(fused, inputs, None, None, case, grad_out, scale=scale)
    want, want_grads = run(exact, inputs, None, None, case, grad_out, scale=scale)
    assert_close(got, want, torch.float32)
    for g, w in zip(grads, want_grads):
        assert_close(g, w, torch.float32, kind="grad", name="gradient")


def test_empty_prefix_tensor_gets_empty_grad():
    case = Case(2, 2, 2, 8, 8, 32, 0)
    (q, k, v, pk, pv), _, _ = make_inputs(case, torch.float32)
    out = fused(q, k, v, pk, pv)
    gq, gpk, gpv = torch.autograd.grad(out.sum(), (q, pk, pv))
    assert gpk.shape == pk.shape == (2, 0, 32) and gpv.shape == pv.shape
    assert_close(gq, torch.autograd.grad(exact(q, k, v).sum(), q)[0], torch.float32, "grad")


def test_backward_is_bitwise_deterministic():
    case = Case(2, 4, 2, 37, 41, 64, 37, "shared", "random")
    inputs, mask, index = make_inputs(case, torch.float16)
    grad_out = torch.randn(2, 4, 37, 64, device=DEVICE)
    _, first = run(fused, inputs, mask, index, case, grad_out)
    _, second = run(fused, inputs, mask, index, case, grad_out)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


class _LaunchSpy:
    """Stands in for a @triton.jit kernel: records launches and forwards them."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("trainable", [("prefix_k", "prefix_v"), ("q",), ("k",), ("q", "v")])
def test_only_requested_gradients_are_computed(monkeypatch, trainable):
    case = Case(2, 4, 2, 19, 23, 32, 5, "task", "right")
    inputs, mask, index = make_inputs(case, torch.float32, requires_grad=False)
    for name, t in zip(NAMES, inputs):
        t.requires_grad_(name in trainable)
    modules = {"_dq_kernel": dq_kernels, "_dkdv_kernel": bwd_kernels,
               "_prefix_dkdv_kernel": bwd_kernels}
    spies = {name: _LaunchSpy(getattr(module, name)) for name, module in modules.items()}
    for name, spy in spies.items():
        monkeypatch.setattr(modules[name], name, spy)
    fused(*inputs, attention_mask=mask, prefix_index=index).square().sum().backward()
    for name, t in zip(NAMES, inputs):
        assert (t.grad is not None) == (name in trainable), name
    assert spies["_dq_kernel"].launches == ("q" in trainable)
    assert spies["_dkdv_kernel"].launches == bool({"k", "v"} & set(trainable))
    assert spies["_prefix_dkdv_kernel"].launches == bool({"prefix_k", "prefix_v"} & set(trainable))
    ref_inputs = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
    exact(*ref_inputs, attention_mask=mask, prefix_index=index).square().sum().backward()
    for name, t, r in zip(NAMES, inputs, ref_inputs):
        if name in trainable:
            assert_close(t.grad, r.grad, torch.float32, "grad", name=f"d{name}")


def test_large_logits_stay_finite():
    # Scores ~1e4: the online softmax must rescale without overflow in every kernel.
    case = Case(2, 2, 1, 30, 34, 32, 6, "shared", "random")
    inputs, mask, _ = make_inputs(case, torch.float32, requires_grad=False)
    inputs[0] = inputs[0] * 30.0
    inputs[1] = inputs[1] * 30.0
    inputs[3] = inputs[3] * 30.0
    for t in inputs:
        t.requires_grad_(True)
    scores = (inputs[0] @ inputs[1].transpose(-1, -2)).abs().max()
    assert scores > 5e3
    grad_out = torch.randn(2, 2, 30, 32, dtype=torch.float64, device=DEVICE)
    out, grads = run(fused, inputs, mask, None, case, grad_out, scale=1.0)
    ref, ref_grads = run(exact, inputs, mask, None, case, grad_out, scale=1.0)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    # Near one-hot rows: fp32 score rounding (~1e4 * 6e-8) moves the weights by ~1e-3.
    torch.testing.assert_close(out.double(), ref, atol=5e-3, rtol=5e-3)
    for g, want in zip(grads, ref_grads):
        scale = want.abs().max().item() + 1.0
        assert (g.double() - want).abs().max().item() <= 1e-2 * scale


def test_input_precision_follows_torch_setting():
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert attention_inputs.input_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert attention_inputs.input_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(previous)


def test_torch_compile_fullgraph():
    case = Case(2, 4, 2, 13, 17, 32, 5, "task", "right")
    inputs, mask, index = make_inputs(case, torch.float32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss_fn(q, k, v, pk, pv, mask, index):
        out = pf.prefix_attention(q, k, v, pk, pv, attention_mask=mask, prefix_index=index,
                                  backend="triton")
        return out.transpose(1, 2).reshape(2, 13, -1).square().sum()

    compiled = torch.autograd.grad(loss_fn(*inputs, mask, index), inputs)
    eager = torch.autograd.grad(
        fused(*inputs, attention_mask=mask, prefix_index=index).square().sum(), inputs)
    for name, a, b in zip(NAMES, compiled, eager):
        assert torch.equal(a, b), name


def test_bad_inputs_name_the_argument():
    case = Case(2, 4, 2, 5, 6, 32, 3, "task")
    (q, k, v, pk, pv), _, index = make_inputs(case, torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="prefix_index"):
        fused(q, k, v, pk, pv, prefix_index=torch.tensor([0, 3], device=DEVICE))
    with pytest.raises(ValueError, match="Hkv"):
        fused(q[:, :3], k, v, pk, pv, prefix_index=index)
    with pytest.raises(ValueError, match="attention_mask"):
        fused(q, k, v, pk, pv, prefix_index=index,
              attention_mask=torch.ones(2, 5, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="prefix_k"):
        fused(q, k, v, pk.half(), pv.half(), prefix_index=index)
    with pytest.raises(ValueError, match="prefix_index"):
        fused(q, k, v, pk, pv)


def test_compile_specs_cover_every_gpu_config():
    # Every tile candidate a launcher can pick on a GPU appears in compile_specs() (which the
    # compile test builds for sm_80/sm_90) on the archs that list it, for each kernel using it.
    specs = [s for m in (fwd_kernels, bwd_kernels, dq_kernels) for s in m.compile_specs()]
    # The dropout-free kernels alone cover every config (dropout variants come on top).
    built = {(s.name.split("[")[0], arch, "bf16" in s.name or "fp16" in s.name,
              s.constexprs["BLOCK_D"], s.constexprs.get("BLOCK_M"), s.constexprs.get("BLOCK_N"),
              s.num_warps, s.num_stages)
             for s in specs if not s.constexprs.get("HAS_DROPOUT") for arch in s.archs}
    kernels = {"prefix_attention_fwd": "fwd", "prefix_attention_dq": "dq",
               "prefix_attention_dkdv": "dkdv"}
    for name, kernel in kernels.items():
        for (arch, sixteen_bit, block_d), cands in tiles.CANDIDATES[kernel].items():
            for c in cands:
                key = (name, arch, sixteen_bit, block_d, c.block_m, c.block_n, c.num_warps,
                       c.num_stages)
                assert key in built, key
    # The prefix kernel runs each arch's fixed dK/dV tile, with short-prefix key blocks too.
    prefix = {k[1:4] + (k[5],) for k in built if k[0] == "prefix_attention_prefix_dkdv"}
    for (arch, sixteen_bit, block_d), cands in tiles.CANDIDATES["dkdv"].items():
        assert (arch, sixteen_bit, block_d) in {p[:3] for p in prefix}
    assert {p[3] for p in prefix} >= {16, 64}
    for D in (1, 16, 32, 48, 64, 80, 96, 128, 160, 256):
        assert tiles.head_block(D) in {32, 64, 128, 256}
    for flags in attention_specs.FLAG_COMBOS:
        assert any((s.constexprs.get("IS_CAUSAL"), s.constexprs.get("HAS_MASK")) == flags
                   for s in specs if "fwd" in s.name)
    # Dropout-free, every config above; with dropout, some of them for each kernel.
    for kernel in list(kernels) + ["prefix_attention_prefix_dkdv"]:
        for has_dropout in (False, True):
            assert any(s.constexprs["HAS_DROPOUT"] == has_dropout for s in specs
                       if s.name.split("[")[0] == kernel), (kernel, has_dropout)


def test_unsupported_kernel_inputs_are_refused():
    q = torch.randn(1, 1, 2, 320, device=DEVICE)
    with pytest.raises(ValueError, match="head dim"):
        fused(q, q, q)
    q = torch.randn(1, 1, 2, 32, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        fused(q, q, q)


def test_empty_query_and_batch():
    for B, Lq in ((1, 0), (0, 3)):
        q = torch.randn(B, 2, Lq, 32, device=DEVICE, requires_grad=True)
        k = torch.randn(B, 1, 5, 32, device=DEVICE, requires_grad=True)
        pk = torch.randn(1, 4, 32, device=DEVICE, requires_grad=True)
        out = fused(q, k, k, pk, pk)
        assert out.shape == q.shape
        gk, gpk = torch.autograd.grad(out.sum(), (k, pk))
        assert torch.equal(gk, torch.zeros_like(k)) and torch.equal(gpk, torch.zeros_like(pk))


def _gpu_config_cases():
    """One case per distinct set of GPU tiles the launchers can pick: (arch, dtype, head dim,
    candidate number); a candidate list shorter than the number repeats its last entry."""
    seen = set()
    for (arch, sixteen_bit, block_d) in tiles.CANDIDATES["fwd"]:
        dtype = torch.float16 if sixteen_bit else torch.float32
        D = {32: 32, 64: 64, 128: 80, 256: 256}[block_d]
        for i in range(max(len(tiles.candidates(k, arch, dtype, D)) for k in tiles.INTERPRETER)):
            picked = tuple(_nth_candidate(k, arch, dtype, D, i) for k in tiles.INTERPRETER)
            if (sixteen_bit, block_d, picked) not in seen:
                seen.add((sixteen_bit, block_d, picked))
                yield pytest.param(arch, dtype, D, i,
                                   id=f"sm{arch}-{'16bit' if sixteen_bit else 'fp32'}-D{D}-{i}")


def _nth_candidate(kernel, arch, dtype, D, i, candidates=tiles.candidates):
    cands = candidates(kernel, arch, dtype, D, tma=True)   # TMA tiles too (descriptors run here)
    return cands[min(i, len(cands) - 1)]


@pytest.mark.skipif(HAS_CUDA, reason="interpreter check of the GPU tiles; the GPU runs them")
@pytest.mark.parametrize("arch, dtype, D, i", list(_gpu_config_cases()))
def test_gpu_tile_configs_under_interpreter(monkeypatch, arch, dtype, D, i):
    # The interpreter normally runs one small config; here every launcher picks candidate i of
    # the tiles it would on a GPU of that arch (BLOCK_M up to 128, BLOCK_M != BLOCK_N) and sizes
    # its splits for that GPU's SMs, so the block bounds and split ranges are checked.
    original = tiles.candidates
    monkeypatch.setattr(tiles, "candidates",
                        lambda kernel, a, dt, d, drop=False, terms=False, tma=False: (
                            [_nth_candidate(kernel, a, dt, d, i, original)] if a is not None
                            else original(kernel, a, dt, d)))
    case = Case(1, 2, 1, 70, 150, D, 70, "shared", "left")
    with pretend_target(Target(arch, 132 if arch == 90 else 108)):
        check_against_reference(case, dtype)


@pytest.mark.parametrize("D, layout", [(64, "blhd"), (80, "bhld")])
def test_tma_forward_equals_pointer_loads(D, layout):
    # The Hopper path reads K/V tiles through tensor descriptors (bounds give the zeros that
    # masked loads give); under the interpreter it must give the pointer path's bits.
    case = Case(2, 4, 2, 37, 45, D, 19, "task", "right", layout=layout)
    (q, k, v, pk, pv), mask, index = make_inputs(case, torch.float16, requires_grad=False)
    assert fwd_kernels.tma_ready(pk, pv, k, v)
    spec = AttentionSpec(attention_mask=mask, prefix_index=index)
    outs = [fwd_kernels.prefix_attention_fwd(q, k, v, pk, pv, spec,
                                             config=tiles.TileConfig(32, 16, 4, 1, tma=tma))[0]
            for tma in (False, True)]
    assert torch.equal(outs[0], outs[1])
    # A row stride that is not a multiple of 16 bytes cannot be a descriptor: pointer loads.
    odd = torch.randn(2, 2, 45, D + 1, dtype=torch.float16, device=DEVICE)[..., :D]
    assert not fwd_kernels.tma_ready(pk, pv, odd, v)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [
    Case(2, 8, 2, 512, 512, 128, 64, "shared", "left"),
    Case(2, 8, 8, 1, 700, 64, 16, "task", "right", layout="blhd"),
    Case(2, 4, 1, 300, 300, 80, 1030, "row", "random", False),
    Case(1, 4, 2, 200, 200, 256, 33, "shared", "none", layout="blhd"),
], ids=str)
def test_gpu_matches_reference(case, dtype):
    check_against_reference(case, dtype)


@gpu
def test_gpu_fp32_tf32_and_ieee():
    case = Case(2, 4, 2, 130, 150, 64, 40, "shared", "right")
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        check_against_reference(case, torch.float32)
        torch.set_float32_matmul_precision("high")
        inputs, mask, index = make_inputs(case, torch.float32, requires_grad=False)
        got = fused(*inputs, attention_mask=mask)
        # tf32 keeps 10 mantissa bits: error ~1e-3 relative on each score.
        assert math.isfinite(got.abs().max().item())
        torch.testing.assert_close(got.double(), exact(*inputs, attention_mask=mask),
                                   atol=1e-2, rtol=1e-2)
    finally:
        torch.set_float32_matmul_precision(previous)
