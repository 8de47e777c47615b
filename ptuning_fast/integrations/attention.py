"""Prefix attention inside transformers models, through `AttentionInterface` and
`AttentionMaskInterface` (no model class is patched).

A wrapped model's config selects `ATTN_IMPLEMENTATION`. Each layer's attention then calls
`prefix_attention_forward`, which reads that layer's (Hkv, P, D) prefix from a `PrefixBinding`:
passed as the forward keyword argument `PREFIX_KWARG` (transformers forwards extra model kwargs
down to the attention function, also under gradient checkpointing), or — during `generate()`,
which rejects unknown kwargs — from the `Generation` that the wrapper makes current for its own
base model (the registry in `generations`).
The prefixes never enter the KV cache: the cache holds real tokens only, so the mask function
hands the 2D padding mask over (cache + current) keys through (cut to the keys a sliding-window
cache layer kept), and causal masking is bottom-right aligned inside `prefix_attention`. The
models' other attention terms (windows, soft-capping, sinks, T5's position bias, packed
sequences) are translated in `attention_terms`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..prompts import LayerPrefixes
from . import attention_terms
from .generations import current_generation

ATTN_IMPLEMENTATION = "ptuning_fast"
PREFIX_KWARG = "ptuning_prefix"

# Keyword arguments that transformers passes to attention functions and that do not change the
# result, as passed by the tested models (Llama, Qwen2/3, Mistral, Gemma 1/2/3, GPT-OSS, BERT,
# RoBERTa, GPT-2) in transformers 5.17 - 5.24: position ids (RoPE was applied before the call;
# packed sequences reach the layers as the binding's segments), cache flags and positions (the
# cache is already merged into key/value; older 5.x releases forward `cache_position`), and
# model-level flags or loss arguments that ride along in **kwargs.
HARMLESS_KWARGS = frozenset({
    "position_ids", "use_cache", "cache_position", "past_key_values", "past_key_value",
    "num_items_in_batch", "output_hidden_states", "output_router_logits", "return_dict",
})
# Computed here (or refused, when their value asks for something the kernels cannot do):
# sliding windows, soft-capping, sinks, T5's position bias and packed-sequence lengths are
# translated in `attention_terms`.
HANDLED_KWARGS = frozenset({PREFIX_KWARG, "is_causal", "output_attentions"}) \
    | attention_terms.TERM_KWARGS


@dataclass
class PrefixBinding:
    """What the attention function needs: the prefixes, the per-row task ids, the backend."""
    prefixes: LayerPrefixes | None
    task_ids: torch.Tensor | None
    backend: str
    model_name: str = "the model"     # for error messages: the wrapped model's class
    # attention module -> index of its prefix layer, for models where only some attention
    # modules get a prefix (encoder-decoders: the decoder's self-attention); None: every
    # attention module gets layer `module.layer_idx`'s.
    layer_of: dict | None = None
    # Packed sequences: `ptuning_fast.packing.packed_segments(...)` (start, end), int32 (B, L),
    # computed once per forward by the wrapper and read by every layer.
    segments: tuple[torch.Tensor, torch.Tensor] | None = None
    # Shared prompt pass (integrations/shared_prompt.py): keeps (key, value) per layer as each
    # layer's attention got them; None: nothing kept.
    captured: "CapturedKV | None" = None
    # Packed prompt tuning / P-Tuning (integrations/packed_inputs.py): the first `row_prompt`
    # positions of every row are its prompt, which every packed sequence of the row attends to
    # as a prefix; the `segments` cover the tokens after it. 0: no prompt in the row.
    row_prompt: int = 0
    # The `seq_idx` (B, L) the wrapper checked against the segments: the one the layers may pass.
    seq_idx: torch.Tensor | None = None

    def layer_index(self, module) -> int | None:
        """The prefix layer `module` attends to, or None for no prefix."""
        if self.layer_of is not None:
            return self.layer_of.get(module)
        if getattr(module, "layer_idx", None) is None:
            raise ValueError(f"{type(module).__name__} has no `layer_idx`: ptuning_fast cannot "
                             "tell which layer's prefix it needs")
        return module.layer_idx

    def for_layer(self, layer_idx: int, batch: int):
        """(prefix_k, prefix_v, prefix_index) for one layer and a batch of `batch` rows."""
        if self.prefixes is None:
            return None, None, None
        k, v = self.prefixes.layer(layer_idx)
        if self.prefixes.num_tasks == 1:
            return k, v, None
        ids = self.task_ids
        if ids.shape[0] != batch:
            # generate() expands every row into num_beams * num_return_sequences consecutive
            # rows (repeat_interleave); each copy keeps its row's task.
            if batch % ids.shape[0]:
                raise ValueError(f"task_ids has {ids.shape[0]} rows but the attention batch has "
                                 f"{batch}; expected a multiple")
            ids = ids.repeat_interleave(batch // ids.shape[0])
        return k, v, ids


class CapturedKV:
    """Layer index -> (key, value), filled by the attention function. A plain class, not a dict:
    FSDP2 and other pytree walkers rebuild the dicts and dataclasses they find in a layer's
    kwargs (casting their tensors), which would drop what later layers write."""

    def __init__(self):
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _model_name(module, binding) -> str:
    return f"{binding.model_name} ({type(module).__name__})" if binding is not None \
        else type(module).__name__


def _refuse_unknown_kwargs(module, binding, kwargs) -> None:
    """A keyword argument that may change the attention (T5's position_bias, GPT-OSS's sinks
    `s_aux`, packed-sequence lengths, ...) is refused, never dropped. None means "not used".
    `seq_idx` (padding-free collators' sequence number per token) only restates the packed
    segments: accepted where it is the one the wrapper checked against them."""
    unknown = sorted(n for n, v in kwargs.items()
                     if v is not None and n not in HARMLESS_KWARGS and n not in HANDLED_KWARGS
                     and not (n == "seq_idx" and binding is not None and v is binding.seq_idx))
    if unknown:
        given = ", ".join(f"`{n}`={_short(kwargs[n])}" for n in unknown)
        raise NotImplementedError(
            f"{_model_name(module, binding)} passes {given} to its attention; ptuning_fast's "
            "prefix attention cannot compute it and will not drop it (the result would be "
            f"wrong). It computes {sorted(HANDLED_KWARGS - {PREFIX_KWARG})}; harmless "
            f"arguments it ignores: {sorted(HARMLESS_KWARGS)}")


def _short(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def prefix_attention_forward(module, query, key, value, attention_mask, scaling=None,
                             dropout=0.0, **kwargs):
    """transformers attention function: query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D) ->
    ((B, Lq, Hq, D), None). `attention_mask` is the 2D padding mask over the Lk real keys.
    `dropout` (transformers passes the attention dropout in training mode, 0 in eval) drops
    attention probabilities, prefix columns included, with a seed drawn from torch's generator."""
    binding = kwargs.get(PREFIX_KWARG)
    if binding is None:
        generation = current_generation(module)
        binding = None if generation is None else generation.binding
    _refuse_unknown_kwargs(module, binding, kwargs)
    if kwargs.get("output_attentions"):
        raise NotImplementedError("ptuning_fast attention does not return attention weights "
                                  "(output_attentions=True)")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"ptuning_fast attention expects the 2D padding mask (B, Lk), got shape "
            f"{tuple(attention_mask.shape)}; 4D masks are not supported")
    if attention_mask is not None and attention_mask.shape[-1] < key.shape[2]:
        # A static cache's prefill: the mask covers the written slots (`_static_cache_mask`).
        written = attention_mask.shape[-1]
        key, value = key[:, :, :written], value[:, :, :written]
    if torch.is_autocast_enabled(query.device.type):
        # Autocast skips custom ops but casts the attention transformers would run (SDPA, eager's
        # matmuls) to its dtype: do the same. Inputs may arrive mixed: RoPE with fp32 cos/sin
        # keeps q/k in fp32 while v is v_proj's bf16 output (before 5.24, transformers' KV cache
        # cast v to k's dtype, which hid this whenever a cache was in use).
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    prefix_k = prefix_v = prefix_index = None
    backend = "auto"
    if binding is not None:
        index = binding.layer_index(module)
        if index is not None:
            prefix_k, prefix_v, prefix_index = binding.for_layer(index, query.shape[0])
        backend = binding.backend
        if prefix_k is not None and prefix_k.dtype != query.dtype:   # e.g. under autocast
            prefix_k, prefix_v = prefix_k.to(query.dtype), prefix_v.to(query.dtype)
    # transformers lets a call override the module's causality (decoders used as encoders).
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True)) if causal is None else causal
    if binding is not None and binding.row_prompt:
        out = _row_prompt_attention(module, binding, query, key, value, attention_mask, kwargs,
                                    causal=causal, scale=scaling, dropout=float(dropout or 0.0))
        return out.transpose(1, 2).contiguous(), None
    terms = attention_terms.attention_terms(
        module, binding, kwargs, causal=causal,
        prefix_len=0 if prefix_k is None else prefix_k.shape[-2], key_len=key.shape[2],
        query_len=query.shape[2], name=_model_name(module, binding))
    if binding is not None and binding.captured is not None:
        binding.captured.layers[index] = (key, value)
    out = ops.layer_prefix_attention(query, key, value, prefix_k, prefix_v, causal=causal,
                                     attention_mask=attention_mask, scale=scaling,
                                     prefix_index=prefix_index, backend=backend,
                                     dropout_p=float(dropout or 0.0), **terms)
    return out.transpose(1, 2).contiguous(), None


