"""Work counts for throughput: FLOPs of attention counting only unmasked (query, key) pairs, and
the fewest bytes an op must move (each input read once, each output written once).

Conventions (FlashAttention's): a multiply-add is 2 FLOPs; the forward does two matrix products
per visible pair (Q K^T and P V), 4 * D FLOPs; the backward does five (recomputed Q K^T, dV, dP,
dQ, dK), 2.5x the forward, so forward + backward is 3.5x the forward.
"""
from __future__ import annotations

BACKWARD_OVER_FORWARD = 2.5


def visible_pairs(Lq: int, Lk: int, P: int, causal: bool) -> int:
    """Number of (query, key) pairs one (batch row, query head) attends to.

    Every query sees all P prefix keys; with causal masking (bottom-right aligned) query i sees
    sequence keys j <= i + (Lk - Lq), otherwise all Lk of them.
    """
    if not causal:
        return Lq * (P + Lk)
    offset = Lk - Lq
    # query i sees max(0, min(Lk, i + offset + 1)) sequence keys; i + offset + 1 <= Lk always.
    first_seeing = max(0, -offset)                 # the first query that sees any sequence key
    n = Lq - first_seeing                          # queries that see some: 1, 2, ... up to Lk
    lo = first_seeing + offset + 1
    seq = n * lo + n * (n - 1) // 2
    return Lq * P + seq


def attention_flops(B: int, Hq: int, Lq: int, Lk: int, P: int, D: int, causal: bool,
                    mode: str) -> float:
    fwd = 4 * D * B * Hq * visible_pairs(Lq, Lk, P, causal)
    if mode == "fwd":
        return float(fwd)
    if mode == "fwd_bwd":
        return fwd * (1 + BACKWARD_OVER_FORWARD)
    raise ValueError(f"mode must be 'fwd' or 'fwd_bwd', got {mode!r}")


def attention_fwd_bytes(B: int, Hq: int, Hkv: int, Lq: int, Lk: int, P: int, D: int,
                        element_size: int) -> int:
    """Forward: read q, k, v and the shared (Hkv, P, D) prefix K/V once, write the output."""
    q_and_out = 2 * B * Hq * Lq * D
    kv = 2 * B * Hkv * Lk * D
    prefix = 2 * Hkv * P * D
    return (q_and_out + kv + prefix) * element_size


def prompt_embedding_bytes(B: int, L: int, P: int, d: int, element_size: int,
                           id_size: int = 8) -> int:
    """Read the ids, the B * L gathered rows and the shared prompt; write (B, P + L, d)."""
    reads = B * L * id_size + B * L * d * element_size + P * d * element_size
    writes = B * (P + L) * d * element_size
    return reads + writes


def copy_bytes(numel: int, element_size: int) -> int:
    """A device copy reads and writes every byte."""
    return 2 * numel * element_size
