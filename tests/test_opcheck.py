"""`torch.library.opcheck` on every custom op of ptuning_fast.fused: schema (no hidden mutation or
aliasing), autograd registration, fake (meta) implementations against the real ones, and AOT
dispatch with dynamic shapes (what torch.compile relies on)."""
import pytest
import torch
from conftest import DEVICE

import ptuning_fast.fused.prefix_attention as fused_attention
import ptuning_fast.fused.prompt_embedding as fused_embedding
from ptuning_fast.kernels.attention_options import ATTENTION_OPTIONS, FLAT_PARAMS, AttentionSpec


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
                              (grad_out, q, k, v, pk, pv, out, lse, needs, mask, index, causal,
                               scale, p, seed))


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


def test_prefix_attention_op_schema_is_the_spec():
    """The op's parameters after q, k, v, prefix_k, prefix_v are AttentionSpec's flat fields,
    generated from it; a spec survives flat() / from_flat()."""
    names = [a.name for a in fused_attention.prefix_attention_op._opoverload._schema.arguments]
    assert names == ["q", "k", "v", "prefix_k", "prefix_v"] + [p.split()[1] for p in FLAT_PARAMS]
    segments = (torch.zeros(2, 3, dtype=torch.int32), torch.ones(2, 3, dtype=torch.int32))
    spec = AttentionSpec(causal=False, scale=0.5, segments=segments, window_size=(4, -1),
                         prefix_in_window=False, softcap=2.0)
    back = AttentionSpec.from_flat(spec.flat())
    assert {n: getattr(back, n) for n in ATTENTION_OPTIONS} == spec.options()
    assert AttentionSpec.from_flat(spec.flat()[:4]).options() == {
        **AttentionSpec().options(), "causal": False, "scale": 0.5}


def test_prefix_attention_op_with_every_term():
    """Bias, sinks and packed segments travel as tensor arguments of the generated schema."""
    B, Hq, Hkv, L, P, D = 2, 4, 2, 6, 3, 16
    q = torch.randn(B, Hq, L, D, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(B, Hkv, L, D, device=DEVICE, requires_grad=True) for _ in range(2))
    pk, pv = (torch.randn(Hkv, P, D, device=DEVICE, requires_grad=True) for _ in range(2))
    bias = torch.randn(1, Hq, L, P + L, device=DEVICE)
    sinks = torch.randn(Hq, device=DEVICE)
    start = torch.tensor([[0, 0, 0, 3, 3, 3]] * B, dtype=torch.int32, device=DEVICE)
    spec = AttentionSpec(bias=bias, sinks=sinks, segments=(start, start + 3),
                         window_size=(2, -1), softcap=5.0)
    torch.library.opcheck(fused_attention.prefix_attention_op, (q, k, v, pk, pv, *spec.flat()))
