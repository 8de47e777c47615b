"""The torch path's merged prefix/sequence attention on CPU (`torch_path._merged`) against the
concatenation it replaces, per attention call, no gradient (bench/NOTES.md, "Static KV cache and
compiled decoding"): decoding steps at growing cache sizes and causal prefills at growing lengths,
shared (Hkv, P, D) prefix, fp32, one intra-op thread, median process CPU time over rounds that run
both candidates in rotating order. "concatenated" is the same call with the thresholds raised out
of reach.

    PYTHONPATH=$PWD python bench/cpu_merged_attention.py
"""
from __future__ import annotations

import torch
from cpu_attention_alternatives import alternating_cpu_medians

from ptuning_fast import torch_path
from ptuning_fast.kernels.attention_options import AttentionSpec

# B, Hq, Hkv, Lq, Lk, P, D, padded
DECODES = [(4, 8, 2, 1, 256, 16, 32, False), (4, 8, 2, 1, 1024, 16, 32, False),
           (4, 8, 2, 1, 4096, 64, 32, False), (8, 32, 8, 1, 128, 64, 64, False),
           (8, 32, 8, 1, 1024, 64, 64, False), (1, 32, 8, 1, 4096, 64, 64, False)]
PREFILLS = [(4, 8, 2, L, L, 16, 32, padded) for L in (128, 256, 512, 1024)
            for padded in (False, True)]


def measure(B, Hq, Hkv, Lq, Lk, P, D, padded, rounds):
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, h, n, D) for h, n in ((Hq, Lq), (Hkv, Lk), (Hkv, Lk)))
    pk, pv = torch.randn(Hkv, P, D), torch.randn(Hkv, P, D)
    mask = None
    if padded:                          # left padding of 0, 1/8, 1/4, ... of the row
        mask = torch.ones(B, Lk, dtype=torch.long)
        for b in range(B):
            mask[b, :b * Lk // 8] = 0

    def call():
        return torch_path.prefix_attention(q, k, v, pk, pv,
                                           AttentionSpec(attention_mask=mask))

    def with_thresholds(threshold):
        """`call` with both merge thresholds at `threshold` (0: always merged)."""
        saved = torch_path.MERGED_DECODE_MIN_ELEMENTS, torch_path.MERGED_PREFILL_MIN_QUERIES
        torch_path.MERGED_DECODE_MIN_ELEMENTS = torch_path.MERGED_PREFILL_MIN_QUERIES = threshold
        try:
            return call()
        finally:
            torch_path.MERGED_DECODE_MIN_ELEMENTS, torch_path.MERGED_PREFILL_MIN_QUERIES = saved

    def concatenated():
        return with_thresholds(1 << 62)

    def merged():
        return with_thresholds(0)

    with torch.no_grad():
        err = (merged() - concatenated()).abs().max().item()
        medians = alternating_cpu_medians({"merged": merged, "concatenated": concatenated},
                                          rounds)
    return medians["merged"], medians["concatenated"], err


def main():
    torch.set_num_threads(1)
    print("| call | shape | cached elements | merged | concatenated | concatenated / merged |")
    print("|---|---|---|---|---|---|")
    for shape in DECODES + PREFILLS:
        B, Hq, Hkv, Lq, Lk, P, D, padded = shape
        rounds = 200 if B * Hkv * Lk * D * max(Lq // 64, 1) < 300_000 else 15
        m, c, err = measure(*shape, rounds=rounds)
        kind = "decode" if Lq == 1 else "prefill" + (", padded" if padded else "")
        print(f"| {kind} | B={B} H={Hq}:{Hkv} Lq={Lq} Lk={Lk} P={P} D={D} | {B * Hkv * Lk * D:,} "
              f"| {m:.3g} ms | {c:.3g} ms | {c / m:.2f}x |  <!-- max diff {err:.1e} -->",
              flush=True)


if __name__ == "__main__":
    main()
