"""`torch.library.opcheck` on every custom op of ptuning_fast.fused: schema (no hidden mutation or
aliasing), autograd registration, fake (meta) implementations against the real ones, and AOT
dispatch with dynamic shapes (what torch.compile relies on)."""
import pytest
import torch
from conftest import DEVICE

import ptuning_fast.fused.prefix_attention as fused_attention
import ptuning_fast.fused.prompt_embedding as fused_embedding


def _attention_args(prefix, dropout, requires_grad=True):
    B, Hq, Hkv, Lq, Lk, P, D, T = 2, 4, 2, 5, 7, 3, 16, 3

    def rnd(*shape):
        return torch.randn(*shape, device=DEVICE, requires_grad=requires_grad)
    q, k, v = rnd(B, Hq, Lq, D), rnd(B, Hkv, Lk, D), rnd(B, Hkv, Lk, D)
    lead = {"shared": (), "task": (T,)}[prefix]
    pk, pv = rnd(*lead, Hkv, P, D), rnd(*lead, Hkv, P, D)
    mask = torch.rand(B, Lk, device=DEVICE) > 0.3
    index = torch.tensor([2, 0], device=DEVICE) if prefix == "task" else None
    seed = torch.tensor(1234, device=DEVICE) if dropout else None
    return (q, k, v, pk, pv, mask, index, True, D ** -0.5, 0.25 if dropout else 0.0, seed)


@pytest.mark.parametrize("prefix, dropout", [("shared", False), ("task", True)],
                         ids=["shared", "task-dropout"])
def test_prefix_attention_ops(prefix, dropout):
    args = _attention_args(prefix, dropout)
    torch.library.opcheck(fused_attention.prefix_attention_op, args)
    # The backward op on its own, with the forward's saved outputs.
    q, k, v, pk, pv, mask, index, causal, scale, p, seed = _attention_args(prefix, dropout,
                                                                           requires_grad=False)
    out, lse = fused_attention.prefix_attention_op(q, k, v, pk, pv, mask, index, causal, scale,
                                                   p, seed)
    grad_out = torch.randn_like(q)
    for needs in ([True] * 5, [False, False, False, True, True]):   # all; the prefix's only
        torch.library.opcheck(fused_attention.prefix_attention_bwd_op,
                              (grad_out, q, k, v, pk, pv, mask, index, out, lse, causal, scale,
                               needs, p, seed))


@pytest.mark.parametrize("prefix", ["shared", "task"])
def test_prefix_attention_decode_op(prefix):
    # Inference only (no autograd formula): inputs that need no gradient, a few queries.
    q, k, v, pk, pv, mask, index, causal, scale, _, _ = _attention_args(prefix, False,
                                                                       requires_grad=False)
    torch.library.opcheck(fused_attention.prefix_attention_decode_op,
                          (q[:, :, :2].contiguous(), k, v, pk, pv, mask, index, causal, scale))


@pytest.mark.parametrize("tasks", [None, 3])
def test_prompt_embedding_ops(tasks):
    B, L, V, d, P = 3, 4, 11, 16, 2
    ids = torch.randint(0, V, (B, L), device=DEVICE)
    weight = torch.randn(V, d, device=DEVICE, requires_grad=True)
    prompt = torch.randn(*(() if tasks is None else (tasks,)), P, d, device=DEVICE,
                         requires_grad=True)
    index = None if tasks is None else torch.tensor([2, 0, 2], device=DEVICE)
    torch.library.opcheck(fused_embedding.prompt_embedding_op, (ids, weight, prompt, index))
    grad_out = torch.randn(B, P + L, d, device=DEVICE)
    torch.library.opcheck(fused_embedding.prompt_grad_op,
                          (grad_out, index, tasks or 1, P, torch.float32))


def test_every_custom_op_is_checked():
    # A new custom op must be added above.
    namespace = torch.ops.ptuning_fast
    ops = {name for name in dir(namespace)
           if isinstance(getattr(namespace, name, None), torch._ops.OpOverloadPacket)}
    assert ops == {"prefix_attention", "prefix_attention_bwd", "prefix_attention_decode",
                   "prompt_embedding", "prompt_embedding_prompt_grad"}, ops
