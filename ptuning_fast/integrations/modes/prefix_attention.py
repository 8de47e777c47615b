"""Prefix tuning through the registered attention function: each layer reads its (Hkv, P, D)
prefix from the binding (a forward keyword argument; during generate(), also the current
`Generation`), the real tokens' positions start at P, and the KV cache holds real tokens only,
so static caches of full-attention layers work too."""
from __future__ import annotations

from .. import attention, generations
from ..packed_inputs import packed_segments_of
from .base import Mode, generate_with_step_hook
from .caches import cache_in, cache_length, check_static_cache, refuse_static_generation


class PrefixAttentionMode(Mode):
    uses_own_attention = True

    def forward(self, wrapper, input_ids, attention_mask, labels, task_ids, inputs_embeds,
                position_ids, token_type_ids, kwargs):
        check_static_cache(cache_in(kwargs))
        ref = input_ids if input_ids is not None else inputs_embeds
        past_len = cache_length(kwargs)
        # Every packed sequence sees the prefix, its positions shifted by P as in its own row.
        segments, position_ids = packed_segments_of(position_ids, attention_mask, past_len,
                                                    kwargs, ref)
        if position_ids is None:
            position_ids = wrapper._prefix_position_ids(
                input_ids, ref, wrapper.num_virtual_tokens + past_len, attention_mask)
        else:
            position_ids = position_ids + wrapper.num_virtual_tokens
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        kwargs[attention.PREFIX_KWARG] = wrapper._binding(task_ids, segments,
                                                          seq_idx=kwargs.get("seq_idx"))
        return wrapper.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                  inputs_embeds=inputs_embeds, position_ids=position_ids,
                                  labels=labels, **kwargs)

    def generate(self, wrapper, args, input_ids, task_ids, kwargs):
        refuse_static_generation(kwargs, wrapper.base_model, static_ok=True)
        generation = generations.Generation(wrapper._binding(task_ids), task_ids)
        return generate_with_step_hook(wrapper, generation, prefix_step, args, kwargs)


def shift_positions(wrapper, kwargs: dict) -> None:
    """A generation step's positions as PEFT's prefilled cache of P entries numbers them."""
    ids = kwargs.get("input_ids")
    ref = ids if ids is not None else kwargs.get("inputs_embeds")
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + wrapper.num_virtual_tokens
    elif ref is not None:
        start = wrapper.num_virtual_tokens + cache_length(kwargs)
        kwargs["position_ids"] = wrapper._prefix_position_ids(ids, ref, start,
                                                              kwargs.get("attention_mask"))


def prefix_step(wrapper, generation, args, kwargs):
    """One generation step: positions from P, and the binding as a forward argument as well: a
    compiled forward (torch.compile of the model's forward, a static cache's decoding step)
    then reads no context variable, which Dynamo cannot trace."""
    check_static_cache(cache_in(kwargs))
    shift_positions(wrapper, kwargs)
    kwargs[attention.PREFIX_KWARG] = generation.binding
    return args, kwargs
