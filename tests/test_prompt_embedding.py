"""Fused prompt embedding vs ptuning_fast.reference: forward and both gradients."""
import pytest
import torch
from conftest import DEVICE, KERNEL_DTYPES, assert_close, gpu, poison_like
from hypothesis import given, settings
from hypothesis import strategies as st

import ptuning_fast as pf
from ptuning_fast import reference

# (B, L, V, d, P, T): P = 0 and 1, d not a power of two, L = 1, B = 1, d > one column block,
# T = None for a shared prompt.
SHAPES = [
    (3, 7, 50, 40, 5, None),
    (1, 1, 11, 16, 0, None),
    (2, 1, 9, 24, 1, None),
    (1, 13, 33, 100, 7, None),
    (4, 9, 30, 100, 3, 3),
    (5, 4, 20, 1100, 2, 2),      # d > 1024: several column blocks per row
    (2, 3, 20, 48, 300, None),   # P larger than one row block
    (3, 5, 20, 40, 4, 9),        # more prompts than rows: most get a zero gradient
]


def make_inputs(B, L, V, d, P, T, dtype, prompt_dtype=torch.float32, weight_grad=True):
    ids = torch.randint(0, V, (B, L), device=DEVICE)
    weight = torch.randn(V, d, dtype=dtype, device=DEVICE, requires_grad=weight_grad)
    shape = (P, d) if T is None else (T, P, d)
    prompt = torch.randn(shape, dtype=prompt_dtype, device=DEVICE, requires_grad=True)
    index = None if T is None else torch.randint(0, T, (B,), device=DEVICE)
    return ids, weight, prompt, index


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype):
    ids, weight, prompt, index = make_inputs(*shape, dtype)
    out = pf.prompt_embedding(ids, weight, prompt, prompt_index=index, backend="triton")
    ref = reference.prompt_embedding(ids, weight, prompt, prompt_index=index)
    assert out.dtype == weight.dtype and out.shape == ref.shape
    # A gather and a copy: exact, whatever the dtype.
    assert torch.equal(out, ref)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (weight, prompt), grad)
    want = torch.autograd.grad(ref, (weight, prompt), grad)
    for name, g, w in zip(("weight", "prompt"), got, want):
        assert g.dtype == w.dtype
        assert_close(g, w, dtype, "grad", name=f"d{name}")


def test_output_fully_written():
    ids, weight, prompt, index = make_inputs(3, 5, 17, 72, 4, 2, torch.float32)
    from ptuning_fast.kernels.prompt_embedding import prompt_embedding_fwd
    out = poison_like(torch.empty(3, 9, 72, device=DEVICE))
    prompt_embedding_fwd(ids, weight.detach(), prompt.detach(), index, out=out)
    assert torch.equal(out, reference.prompt_embedding(ids, weight, prompt, prompt_index=index))


def test_frozen_weight_gets_no_grad_and_prompt_grad_sums_rows():
    ids, weight, prompt, _ = make_inputs(4, 3, 10, 16, 2, None, torch.float32, weight_grad=False)
    out = pf.prompt_embedding(ids, weight, prompt, backend="triton")
    out.sum().backward()
    assert weight.grad is None
    assert torch.equal(prompt.grad, torch.full_like(prompt, 4.0))   # 4 rows used the prompt


def test_mixed_tasks_equal_each_row_alone():
    ids, weight, prompt, index = make_inputs(5, 6, 40, 32, 3, 3, torch.float32)
    out = pf.prompt_embedding(ids, weight, prompt, prompt_index=index, backend="triton")
    for b in range(5):
        alone = pf.prompt_embedding(ids[b:b + 1], weight, prompt[index[b]], backend="triton")
        assert torch.equal(out[b:b + 1], alone)


def test_unused_task_gets_zero_grad():
    ids, weight, prompt, _ = make_inputs(3, 2, 10, 16, 2, 4, torch.float32)
    index = torch.tensor([0, 2, 0], device=DEVICE)
    pf.prompt_embedding(ids, weight, prompt, prompt_index=index, backend="triton").sum().backward()
    assert torch.equal(prompt.grad[1], torch.zeros_like(prompt.grad[1]))
    assert torch.equal(prompt.grad[0], torch.full_like(prompt.grad[0], 2.0))


