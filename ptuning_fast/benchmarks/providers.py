"""The attention providers measured side by side (docs/design.md, "Performance targets").

Each provider's `setup(x, decode=...)` does the untimed part and returns a closure that computes
attention over [prefix K/V; K/V] once. Work that a real model would do once per forward for all
its layers (a dense mask, a block mask) is untimed; work done in every layer is timed.

- fused:      ptuning_fast's Triton kernel (`pf.prefix_attention(..., backend="triton")`).
              Decode (Lq = 1, no gradient): the split-key decode kernel, which the op picks itself.
- torch:      ptuning_fast's pure-PyTorch backend (`backend="torch"`, what "auto" runs on CPU):
              the shared prefix expanded as a view and concatenated once, SDPA with enable_gqa
              and a mask only as large as needed. Decode: the same call (the prefix is not in
              the cache, so it is concatenated every step).
- naive:      PEFT's way: a per-row copy of the prefix, torch.cat, a dense 4D bool mask (so SDPA
              leaves its flash path), GQA heads expanded (transformers' repeat_kv), SDPA.
              Decode: the cache already holds [per-row prefix; past tokens] and each step
              torch.cat's the new token onto it, as DynamicCache.update does.
- cat_sdpa:   concatenation at its best: the shared prefix expanded as a view, one cat, SDPA with
              causal_lower_right and enable_gqa (flash backend). Decode: a cache that holds the
              prefix already, so no cat at all.
- flex:       FlexAttention over the concatenation with a prefix-LM block mask (compiled on CUDA;
              eager forward on CPU, where FlexAttention has no backward).
- flash_attn: flash_attn_func over the concatenation, causal (bottom-right aligned), when installed.
              Decode: flash_attn_with_kvcache (FlashAttention's split-KV decoding) on a
              (B, P + Lk, Hkv, D) cache that holds the prefix already (its native layout).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .. import reference
from .case import Unavailable

PROVIDERS = ("fused", "torch", "naive", "cat_sdpa", "flex", "flash_attn")


@dataclass
class AttnInputs:
    q: torch.Tensor          # (B, Hq, Lq, D)
    k: torch.Tensor          # (B, Hkv, Lk, D)
    v: torch.Tensor
    prefix_k: torch.Tensor   # (Hkv, P, D), shared by every row
    prefix_v: torch.Tensor
    causal: bool = True


def _expand_prefix(prefix: torch.Tensor, batch: int) -> torch.Tensor:
    return prefix.unsqueeze(0).expand(batch, -1, -1, -1)


def _cat_prefix(x: AttnInputs) -> tuple[torch.Tensor, torch.Tensor]:
    B = x.q.shape[0]
    return (torch.cat([_expand_prefix(x.prefix_k, B), x.k], dim=2),
            torch.cat([_expand_prefix(x.prefix_v, B), x.v], dim=2))


def setup_fused(x: AttnInputs, *, decode: bool) -> Callable[[], torch.Tensor]:
    if x.q.device.type != "cuda":
        raise Unavailable("kernel timings need a GPU (on CPU the Triton kernels run only under "
                          "the interpreter, which is not worth timing)")
    return fused_attention(x)


def fused_attention(x: AttnInputs) -> Callable[[], torch.Tensor]:
    """The fused call itself (also checked against the reference under the interpreter)."""
    from .. import ops
    return lambda: ops.prefix_attention(x.q, x.k, x.v, x.prefix_k, x.prefix_v, causal=x.causal,
                                        backend="triton")


def setup_torch(x: AttnInputs, *, decode: bool) -> Callable[[], torch.Tensor]:
    from .. import ops
    return lambda: ops.prefix_attention(x.q, x.k, x.v, x.prefix_k, x.prefix_v, causal=x.causal,
                                        backend="torch")


def _sdpa_masked(q, k, v, mask):
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)      # transformers' repeat_kv: a materialized copy
    v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def setup_naive(x: AttnInputs, *, decode: bool) -> Callable[[], torch.Tensor]:
    B, _, Lq, _ = x.q.shape
    Lk, P = x.k.shape[2], x.prefix_k.shape[1]
    if decode:
        # PEFT's cache holds per-row copies of the prefix before the past tokens, and each step
        # torch.cat's the new token onto it. With one query and no padding transformers passes
        # no mask, so SDPA keeps its GQA path.
        past_k = torch.cat([_expand_prefix(x.prefix_k, B), x.k[:, :, :-Lq]], dim=2)
        past_v = torch.cat([_expand_prefix(x.prefix_v, B), x.v[:, :, :-Lq]], dim=2)
        new_k, new_v = x.k[:, :, -Lq:], x.v[:, :, -Lq:]

        def decode_step():
            k = torch.cat([past_k, new_k], dim=2)
            v = torch.cat([past_v, new_v], dim=2)
            return F.scaled_dot_product_attention(x.q, k, v, enable_gqa=True)
        return decode_step
    # Built once per forward and shared by every layer in transformers, hence untimed.
    mask = reference.visible_keys(B, Lq, Lk, P, causal=x.causal, attention_mask=None,
                                  device=x.q.device)

    def step():
        # PEFT runs its prefix encoder per row: B materialized copies (their gradients summed).
        k = torch.cat([x.prefix_k.unsqueeze(0).repeat(B, 1, 1, 1), x.k], dim=2)
        v = torch.cat([x.prefix_v.unsqueeze(0).repeat(B, 1, 1, 1), x.v], dim=2)
        return _sdpa_masked(x.q, k, v, mask)
    return step


def _flash_backend_usable(q, k, v) -> bool:
    if q.device.type != "cuda":
        return False
    from torch.backends.cuda import SDPAParams, can_use_flash_attention
    try:
        params = SDPAParams(q, k, v, None, 0.0, False, True)
    except TypeError:                       # torch < 2.5: SDPAParams has no enable_gqa
        return False
    return bool(can_use_flash_attention(params, False))


def setup_cat_sdpa(x: AttnInputs, *, decode: bool) -> Callable[[], torch.Tensor]:
    from torch.nn.attention.bias import causal_lower_right
    Lq, Lk, P = x.q.shape[2], x.k.shape[2], x.prefix_k.shape[1]
    if decode:
        k, v = _cat_prefix(x)               # the prefix sits in a preallocated cache: untimed
        bias = causal_lower_right(Lq, P + Lk) if (x.causal and Lq > 1) else None
        return lambda: F.scaled_dot_product_attention(x.q, k, v, attn_mask=bias, enable_gqa=True)
    # causal_lower_right's flash path takes GQA as it is; where flash cannot run, expand the heads
    # (SDPA's memory-efficient kernel has no GQA) rather than fall to the math path. The check
    # reads dtypes, head counts and strides, which the concatenation shares with k and v.
    expand_heads = x.q.device.type == "cuda" and not _flash_backend_usable(x.q, x.k, x.v)
    group = x.q.shape[1] // x.k.shape[1]
    bias = causal_lower_right(Lq, P + Lk) if x.causal else None

    def step():
        k, v = _cat_prefix(x)
        if expand_heads:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(x.q, k, v, attn_mask=bias,
                                              enable_gqa=not expand_heads)
    return step


_compiled_flex = None


def _flex_function(device: torch.device):
    from torch.nn.attention.flex_attention import flex_attention
    if device.type != "cuda":
        return flex_attention               # eager (scores materialized): CPU figures only
    global _compiled_flex
    if _compiled_flex is None:
        import torch._dynamo
        # One compiled graph per shape: the default limit (8) would silently fall back to eager.
        for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 512)
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def setup_flex(x: AttnInputs, *, decode: bool) -> Callable[[], torch.Tensor]:
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as e:
        raise Unavailable(f"FlexAttention is not in this torch: {e}") from e
    grads = any(t.requires_grad for t in (x.q, x.k, x.v, x.prefix_k, x.prefix_v))
    if grads and x.q.device.type != "cuda":
        raise Unavailable("FlexAttention has no backward on CPU")
    Lq, Lk, P = x.q.shape[2], x.k.shape[2], x.prefix_k.shape[1]
    offset = Lk - Lq

    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx < P) | (kv_idx - P <= q_idx + offset)

    # One block mask per forward, shared by every layer: untimed. Without causal masking every
    # key is visible and no block mask is needed.
    block_mask = (create_block_mask(prefix_lm, None, None, Lq, P + Lk, device=x.q.device)
                  if x.causal else None)
    flex = _flex_function(x.q.device)
    if decode:
        k, v = _cat_prefix(x)
        return lambda: flex(x.q, k, v, block_mask=block_mask, enable_gqa=True)

    def step():
        k, v = _cat_prefix(x)
        return flex(x.q, k, v, block_mask=block_mask, enable_gqa=True)
    return step


def setup_flash_attn(x: AttnInputs, *, decode: bool) -> Callable[[], torch.Tensor]:
    if importlib.util.find_spec("flash_attn") is None:
        raise Unavailable("flash_attn is not installed")
    if x.q.device.type != "cuda" or x.q.dtype not in (torch.float16, torch.bfloat16):
        raise Unavailable("flash_attn needs fp16/bf16 CUDA tensors")
    if decode:
        return _flash_attn_decode(x)
    from flash_attn import flash_attn_func

    def attend(k, v):
        # flash_attn takes (B, L, H, D); its causal mask is bottom-right aligned when Lq != Lk.
        out = flash_attn_func(x.q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                              causal=x.causal)
        return out.transpose(1, 2)
    return lambda: attend(*_cat_prefix(x))


def _flash_attn_decode(x: AttnInputs) -> Callable[[], torch.Tensor]:
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError as e:
        raise Unavailable(f"this flash_attn has no flash_attn_with_kvcache: {e}") from e
    # Untimed: a serving cache in flash_attn's layout, the prefix written into it once.
    k, v = (t.transpose(1, 2).contiguous() for t in _cat_prefix(x))
    q = x.q.transpose(1, 2).contiguous()
    return lambda: flash_attn_with_kvcache(q, k, v, causal=x.causal).transpose(1, 2)


SETUP = {"fused": setup_fused, "torch": setup_torch, "naive": setup_naive,
         "cat_sdpa": setup_cat_sdpa, "flex": setup_flex, "flash_attn": setup_flash_attn}


def setup(provider: str, x: AttnInputs, *, decode: bool = False) -> Callable[[], torch.Tensor]:
    return SETUP[provider](x, decode=decode)
