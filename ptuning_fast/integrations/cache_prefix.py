"""Prefix tuning on models whose attention layers compute attention themselves and take their
keys from the KV cache they are given (Falcon), so the prefix reaches them through that cache.

Falcon's attention does not go through transformers' AttentionInterface: each layer calls
`cache.update(key, value, layer_idx)`, attends (eager or SDPA, its own code) to the keys that
returns, under a mask the model built for `cache.get_mask_sizes(...)` keys, with positions and
ALiBi numbered from `cache.get_seq_length()` and the 2D attention mask. PEFT's prefix tuning puts
the prefix into that cache as P tokens and P ones in front of the mask. `PrefixedCache` gives the
layers the same keys and the model the same lengths without storing the prefix: `update`
returns [prefix; real tokens] for the layer, the real tokens go to an inner cache (the caller's
or generate()'s, which so never holds the prefix) or nowhere (a training forward), and every
length counts the P prefix tokens. The model's own attention then computes what it computes
under PEFT — ptuning_fast's kernels are not used on these models. Without an inner cache it is
stateless, so gradient checkpointing's recompute sees the same keys (a DynamicCache holding the
prefix would get the tokens appended a second time).
"""
from __future__ import annotations

import contextlib
import inspect

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache

from .support import ones_in_front, refuse_attention_in_cache_model, text_config


class PrefixedCache(Cache):
    """A transformers `Cache` that puts each layer's prefix in front of its keys and values.

    `binding` (an `attention.PrefixBinding`) holds the (Hkv, P, D) or (T, Hkv, P, D) prefixes and
    the rows' task ids; `inner` (a Cache of real tokens, or None) stores what the layers write.
    `update(k, v, layer)` with k, v (B, Hkv, L, D) returns (B, Hkv, P + cached + L, D). Lengths
    (`get_seq_length`, `get_mask_sizes`) count the P prefix tokens, as PEFT's cache does.
    Reordering or cropping acts on the inner cache: outputs give the inner cache back."""

    def __init__(self, binding, inner: Cache | None = None):
        super().__init__(layers=[])
        if isinstance(inner, PrefixedCache):
            inner = inner.inner
        self.binding = binding
        self.inner = inner
        self.num_virtual_tokens = binding.prefixes.num_virtual_tokens

    def _prefix(self, layer_idx: int, keys: torch.Tensor):
        """Layer `layer_idx`'s (B, Hkv, P, D) key and value prefix rows for `keys`' rows."""
        batch = keys.shape[0]
        k, v, index = self.binding.for_layer(layer_idx, batch)
        if k.shape[-3] != keys.shape[1] or k.shape[-1] != keys.shape[-1]:
            raise ValueError(
                f"{self.binding.model_name}: layer {layer_idx}'s keys have {keys.shape[1]} heads "
                f"of size {keys.shape[-1]}, its prefix {k.shape[-3]} heads of size {k.shape[-1]}")
        if index is None:
            k, v = k.expand(batch, *k.shape), v.expand(batch, *v.shape)
        else:
            k, v = k.index_select(0, index), v.index_select(0, index)
        return k.to(keys.dtype), v.to(keys.dtype)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        prefix_k, prefix_v = self._prefix(layer_idx, key_states)
        if self.inner is not None:
            key_states, value_states = self.inner.update(key_states, value_states, layer_idx,
                                                         *args, **kwargs)
        return torch.cat([prefix_k, key_states], -2), torch.cat([prefix_v, value_states], -2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        cached = self.inner.get_seq_length(layer_idx) if self.inner is not None else 0
        return self.num_virtual_tokens + cached

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length, layer_idx: int) -> tuple[int, int]:
        """(P + cached + query length, 0). Releases before transformers 5.2x pass the query's
        `cache_position` (a tensor) instead of its length: both are accepted."""
        if self.inner is None:
            if isinstance(query_length, torch.Tensor):
                query_length = query_length.shape[0]
            return self.num_virtual_tokens + query_length, 0
        length, offset = self.inner.get_mask_sizes(query_length, layer_idx)
        if offset:    # a sliding-window cache layer dropped keys: the prefix would move
            raise NotImplementedError(f"{self.binding.model_name}: a cache that drops keys "
                                      "(sliding window) is not supported with prefix tuning")
        return self.num_virtual_tokens + length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def _inner_only(self, what: str):
        raise NotImplementedError(
            f"PrefixedCache.{what}: reorder or crop the inner cache (`.inner`, the real tokens); "
            "the prefix is not stored")

    def reorder_cache(self, beam_idx):
        self._inner_only("reorder_cache")

    def crop(self, tokens_to_remove: int):
        self._inner_only("crop")

    def batch_repeat_interleave(self, repeats: int):
        self._inner_only("batch_repeat_interleave")

    def batch_select_indices(self, indices):
        self._inner_only("batch_select_indices")

    def reset(self):
        self._inner_only("reset")


