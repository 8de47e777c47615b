"""End-to-end A/B of the layer-call memo (`ops._layer_call_key` / `_LAYER_CALLS`): whole
generate() calls with the memo on against every layer call checked in full (the key forced to
None), on the bench model with prefix tuning P = 16, a 64-token prompt, 32 new tokens, greedy.
Candidates alternate within each round; median over rounds of seconds per generate().

    PYTHONPATH=$PWD python bench/layer_call_memo_ab.py            # CPU, one thread
"""
from __future__ import annotations

import statistics
import sys
import time
import warnings

import torch

import ptuning_fast as pf
from ptuning_fast import ops
from ptuning_fast.benchmarks.models import build_base_model


def main(argv):
    warnings.simplefilter("ignore")
    device = torch.device(argv[0] if argv else "cpu")
    rounds = int(argv[1]) if len(argv) > 1 else 9
    torch.set_num_threads(1)
    base = build_base_model(device, torch.float32 if device.type == "cpu" else torch.bfloat16)
    model = pf.wrap(base, pf.PrefixTuningConfig(num_virtual_tokens=16))
    real_key = ops._layer_call_key
    print(f"device {device}; {type(base).__name__} ({base.config.num_hidden_layers} layers), "
          f"prefix tuning P = 16, 64-token prompt, 32 new tokens; s per generate(), median of "
          f"{rounds} rounds")
    print("| batch | memo on | memo off | off / on |")
    print("|---|---|---|---|")
    for batch in (1, 4):
        ids = torch.randint(1, 4000, (batch, 64), device=device)

        def generate():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                           max_new_tokens=32, min_new_tokens=32, do_sample=False)
        times = {"on": [], "off": []}
        try:
            with torch.no_grad():
                generate()                                  # warm-up
                for r in range(rounds):
                    for name in (("on", "off") if r % 2 == 0 else ("off", "on")):
                        ops._layer_call_key = real_key if name == "on" else (lambda *a: None)
                        start = time.perf_counter()
                        generate()
                        times[name].append(time.perf_counter() - start)
        finally:
            ops._layer_call_key = real_key
        on, off = (statistics.median(times[n]) for n in ("on", "off"))
        ratios = sorted(b / a for a, b in zip(times["on"], times["off"]))
        print(f"| {batch} | {on:.4f} | {off:.4f} | {off / on:.3f} (per-round "
              f"{ratios[0]:.3f}-{ratios[-1]:.3f}) |")


if __name__ == "__main__":
    main(sys.argv[1:])
