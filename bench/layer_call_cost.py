"""What one decoding step's attention call costs a model layer: ours (`prefix_attention_forward`,
the function transformers calls in every layer) against transformers' own SDPA function over the
[prefix; K/V] that PEFT's cache holds, on the bench's model (bench/NOTES.md, "Per-call host
cost"). At batch 1 the arithmetic is tiny and the figure is the host's cost per call, which is
what bounds a GPU's eager decoding loop at small and medium batches.

    PYTHONPATH=$PWD python bench/layer_call_cost.py            # CPU, one thread
    PYTHONPATH=$PWD python bench/layer_call_cost.py cuda       # a GPU: the calls' wall time

Candidates, each called with the arguments a layer got during a real generate() step:
- ours:            as the model calls it (every call checked: the memo of checked call
                   metadata that this script once compared was removed, NOTES "Per-call host
                   cost");
- transformers:    `sdpa_attention_forward` over the concatenation (PEFT's cached prefix).
Median over rounds of the mean of 200 calls, candidates in rotating order.
"""
from __future__ import annotations

import statistics
import sys
import time
import warnings

import torch

import ptuning_fast as pf
from ptuning_fast.benchmarks.models import build_base_model
from ptuning_fast.integrations import attention


def captured_decode_call(model, batch: int, device):
    """(module, q, k, v, mask, kwargs) of one layer's call in the first decoding step."""
    calls = []
    real = attention.prefix_attention_forward

    def spy(module, q, k, v, mask, **kwargs):
        if q.shape[2] == 1 and not calls:
            calls.append((module, q, k, v, mask, dict(kwargs)))
        return real(module, q, k, v, mask, **kwargs)

    from transformers import AttentionInterface
    AttentionInterface.register(attention.ATTN_IMPLEMENTATION, spy)
    try:
        ids = torch.randint(1, 4000, (batch, 64), device=device)
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2,
                       do_sample=False)
    finally:
        attention.register()                  # the real function again
    return calls[0]


def per_call_us(fns: dict, device, rounds: int = 15, calls: int = 200) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {name: [] for name in fns}
    for r in range(rounds):
        names = list(fns)[r % len(fns):] + list(fns)[:r % len(fns)]
        for name in names:
            fn = fns[name]
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def main(argv):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    warnings.simplefilter("ignore")
    device = torch.device(argv[0] if argv else "cpu")
    torch.set_num_threads(1)
    base = build_base_model(device, torch.float32 if device.type == "cpu" else torch.bfloat16)
    model = pf.wrap(base, pf.PrefixTuningConfig(num_virtual_tokens=16))
    print(f"device {device}; the bench model ({type(base).__name__}), prefix tuning P = 16, "
          "a decoding step against a 64-token prompt; us per call")
    print("| batch | ours | transformers' SDPA over [prefix; K] |")
    print("|---|---|---|")
    for batch in (1, 32):
        module, q, k, v, mask, kwargs = captured_decode_call(model, batch, device)
        pk, pv, _ = kwargs[attention.PREFIX_KWARG].for_layer(module.layer_idx, batch)
        k_cat = torch.cat([pk.expand(batch, -1, -1, -1), k], dim=2)
        v_cat = torch.cat([pv.expand(batch, -1, -1, -1), v], dim=2)

        def ours():
            return attention.prefix_attention_forward(module, q, k, v, mask, **kwargs)

        def sdpa():
            return sdpa_attention_forward(module, q, k_cat, v_cat, None,
                                          scaling=module.scaling, dropout=0.0)

        with torch.no_grad():
            us = per_call_us({"ours": ours, "sdpa": sdpa}, device)
        print(f"| {batch} | {us['ours']:.1f} | {us['sdpa']:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