def unwrap_output(output):
    """`output` with any `PrefixedCache` in it replaced by its inner cache (None when
    stateless): callers and generate() only ever see caches of real tokens."""
    if isinstance(output, PrefixedCache):
        return output.inner
    if type(output) is tuple:                   # return_dict=False
        return tuple(unwrap_output(item) for item in output)
    if hasattr(output, "keys") and hasattr(output, "__setitem__"):
        for key in [k for k in output.keys() if isinstance(output[k], PrefixedCache)]:
            output[key] = output[key].inner
    return output


def _checkpointed(base_model) -> list:
    """The layers that checkpointing recomputes (models carry the flag too: not them)."""
    return [m for m in base_model.modules() if getattr(m, "gradient_checkpointing", False)
            and not isinstance(m, PreTrainedModel)]


def _checkpointing_layers(base_model) -> list:
    return [m for m in _checkpointed(base_model) if hasattr(m, "_can_checkpoint_with_cache")]


def recomputing(base_model) -> bool:
    """Whether this forward checkpoints layers (they run again in the backward)."""
    return base_model.training and torch.is_grad_enabled() \
        and bool(_checkpointing_layers(base_model))


@contextlib.contextmanager
def cache_kept_under_checkpointing(base_model):
    """transformers' checkpointed layers drop the cache (`layer_past=None`) unless the layer
    declares it only reads it (`_can_checkpoint_with_cache`): a stateless `PrefixedCache` only
    reads (the recompute sees the same keys), so during this forward the checkpointed layers
    say so; the flag is read once, when each layer's forward starts, and removed on exit."""
    layers = _checkpointing_layers(base_model)
    unflagged = [m for m in _checkpointed(base_model)
                 if not hasattr(m, "_can_checkpoint_with_cache")]
    if unflagged and base_model.training and torch.is_grad_enabled():
        raise NotImplementedError(
            f"gradient checkpointing with prefix tuning on {type(base_model).__name__} needs "
            f"checkpointed layers that can keep a read-only KV cache; this transformers "
            f"release's {type(unflagged[0]).__name__} has no `_can_checkpoint_with_cache` and "
            "would drop the cache holding the prefix")
    missing = object()
    before = [layer.__dict__.get("_can_checkpoint_with_cache", missing) for layer in layers]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer, value in zip(layers, before):
            if value is missing:
                del layer._can_checkpoint_with_cache    # the class's own value again
            else:
                layer._can_checkpoint_with_cache = value


def cache_argument(base_model) -> str:
    """The name under which `base_model.forward` takes its cache (`cache` from transformers 5.24
    on, `past_key_values` before)."""
    params = inspect.signature(base_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _pop_cache(kwargs: dict):
    """The cache among a forward's kwargs, under either name (transformers 5.24 renamed
    `past_key_values` to `cache`), removed from them."""
    cache, legacy = kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


def forward(model, binding, input_ids, attention_mask, inputs_embeds, position_ids, labels,
            kwargs: dict):
    """A PTuningModel's prefix-tuning forward on such a model: P ones in front of the mask,
    positions from P + cached tokens (the model numbers them from the cache length unless
    `position_ids` are given, which are shifted by P), the prefix through a `PrefixedCache`.
    Returns the base model's output, its cache being the inner one (real tokens only)."""
    base = model.base_model
    refuse_attention_in_cache_model(base)
    user_cache = _pop_cache(kwargs)
    if isinstance(user_cache, PrefixedCache):
        user_cache = user_cache.inner
    checkpointed = recomputing(base)
    if checkpointed and user_cache is not None:
        raise NotImplementedError(
            f"{type(base).__name__}: a KV cache in a training forward under gradient "
            "checkpointing is not supported (the recomputed layers would write it twice)")
    use_cache = kwargs.get("use_cache")
    if use_cache is None:   # multimodal configs keep it in their text config
        use_cache = getattr(text_config(base), "use_cache", False)
    inner = user_cache
    if inner is None and use_cache and not checkpointed:
        inner = DynamicCache(config=base.config)
    P = model.num_virtual_tokens
    attention_mask = ones_in_front(attention_mask, P)
    if position_ids is not None:
        kwargs["position_ids"] = position_ids + P
    kwargs[cache_argument(base)] = PrefixedCache(binding, inner)
    with cache_kept_under_checkpointing(base):
        out = base(input_ids=input_ids, attention_mask=attention_mask,
                   inputs_embeds=inputs_embeds, labels=labels, **kwargs)
    return unwrap_output(out)


def generation_step(base_model, binding, kwargs: dict) -> dict:
    """One generate() step's model inputs on such a model (after the positions were shifted by
    P): generate()'s own cache (real tokens) inside a `PrefixedCache`, P ones in front of the
    mask. The step's output gets generate()'s cache back through `unwrap_output`."""
    inner = _pop_cache(kwargs)
    kwargs[cache_argument(base_model)] = PrefixedCache(binding, inner)
    if kwargs.get("attention_mask") is not None:
        kwargs["attention_mask"] = ones_in_front(kwargs["attention_mask"],
                                                 binding.prefixes.num_virtual_tokens)
    return kwargs
