"""Prefix tuning on models that compute attention in their own code but read every key through
`cache.update` (Falcon): the prefix goes through a `PrefixedCache` (`cache_prefix.py`) and the
model's own attention computes. Static caches are refused (the prefix would have to sit in the
preallocated buffer). `cache_prefix` is imported on use: it imports transformers' model code."""
from __future__ import annotations

from .. import generations
from ..packed_inputs import refuse_packed
from .base import Mode, generate_with_step_hook
from .caches import cache_in, cache_length, refuse_static_cache, refuse_static_generation
from .prefix_attention import shift_positions


class PrefixInCacheMode(Mode):
    def forward(self, wrapper, input_ids, attention_mask, labels, task_ids, inputs_embeds,
                position_ids, token_type_ids, kwargs):
        from .. import cache_prefix
        refuse_static_cache(cache_in(kwargs))
        refuse_packed(position_ids, attention_mask, cache_length(kwargs), kwargs,
                      f"prefix tuning on {type(wrapper.base_model).__name__}")
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        return cache_prefix.forward(wrapper, wrapper._binding(task_ids), input_ids,
                                    attention_mask, inputs_embeds, position_ids, labels, kwargs)

    def generate(self, wrapper, args, input_ids, task_ids, kwargs):
        from ..cache_prefix import unwrap_output
        refuse_static_generation(kwargs, wrapper.base_model, static_ok=False)
        generation = generations.Generation(wrapper._binding(task_ids), task_ids)
        # generate() keeps its own cache of real tokens: each step's output hands it back.
        return generate_with_step_hook(
            wrapper, generation, _step, args, kwargs,
            output_hook=lambda module, args, output: unwrap_output(output))


def _step(wrapper, generation, args, kwargs):
    from ..cache_prefix import generation_step
    refuse_static_cache(cache_in(kwargs))
    shift_positions(wrapper, kwargs)
    return args, generation_step(wrapper.base_model, generation.binding, kwargs)
