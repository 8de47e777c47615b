"""transformers' attention keyword arguments -> `prefix_attention`'s attention terms.

Each model passes its extra attention terms to the registered attention function under its own
name: `sliding_window` (Mistral, Gemma 2/3, GPT-OSS), `softcap` (Gemma 2), `s_aux` (GPT-OSS's
sinks), `position_bias` (T5's relative position bias), and, for packed sequences,
`cu_seq_lens_q` / `cu_seq_lens_k` / `max_length_q` / `max_length_k`. `attention_terms` turns
them into the keyword arguments of `ptuning_fast.ops.layer_prefix_attention`, computed the way
PEFT's result sees them (its prefix sits in the KV cache just before the sequence), or raises a
clear error naming the model and the argument.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

# Keyword arguments that transformers' padding-free collators and FlashAttention's varlen path
# pass for packed sequences: the model wrapper turns them (or restarting position ids) into the
# binding's `segments`, once per forward.
PACKING_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
TERM_KWARGS = frozenset({"sliding_window", "softcap", "s_aux", "position_bias", *PACKING_KWARGS})


def attention_terms(module, binding, kwargs: dict, *, causal: bool, prefix_len: int,
                    key_len: int, query_len: int, name: str) -> dict:
    """The attention terms of one layer's call: window_size, softcap, sinks, bias, segments.
    `name` names the model in errors."""
    segments = None if binding is None else binding.segments
    given = ", ".join(f"`{n}`" for n in PACKING_KWARGS if kwargs.get(n) is not None)
    if given and segments is None:
        raise NotImplementedError(
            f"{name} passes {given} (packed sequences) to its attention, but the wrapper did "
            "not see them: pass cu_seq_lens_q/k to the wrapped model's forward, without an "
            "attention_mask or a cache")
    return dict(window_size=window_size(kwargs.get("sliding_window"), causal=causal,
                                        keys=prefix_len + key_len, name=name),
                softcap=softcap(kwargs.get("softcap"), name),
                sinks=sinks(kwargs.get("s_aux"), name),
                bias=position_bias(module, kwargs.get("position_bias"), prefix_len, query_len,
                                   name),
                segments=segments)


def window_size(sliding_window, *, causal: bool, keys: int, name: str) -> tuple[int, int]:
    """transformers' `sliding_window=W` lets query q see key k iff q - W < k <= q (masking_utils'
    `sliding_window_overlay`; FlashAttention gets window_size=(W - 1, ...)): left = W - 1. The
    prefix counts in the window (`prefix_in_window`, the default), as in PEFT's cache. A window
    that covers all `keys` (prefix included) is no window."""
    if sliding_window is None:
        return (-1, -1)
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) \
            or sliding_window < 1:
        raise ValueError(f"{name} passes sliding_window={sliding_window!r} to its attention; "
                         "expected a positive int (the window's length, the query included)")
    if sliding_window >= keys:
        return (-1, -1)
    if not causal:
        # transformers disagrees with itself on bidirectional windows (masking_utils: distance
        # <= W; Gemma 3's overlay: distance < W): refused rather than guessed.
        raise NotImplementedError(
            f"{name} asks for a bidirectional sliding window (sliding_window={sliding_window}, "
            f"{keys} keys); ptuning_fast computes causal sliding windows only")
    return (sliding_window - 1, -1)


def softcap(value, name: str) -> float:
    """Gemma 2's `attn_logit_softcapping` (None: off)."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} passes softcap={value!r} to its attention; expected a float "
                         "> 0 (or None: off)")
    return float(value)


def sinks(s_aux, name: str):
    """GPT-OSS's per-head sink logits (Hq,): frozen weights, so no gradient is computed."""
    if s_aux is None:
        return None
    if s_aux.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            f"{name}'s attention sinks (`s_aux`, shape {tuple(s_aux.shape)}) require grad; "
            "ptuning_fast computes no gradient for them (they are frozen weights of the base "
            "model: keep them frozen, as wrap() leaves them)")
    return s_aux.detach()


