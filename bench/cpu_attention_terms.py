"""The "torch" backend against the reference with the attention terms models use, timed on this
CPU (bench/NOTES.md, "The torch backend"): what backend="auto" runs on CPU with these terms now
(torch) against what it ran before (reference). Method as bench/cpu_attention_alternatives.py:
one intra-op thread, median process CPU time over rounds that run every candidate once in
rotating order; the error is the max abs difference of the output from the float64 reference.

    PYTHONPATH=$PWD python bench/cpu_attention_terms.py

Shapes: a training step (Lq = Lk = 128, fwd and fwd+bwd) and a decode step (Lq = 1 against a
128-token cache, fwd). Cases (causal, shared (Hkv, P, D) prefix, transformers' transposed
layout, fp32):
- mistral-4096: Mistral's default sliding_window=4096: a window in use that hides no key here.
- mistral-64:   sliding_window=64 (window_size=(63, -1)), the prefix counted in the window.
- gemma2:       Gemma 2's attn_logit_softcapping=50.
- gpt-oss:      GPT-OSS's per-head sink logits.
- plain:        no term (the torch path's SDPA call as before, for scale).
Candidates: reference (`reference.attend`), torch (`torch_path.prefix_attention`).
"""
from __future__ import annotations

import torch
from cpu_attention_alternatives import alternating_cpu_medians, attention_inputs

from ptuning_fast import reference, torch_path
from ptuning_fast.kernels.attention_options import AttentionSpec

TERMS = {
    "plain": lambda Hq: {},
    "mistral-4096": lambda Hq: {"window_size": (4095, -1)},
    "mistral-64": lambda Hq: {"window_size": (63, -1)},
    "gemma2": lambda Hq: {"softcap": 50.0},
    "gpt-oss": lambda Hq: {"sinks": torch.randn(Hq)},
}


def measure(terms_name, B, Hq, Hkv, Lq, Lk, D, P, backward: bool, rounds: int = 100):
    inputs = attention_inputs(B, Hq, Hkv, Lq, Lk, D, P, backward)
    spec = AttentionSpec(**TERMS[terms_name](Hq))
    fns = {"reference": lambda: reference.attend(*inputs, spec),
           "torch": lambda: torch_path.prefix_attention(*inputs, spec)}
    with torch.no_grad():
        exact = reference.attend(*(t.double() for t in inputs), spec)
        errors = {n: (fn().double() - exact).abs().max().item() for n, fn in fns.items()}
    grad = torch.randn(B, Hq, Lq, D)
    if backward:
        steps = {n: lambda fn=fn: torch.autograd.grad(fn(), inputs, grad) for n, fn in fns.items()}
    else:
        steps = fns
    with torch.set_grad_enabled(backward):
        medians = alternating_cpu_medians(steps, rounds)
    return {n: (medians[n], errors[n]) for n in fns}


def main():
    torch.set_num_threads(1)
    # B, Hq, Hkv, Lq, Lk, D, P: the bench model's heads, a training step then one decode step
    # against a 128-token cache.
    shapes = [(4, 8, 2, 128, 128, 32, 16), (4, 8, 2, 1, 128, 32, 16)]
    print("| shape | case | pass | reference | torch | reference / torch |")
    print("|---|---|---|---|---|---|")
    for shape in shapes:
        B, Hq, Hkv, Lq, Lk, D, P = shape
        label = f"B={B} H={Hq}:{Hkv} Lq={Lq} Lk={Lk} D={D} P={P}"
        for name in TERMS:
            for backward in ((False,) if Lq == 1 else (False, True)):
                res = measure(name, *shape, backward=backward)
                (ref, ref_err), (fast, fast_err) = res["reference"], res["torch"]
                print(f"| {label} | {name} | {'fwd+bwd' if backward else 'fwd'} | {ref:.3g} ms | "
                      f"{fast:.3g} ms | {ref / fast:.2f}x |  <!-- max err reference "
                      f"{ref_err:.1e}, torch {fast_err:.1e} -->", flush=True)


if __name__ == "__main__":
    main()