def _row_prompt_attention(module, binding, query, key, value, attention_mask, kwargs, *,
                          causal, scale, dropout):
    """Packed prompt tuning: each row is [prompt (P); packed sequences]. The prompt positions
    attend causally among themselves; every sequence attends to the prompt's keys and values as
    a per-row prefix, then to itself only (the binding's segments) — what each sequence sees in
    its own row behind the prompt. (B, Hq, P + L, D)."""
    P = binding.row_prompt
    name = _model_name(module, binding)
    if attention_mask is not None or query.shape[2] != key.shape[2] or not causal:
        raise NotImplementedError(
            f"{name}: packed prompt tuning runs causal self-attention without an attention "
            f"mask or a cache; got a mask: {attention_mask is not None}, {query.shape[2]} "
            f"queries over {key.shape[2]} keys, causal={causal}")
    prompt_q, prompt_k, prompt_v = query[:, :, :P], key[:, :, :P], value[:, :, :P]
    terms = attention_terms.attention_terms(module, binding, kwargs, causal=True, prefix_len=P,
                                            key_len=key.shape[2] - P,
                                            query_len=query.shape[2] - P, name=name)
    if terms["bias"] is not None:
        raise NotImplementedError(f"{name} passes `position_bias`: packed prompt tuning "
                                  "supports decoder-only models without a position bias")
    alone = dict(terms, segments=None, window_size=attention_terms.window_size(
        kwargs.get("sliding_window"), causal=True, keys=P, name=name))
    common = dict(causal=True, scale=scale, backend=binding.backend, dropout_p=dropout)
    prompt_out = ops.layer_prefix_attention(prompt_q, prompt_k, prompt_v, **common, **alone)
    tokens_out = ops.layer_prefix_attention(query[:, :, P:], key[:, :, P:], value[:, :, P:],
                                            prompt_k, prompt_v, **common, **terms)
    return torch.cat([prompt_out, tokens_out], dim=2)