# T5-style relative position biases: every attention module that takes `position_bias` ->
# the module whose `relative_attention_bias` made it (the first layer of its stack and role),
# or None where no layer of that stack and role has one (T5 then passes zeros). Filled by
# `map_relative_bias_owners` when a model is wrapped; weak keys, as `generations._OWNER`.
_BIAS_OWNER: weakref.WeakKeyDictionary[nn.Module, nn.Module | None] = \
    weakref.WeakKeyDictionary()


def map_relative_bias_owners(base_model: nn.Module) -> None:
    """T5 computes its relative position bias in the first layer of each stack and hands it
    to the later layers, whose modules hold no bias table: note, for every module that may get
    `position_bias`, which module's table made it. Modules are grouped by their name without
    layer numbers (`decoder.block.layer.SelfAttention` vs `...EncDecAttention`)."""
    groups: dict[tuple, list[nn.Module]] = {}
    for full_name, m in base_model.named_modules():
        if hasattr(m, "has_relative_attention_bias") and callable(getattr(m, "compute_bias",
                                                                           None)):
            key = tuple(p for p in full_name.split(".") if not p.isdigit())
            groups.setdefault(key, []).append(m)
    for members in groups.values():
        owners = [m for m in members if m.has_relative_attention_bias]
        for m in members:
            _BIAS_OWNER[m] = m if m.has_relative_attention_bias else \
                (owners[0] if owners else None)


def position_bias(module, bias, prefix_len: int, query_len: int, name: str):
    """T5's `position_bias` (1 or B, H, Lq, Lk) over the sequence keys -> the bias over
    [prefix; sequence] keys that PEFT's cached prefix sees: its prefix occupies the first P
    cache positions, so T5 computes `compute_bias(Lq, P + Lk, past_seen_tokens=P + past)`
    (past = Lk - Lq cached real tokens). The sequence columns are the ones given; the prefix
    columns come from the table of the module that made the bias (zeros where T5 passes
    zeros). No gradient: the table is frozen."""
    if bias is None:
        return None
    if prefix_len == 0:
        return _frozen_bias(bias, name)
    if module not in _BIAS_OWNER:
        raise NotImplementedError(
            f"{name} passes `position_bias` (shape {tuple(bias.shape)}) from "
            f"{type(module).__name__}, which ptuning_fast cannot place over the prefix: it "
            "knows T5-style modules with `compute_bias` and `has_relative_attention_bias`")
    owner = _BIAS_OWNER[module]
    key_len = bias.shape[-1]
    if owner is None:
        prefix = bias.new_zeros(*bias.shape[:-1], prefix_len)
    else:
        weight = owner.relative_attention_bias.weight
        if weight.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(
                f"{name}'s relative attention bias ({type(owner).__name__}."
                "relative_attention_bias) requires grad; ptuning_fast computes no gradient for "
                "it (keep the base model frozen, as wrap() leaves it)")
        past = key_len - query_len
        with torch.no_grad():
            full = owner.compute_bias(query_len, prefix_len + key_len, device=bias.device,
                                      past_seen_tokens=prefix_len + past)
        prefix = full[..., :prefix_len].to(bias.dtype).expand(*bias.shape[:-1], prefix_len)
    return torch.cat([prefix, _frozen_bias(bias, name)], dim=-1)


def _frozen_bias(bias, name: str):
    # T5 marks its zero bias as requiring grad under gradient checkpointing (for reentrant
    # checkpoints); only a bias computed from trainable weights is refused.
    if bias.requires_grad and bias.grad_fn is not None and torch.is_grad_enabled():
        raise NotImplementedError(
            f"{name} passes a `position_bias` that requires grad (shape {tuple(bias.shape)}); "
            "ptuning_fast computes no gradient for it (keep the base model frozen)")
    return bias.detach()
