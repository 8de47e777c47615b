"""The reference paths themselves, against explicit float64 loops written independently."""
import torch

from ptuning_fast import reference


def test_prompt_embedding_matches_explicit_rows():
    B, L, V, d, P, T = 3, 5, 17, 6, 4, 2
    ids = torch.randint(0, V, (B, L))
    weight = torch.randn(V, d, dtype=torch.float64)
    prompt = torch.randn(T, P, d, dtype=torch.float64)
    index = torch.tensor([1, 0, 1])
    out = reference.prompt_embedding(ids, weight, prompt, prompt_index=index)
    assert out.shape == (B, P + L, d)
    for b in range(B):
        for r in range(P):
            assert torch.equal(out[b, r], prompt[index[b], r])
        for j in range(L):
            assert torch.equal(out[b, P + j], weight[ids[b, j]])


def test_prompt_embedding_dtype_is_weights_and_upcast_is_float64():
    ids = torch.randint(0, 9, (2, 3))
    weight = torch.randn(9, 4, dtype=torch.float16)
    prompt = torch.randn(2, 4, dtype=torch.float32)
    assert reference.prompt_embedding(ids, weight, prompt).dtype == torch.float16
    assert reference.prompt_embedding(ids, weight, prompt, upcast=True).dtype == torch.float64


def test_prompt_embedding_shared_prompt_gradient_sums_rows():
    ids = torch.randint(0, 9, (5, 3))
    weight = torch.randn(9, 4)
    prompt = torch.randn(2, 4, requires_grad=True)
    grad = torch.randn(5, 5, 4)
    reference.prompt_embedding(ids, weight, prompt).backward(grad)
    assert torch.allclose(prompt.grad, grad[:, :2].sum(0))
