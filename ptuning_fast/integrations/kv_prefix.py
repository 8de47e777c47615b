"""A prefix initialized from text: a prefill of the frozen model, its first P cached keys and
values copied into the prefix (PEFT's `initialize_kv_prefix_from_text`, the Cartridges paper's
"first tokens of the corpus" initialization, Eyuboglu et al. 2025). Same names, arguments and
result as PEFT's functions, so a script swaps `peft.` for `ptuning_fast.`.

The cached keys carry the rotary positions 0 .. P - 1 of the prefill, and the real tokens then
start at position P: exactly the positions PEFT gives them.

A sliding-window cache layer keeps only the last W - 1 tokens of a prefill: from a text at least
W tokens long its first positions are the wrong tokens (PEFT loads them silently). The text's
prefill here keeps every token; a given cache that lost its first tokens is refused.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer



def _layers_of(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) per layer, each (batch, kv heads, length, head dim), from a transformers
    cache object (its `layers`), a legacy tuple of pairs, or anything iterating over pairs."""
    if hasattr(cache, "layers"):
        for i, layer in enumerate(cache.layers):
            seen = getattr(layer, "cumulative_length", None)
            if isinstance(seen, int) and layer.keys is not None and layer.keys.shape[2] < seen:
                raise ValueError(
                    f"`past_key_values` layer {i} kept the last {layer.keys.shape[2]} of the "
                    f"{seen} tokens it was given (a sliding window of "
                    f"{getattr(layer, 'sliding_window', '?')}): its first positions are not the "
                    f"text's first tokens. Prefill with a cache that keeps every token "
                    f"(transformers.DynamicCache() without a config)")
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "to_legacy_cache"):
        cache = cache.to_legacy_cache()
    try:
        return [(layer[0], layer[1]) for layer in cache]
    except (TypeError, IndexError):
        raise TypeError(f"`past_key_values` must be a transformers cache or a sequence of "
                        f"(key, value) pairs, got {type(cache).__name__}") from None


def _check_target(model, adapter_name) -> None:
    if adapter_name not in (None, "default"):
        raise ValueError(f"ptuning_fast models hold one adapter ('default'), got "
                         f"adapter_name={adapter_name!r}")
    module = model.prompt_encoder
    if not model.is_prefix:
        raise ValueError(f"a KV prefix initializes prefix tuning; this model uses "
                         f"{model.ptuning_config.method}")
    if module.projection and not module.exported:
        raise ValueError("initialization from a KV cache is not supported with "
                         "prefix_projection=True (the MLP's input cannot be recovered), as in PEFT")


@torch.no_grad()
def initialize_kv_prefix_from_past_key_values(model, *, past_key_values, adapter_name=None,
                                              num_virtual_tokens=None, task_id=None
                                              ) -> torch.Tensor:
    """Loads the first P positions of `past_key_values` (a batch-1 prefill's cache) into the
    prefix of `model` (a prefix-tuning PTuningModel without projection). `task_id`: which task's
    prefix to fill (None: every task's). Returns the (P, num_layers * 2 * Hkv * D) tensor loaded,
    PEFT's "prompt_embeddings" layout."""
    _check_target(model, adapter_name)
    module, dims = model.prompt_encoder, model.dims
    P = module.num_virtual_tokens
    if num_virtual_tokens not in (None, P):
        raise ValueError(f"`num_virtual_tokens`={num_virtual_tokens} differs from the model's "
                         f"prefix length {P}")
    layers = _layers_of(past_key_values)
    if len(layers) != dims.num_layers:
        raise ValueError(f"`past_key_values` has {len(layers)} layers, the model has "
                         f"{dims.num_layers}")
    for i, (k, v) in enumerate(layers):
        for name, t in (("key", k), ("value", v)):
            if t.dim() != 4 or t.shape[2] < P or \
                    (t.shape[0], t.shape[1], t.shape[3]) != (1, dims.num_kv_heads, dims.head_dim):
                raise ValueError(
                    f"`past_key_values` layer {i} {name} has shape {tuple(t.shape)}; expected "
                    f"(1, {dims.num_kv_heads}, >= {P}, {dims.head_dim}): a batch-1 prefill of "
                    f"at least num_virtual_tokens={P} tokens")
    # (L, 2, Hkv, P, D) -> (P, L, 2, Hkv, D): the prefix module's flat layout.
    kv = torch.stack([torch.stack([k[0, :, :P], v[0, :, :P]]) for k, v in layers])
    flat = kv.permute(3, 0, 1, 2, 4).reshape(P, -1)
    weight = module.embedding.weight
    T = model.ptuning_config.num_tasks
    if task_id is not None and not (isinstance(task_id, int) and 0 <= task_id < T):
        raise ValueError(f"`task_id` must be None (every task) or an int in [0, {T}), "
                         f"got {task_id!r}")
    rows = range(T) if task_id is None else [task_id]
    for t in rows:
        weight[t * P:(t + 1) * P] = flat.to(weight)
    return flat


@torch.no_grad()
def initialize_kv_prefix_from_text(model, tokenizer, *, text: str, adapter_name=None,
                                   num_virtual_tokens=None, use_chat_template: bool = True,
                                   max_length=None, task_id=None) -> torch.Tensor:
    """Prefills the base model (prompts off) on `text` and loads the first P cached tokens into
    the prefix. As PEFT: with `use_chat_template` and a tokenizer that has a chat template, the
    text is a system message; otherwise it is tokenized plainly (truncated to `max_length`)."""
    _check_target(model, adapter_name)

    def plain():
        return tokenizer(text, return_tensors="pt", truncation=max_length is not None,
                         max_length=max_length)["input_ids"]

    if use_chat_template and hasattr(tokenizer, "apply_chat_template"):
        try:
            input_ids = tokenizer.apply_chat_template(
                [{"role": "system", "content": text}], tokenize=True,
                add_generation_prompt=False, return_dict=False, return_tensors="pt")
        except (TypeError, ValueError):      # no chat template, or an older signature
            input_ids = plain()
        else:
            input_ids = input_ids[:, :max_length] if max_length is not None else input_ids
    else:
        input_ids = plain()
    input_ids = input_ids.to(model.prompt_encoder.embedding.weight.device)
    base = model.base_model
    # Imported here: cache_prefix imports transformers' model classes, which import Triton, and
    # `import ptuning_fast` must not (TRITON_INTERPRET may still be set after it).
    from .cache_prefix import cache_argument
    with model.disable_adapter():
        out = base(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                   use_cache=True, **{cache_argument(base): _keeping_every_token(base)})
    cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
    return initialize_kv_prefix_from_past_key_values(
        model, past_key_values=cache, adapter_name=adapter_name,
        num_virtual_tokens=num_virtual_tokens, task_id=task_id)


def _keeping_every_token(base_model) -> DynamicCache:
    """The cache `base_model` builds for itself, except that its sliding-window (and chunked)
    layers keep every token: the prefix takes the text's first tokens, which such a layer drops
    once the text reaches its window. The attention stays windowed (transformers builds the
    masks from the config, not from the cache), so the cached keys and values are the same."""
    cache = DynamicCache(config=base_model.config)
    cache.layers = [DynamicLayer() if isinstance(layer, DynamicSlidingWindowLayer) else layer
                    for layer in cache.layers]
    return cache