def padding_mask_passthrough(batch_size=None, q_length=None, kv_length=None, q_offset=0,
                             kv_offset=0, attention_mask=None, **kwargs):
    """transformers mask function: returns the 2D padding mask (B, kv_length) over the keys the
    attention function gets (or None); causality, windows, packing and the prefix are handled
    inside the attention function. A sliding-window cache layer keeps only its last keys: then
    kv_offset > 0 and the mask (over every token seen) is cut to the kept ones. A static cache
    hands over its whole buffer of kv_length slots, of which q_offset + q_length are written:
    see `_static_cache_mask`.

    On CPU a mask without padding becomes None: one check per forward, where every layer would
    otherwise build and apply a (B, 1, 1, P + Lk) mask that hides nothing (a sizeable part of a
    decode step's layer call: bench/NOTES.md, "Per-call host cost"). On a GPU the check would be a host sync per forward,
    and under torch.compile a data-dependent branch: there the mask stays."""
    if _is_static_cache(q_length, kv_length, q_offset, kv_offset, kwargs.get("config")):
        return _static_cache_mask(batch_size, q_length, kv_length, q_offset + q_length,
                                  attention_mask, kwargs.get("device"))
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[-1] != kv_offset + kv_length:
        raise ValueError(
            f"ptuning_fast attention needs a 2D padding mask over all {kv_offset + kv_length} "
            f"tokens (cache + current), got shape {tuple(attention_mask.shape)} (kv_offset="
            f"{kv_offset}, kv_length={kv_length})")
    mask = attention_mask[:, kv_offset:] if kv_offset else attention_mask
    if mask.device.type == "cpu" and not torch.compiler.is_compiling() and bool(mask.all()):
        return None
    return mask


