"""The KV caches a forward or a generate() call brings, and which of them a mode accepts."""
from __future__ import annotations

# transformers' dynamic caches (DYNAMIC_CACHE_IMPLEMENTATIONS), and the static one.
_GENERATION_CACHES = (None, "dynamic", "offloaded", "quantized", "static")


def cache_in(kwargs: dict):
    """The KV cache among a forward's kwargs. transformers 5.24 renamed the argument
    `past_key_values` to `cache` (generate() passes the new name, models still take the old
    one); read whichever is there."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def cache_length(kwargs) -> int:
    """Tokens already in the KV cache among a forward's kwargs."""
    cache = cache_in(kwargs)
    return cache.get_seq_length() if cache is not None else 0


def refuse_static_cache(past) -> None:
    """Where the prefix goes through the KV cache (Falcon, cache_prefix.py), for seq2seq models
    and for the concatenation: a static cache would need the prefix in its preallocated buffer
    (or transformers builds 4D masks for it). Refused rather than silently different."""
    if past is not None and getattr(past, "is_compileable", False):
        raise NotImplementedError(
            f"ptuning_fast does not support static caches here (got {type(past).__name__}): "
            "use the default dynamic cache (no `cache_implementation`, or 'dynamic')")


def check_static_cache(past) -> None:
    """A static cache of full-attention layers (`StaticLayer`) works: its keys are the whole
    preallocated buffer, of which the mask function marks the written slots
    (`attention.padding_mask_passthrough`). Sliding-window, indexed or linear-attention static
    layers drop or place keys in ways that mask does not follow: refused."""
    if past is None or not getattr(past, "is_compileable", False):
        return
    from transformers.cache_utils import StaticLayer
    odd = sorted({type(layer).__name__ for layer in getattr(past, "layers", ())
                  if type(layer) is not StaticLayer})
    if odd:
        raise NotImplementedError(
            f"ptuning_fast supports static caches of full-attention layers only; this "
            f"{type(past).__name__} has {odd} layers (sliding windows): use the default dynamic "
            "cache (no `cache_implementation`, or 'dynamic')")


def refuse_static_generation(kwargs: dict, base_model, *, static_ok: bool) -> None:
    """A generate() call's cache implementation: the static one only where `static_ok` (the
    prefix reaches our attention function beside the cache)."""
    config = kwargs.get("generation_config") or getattr(base_model, "generation_config", None)
    implementation = kwargs.get("cache_implementation",
                                getattr(config, "cache_implementation", None))
    allowed = _GENERATION_CACHES if static_ok else _GENERATION_CACHES[:-1]
    if implementation not in allowed:
        raise NotImplementedError(
            f"ptuning_fast's generate does not support cache_implementation={implementation!r} "
            f"here (the result would silently change): use one of {list(allowed[1:])} or none")
    (check_static_cache if static_ok else refuse_static_cache)(cache_in(kwargs))
