"""The candidates for the "torch" backend's prefix attention, timed on this CPU (bench/NOTES.md,
"The torch backend"). One intra-op thread; each candidate's median process CPU time over rounds
that run every candidate once in rotating order; the error is the max abs difference of the
output from the float64 reference.

    PYTHONPATH=$PWD python bench/cpu_attention_alternatives.py

Candidates (all compute `reference.prefix_attention` with a shared (Hkv, P, D) prefix, causal):
- reference:      ptuning_fast.reference (per-row copies, cat, dense mask, repeated heads, eager
                  softmax): what backend="auto" ran on CPU before.
- peft:           providers.setup_naive — PEFT's way (per-row prefix copies, cat, dense 4D mask,
                  repeat_interleave'd GQA heads, SDPA).
- torch:          ptuning_fast.torch_path (expand + one cat, SDPA enable_gqa, bool mask
                  (1, 1, Lq, P + Lk)); decode: the group's queries stacked on the query axis.
- float_mask:     the same with an additive float mask (built per call, as the bool one).
- repeated_heads: the same with K/V heads repeated instead of enable_gqa.
- two_part:       no concatenation: SDPA's CPU flash kernel over the prefix and over the sequence,
                  each returning its log-sum-exp, merged; backward by the kernel's own backward
                  called with the merged output and log-sum-exp (FlashAttention's identity).
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from ptuning_fast import reference, torch_path
from ptuning_fast.benchmarks import providers

aten = torch.ops.aten


class TwoPart(torch.autograd.Function):
    """Attention over [prefix; sequence] as two flash calls merged by log-sum-exp (Lq == Lk, so
    the sequence part is SDPA's top-left causal)."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v):
        out_p, lse_p = aten._scaled_dot_product_flash_attention_for_cpu(q, prefix_k, prefix_v,
                                                                         0.0, False)
        out_s, lse_s = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)
        lse = torch.logaddexp(lse_p, lse_s)
        out = (out_p * (lse_p - lse).exp().unsqueeze(-1)
               + out_s * (lse_s - lse).exp().unsqueeze(-1))
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, prefix_k, prefix_v, out, lse = ctx.saved_tensors
        grad = grad.contiguous()
        dq_p, dpk, dpv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, prefix_k, prefix_v, out, lse, 0.0, False)
        dq_s, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, True)
        return dq_p + dq_s, dk, dv, dpk, dpv


def candidates(x: providers.AttnInputs, decode: bool) -> dict:
    B, Hq, Lq, D = x.q.shape
    Lk, P = x.k.shape[2], x.prefix_k.shape[1]
    group = Hq // x.k.shape[1]
    def visible():
        return torch_path.visible_mask(B, Lq, Lk, P, causal=True, attention_mask=None,
                                       device=x.q.device)

    def additive():
        mask = visible()
        return None if mask is None else torch.zeros(mask.shape).masked_fill(~mask, -torch.inf)

    def cat():
        return torch_path._per_row(x.prefix_k, None, B), torch_path._per_row(x.prefix_v, None, B)

    def concat():
        pk, pv = cat()
        return torch.cat([pk, x.k], 2), torch.cat([pv, x.v], 2)

    def float_mask():
        k, v = concat()
        return F.scaled_dot_product_attention(x.q, k, v, attn_mask=additive(), enable_gqa=True)

    def repeated_heads():
        k, v = concat()
        return F.scaled_dot_product_attention(x.q, k.repeat_interleave(group, 1),
                                              v.repeat_interleave(group, 1), attn_mask=visible())

    out = {"reference": lambda: reference.attend(x.q, x.k, x.v, x.prefix_k, x.prefix_v),
           "peft": providers.setup_naive(x, decode=decode),
           "torch": lambda: torch_path.prefix_attention(x.q, x.k, x.v, x.prefix_k, x.prefix_v),
           "float_mask": float_mask, "repeated_heads": repeated_heads}
    if not decode:
        out["two_part"] = lambda: TwoPart.apply(x.q, x.k, x.v, *cat())
    return out


def attention_inputs(B, Hq, Hkv, Lq, Lk, D, P, requires_grad: bool):
    """q, k, v in transformers' layout ((B, L, H, D) seen as (B, H, L, D)) and a shared
    (Hkv, P, D) prefix, random (seed 0)."""
    torch.manual_seed(0)
    q = torch.randn(B, Lq, Hq, D).transpose(1, 2).requires_grad_(requires_grad)
    k = torch.randn(B, Lk, Hkv, D).transpose(1, 2).requires_grad_(requires_grad)
    v = torch.randn(B, Lk, Hkv, D).transpose(1, 2).requires_grad_(requires_grad)
    pk = torch.randn(Hkv, P, D, requires_grad=requires_grad)
    pv = torch.randn(Hkv, P, D, requires_grad=requires_grad)
    return q, k, v, pk, pv


def measure(B, Hq, Hkv, Lq, Lk, D, P, backward: bool, rounds: int = 30):
    decode = Lq == 1
    q, k, v, pk, pv = attention_inputs(B, Hq, Hkv, Lq, Lk, D, P, backward)
    x = providers.AttnInputs(q, k, v, pk, pv)
    exact = reference.attend(q.double(), k.double(), v.double(), pk.double(), pv.double())
    grad = torch.randn(B, Hq, Lq, D)
    steps, errors = {}, {}
    for name, fn in candidates(x, decode).items():
        with torch.no_grad():
            errors[name] = (fn().double() - exact).abs().max().item()
        if backward:
            steps[name] = lambda fn=fn: torch.autograd.grad(fn(), [q, k, v, pk, pv], grad)
        else:
            steps[name] = lambda fn=fn: fn()
    with torch.set_grad_enabled(backward):
        medians = alternating_cpu_medians(steps, rounds)
    return {name: (medians[name], errors[name]) for name in steps}


def alternating_cpu_medians(steps: dict, rounds: int) -> dict:
    """name -> median process CPU ms of `steps[name]()`, after one warm-up call each, over
    `rounds` rounds that run every step once in rotating order (so load drifts hit all alike)."""
    times = {name: [] for name in steps}
    names = list(steps)
    for step in steps.values():
        step()
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.process_time()
            steps[name]()
            times[name].append((time.process_time() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    torch.set_num_threads(1)
    shapes = [  # B, Hq, Hkv, Lq, Lk, D, P: the bench model's heads, then a 1B-like layer
        (4, 8, 2, 128, 128, 32, 16), (2, 8, 2, 512, 512, 32, 64), (1, 32, 8, 512, 512, 64, 64),
        (4, 8, 2, 1, 96, 32, 16), (8, 32, 8, 1, 1024, 64, 64)]
    print("| shape | pass | " + " | ".join(["reference", "peft", "torch", "float_mask",
                                             "repeated_heads", "two_part"]) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        for backward in ((False,) if shape[3] == 1 else (False, True)):
            res = measure(*shape, backward=backward)
            B, Hq, Hkv, Lq, Lk, D, P = shape
            cells = [f"{res[n][0]:.3g} ms" if n in res else "–"
                     for n in ("reference", "peft", "torch", "float_mask", "repeated_heads",
                               "two_part")]
            worst = max(e for _, e in res.values())
            print(f"| B={B} H={Hq}:{Hkv} Lq={Lq} Lk={Lk} D={D} P={P} | "
                  f"{'fwd+bwd' if backward else 'fwd'} | " + " | ".join(cells)
                  + f" |  <!-- max err {worst:.1e} -->", flush=True)


if __name__ == "__main__":
    main()