def _is_static_cache(q_length, kv_length, q_offset, kv_offset, config) -> bool:
    """A static cache's layer: its running length comes as a tensor (transformers' StaticLayer),
    or, before its first write, it offers more slots than the keys seen so far. Cross-attention
    of encoder-decoders also has more keys than queries (no cache): told apart by the config
    (static caches are refused for those models)."""
    if kv_offset:
        return False
    if isinstance(q_offset, torch.Tensor):
        return True
    return q_offset + q_length < kv_length and not getattr(config, "is_encoder_decoder", False)


def _static_cache_mask(batch, q_length, kv_length, written, attention_mask, device=None):
    """The 2D mask for a static cache's buffer of `kv_length` slots, `written` of them filled.
    Decoding (one query): (B, kv_length), true on the written slots that are not padding; the
    query sees every key left of it, so the prefix attention's bottom-right alignment holds.
    Several queries (a prefill, not compiled by transformers): the mask of the written slots
    only, (B, written), narrower than the keys, and the attention function cuts the keys to its
    width, so the queries are again the last of the keys (`prefix_attention_forward`)."""
    if attention_mask is not None and (attention_mask.dim() != 2
                                       or attention_mask.shape[-1] > kv_length):
        raise ValueError(f"ptuning_fast attention needs a 2D padding mask of at most {kv_length} "
                         f"tokens with a static cache, got shape {tuple(attention_mask.shape)}")
    if attention_mask is not None:
        device = attention_mask.device
    elif isinstance(written, torch.Tensor):
        device = written.device
    if q_length > 1:
        width = int(written)
        if attention_mask is None:
            return torch.ones(batch, width, dtype=torch.bool, device=device)
        return attention_mask[:, :width].bool()
    slots = torch.arange(kv_length, device=device) < written
    mask = slots.unsqueeze(0).expand(batch, -1)
    if attention_mask is not None:
        padded = torch.nn.functional.pad(attention_mask.bool(),
                                         (0, kv_length - attention_mask.shape[-1]))
        mask = mask & padded
    return mask


def register() -> str:
    """Registers the attention and mask functions (idempotent); returns the implementation name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, padding_mask_passthrough)
    return ATTN_IMPLEMENTATION