def test_non_contiguous_inputs():
    ids = torch.randint(0, 30, (6, 5), device=DEVICE).t()            # (5, 6), strided
    weight = torch.randn(30, 40, device=DEVICE)[:, ::2]               # last dim stride 2
    prompt = torch.randn(3, 7, 20, device=DEVICE).transpose(0, 1)[:, 1]  # (7, 20) strided rows
    prompt.requires_grad_(True)
    out = pf.prompt_embedding(ids, weight, prompt, backend="triton")
    assert torch.equal(out, reference.prompt_embedding(ids, weight, prompt))


def test_deterministic_backward():
    ids, weight, prompt, index = make_inputs(7, 5, 20, 48, 6, 3, torch.float16)
    out = pf.prompt_embedding(ids, weight, prompt, prompt_index=index, backend="triton")
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, prompt, grad, retain_graph=True)[0]
    second = torch.autograd.grad(out, prompt, grad)[0]
    assert torch.equal(first, second)


def test_int32_ids_and_index():
    ids, weight, prompt, index = make_inputs(3, 4, 25, 16, 2, 2, torch.float32)
    out = pf.prompt_embedding(ids.int(), weight, prompt, prompt_index=index.int(), backend="triton")
    assert torch.equal(out, reference.prompt_embedding(ids, weight, prompt, prompt_index=index))


def test_auto_backend_on_cpu_equals_reference():
    ids, weight, prompt, _ = make_inputs(2, 3, 10, 8, 2, None, torch.float32)
    out = pf.prompt_embedding(ids.cpu(), weight.cpu(), prompt.cpu())
    assert torch.equal(out, reference.prompt_embedding(ids.cpu(), weight.cpu(), prompt.cpu()))


def test_torch_compile_fullgraph():
    ids, weight, prompt, index = make_inputs(3, 4, 12, 16, 2, 2, torch.float32, weight_grad=False)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss_fn(ids, weight, prompt, index):
        return pf.prompt_embedding(ids, weight, prompt, prompt_index=index, backend="triton").square().sum()

    loss_fn(ids, weight, prompt, index).backward()
    compiled_grad = prompt.grad.clone()
    prompt.grad = None
    reference.prompt_embedding(ids, weight, prompt, prompt_index=index).square().sum().backward()
    assert_close(compiled_grad, prompt.grad, torch.float32, "grad", name="dprompt")


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 4), L=st.integers(1, 9), V=st.integers(1, 40), d=st.integers(1, 70),
       P=st.integers(0, 9), T=st.one_of(st.none(), st.integers(1, 3)),
       dtype=st.sampled_from([torch.float32, torch.float16]))
def test_property_random_shapes(B, L, V, d, P, T, dtype):
    ids, weight, prompt, index = make_inputs(B, L, V, d, P, T, dtype, prompt_dtype=dtype)
    out = pf.prompt_embedding(ids, weight, prompt, prompt_index=index, backend="triton")
    ref = reference.prompt_embedding(ids, weight, prompt, prompt_index=index)
    assert torch.equal(out, ref)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, prompt, grad)[0]
    want = torch.autograd.grad(ref, prompt, grad)[0]
    assert_close(got, want, dtype, "grad", name="dprompt")


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_llama_sized(dtype):
    # Llama-3.2-1B's embedding width, a 32k vocabulary, a mixed-task batch.
    ids, weight, prompt, index = make_inputs(8, 512, 32000, 2048, 64, 4, dtype,
                                             prompt_dtype=torch.float32, weight_grad=False)
    out = pf.prompt_embedding(ids, weight, prompt, prompt_index=index)
    ref = reference.prompt_embedding(ids, weight, prompt, prompt_index=index)
    assert torch.equal(out, ref)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, prompt, grad)[0]
    want = torch.autograd.grad(ref, prompt, grad)[0]
    assert_close(got, want, torch.float32, "grad", name="dprompt")
