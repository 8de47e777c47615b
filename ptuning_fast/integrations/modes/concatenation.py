"""Prompt Tuning / P-Tuning as PEFT computes them: the prompt prepended to every row's input
embeddings, P ones to the attention mask, P zeros to token_type_ids and, for token-level
tasks, P -100 labels. generate() swaps the prompt into the first step's embeddings. Static
caches are refused (transformers builds 4D masks for the concatenated sequence)."""
from __future__ import annotations

import warnings

import torch

from .. import generations, packed_inputs
from ..support import ignored_in_front, ones_in_front
from .base import Mode, generate_with_step_hook
from .caches import cache_in, cache_length, refuse_static_cache, refuse_static_generation


class ConcatenationMode(Mode):
    def forward(self, wrapper, input_ids, attention_mask, labels, task_ids, inputs_embeds,
                position_ids, token_type_ids, kwargs):
        past_len = cache_length(kwargs)
        if packed_inputs.is_packed(position_ids, attention_mask, past_len, kwargs):
            return wrapper._without_prompt_logits(packed_inputs.prompt_forward(
                wrapper, input_ids, attention_mask, labels, task_ids, inputs_embeds,
                position_ids, token_type_ids, past_len, kwargs))
        if position_ids is not None:
            warnings.warn("position_ids are ignored with prompt tuning / P-Tuning (as in PEFT): "
                          "positions are those of the [prompt; tokens] sequence", stacklevel=2)
        return self.prompted_forward(wrapper, input_ids, attention_mask, labels, task_ids,
                                     inputs_embeds, token_type_ids, past_len, kwargs)

    def prompted_forward(self, wrapper, input_ids, attention_mask, labels, task_ids,
                         inputs_embeds, token_type_ids, past_len: int, kwargs):
        """One sequence per row: [prompt; tokens] through the base model."""
        P = wrapper.num_virtual_tokens
        attention_mask = ones_in_front(attention_mask, P)
        if past_len:
            # Decoding with a cache that already holds the prompt: only the mask needs it.
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            return wrapper.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds,
                                      attention_mask=attention_mask, labels=labels, **kwargs)
        batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        if token_type_ids is not None:
            kwargs["token_type_ids"] = torch.cat(
                [token_type_ids.new_zeros(batch, P), token_type_ids], 1)
        if labels is not None and wrapper.task_type in ("CAUSAL_LM", "TOKEN_CLS"):
            labels = ignored_in_front(labels, P)
        embeds = wrapper._embed_with_prompt(input_ids, inputs_embeds, task_ids)
        return wrapper._without_prompt_logits(wrapper.base_model(
            inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs))

    def generate(self, wrapper, args, input_ids, task_ids, kwargs):
        refuse_static_generation(kwargs, wrapper.base_model, static_ok=False)
        pause = None
        if self.uses_own_attention:
            # The concatenation attends to no prefix: the base model's own attention
            # computes it, as under PEFT, without our function's per-call checks and
            # dispatch (bench/NOTES.md: CPU generation at parity with PEFT once it does).
            pause = wrapper._base_state.base_attention()
        return generate_with_step_hook(wrapper, generations.Generation(None, task_ids),
                                       _prompt_step, args, kwargs, pause_own_attention=pause)


def _prompt_step(wrapper, generation, args, kwargs):
    refuse_static_cache(cache_in(kwargs))
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    ref = embeds if embeds is not None else ids
    if cache_length(kwargs) == 0 and ref is not None:
        task_ids = generation.task_ids
        if task_ids is not None and task_ids.shape[0] != ref.shape[0]:
            task_ids = task_ids.repeat_interleave(ref.shape[0] // task_ids.shape[0])
        kwargs["inputs_embeds"] = wrapper._embed_with_prompt(
            ids if embeds is None else None, embeds, task_ids)
        kwargs["input_ids"] = None
    if kwargs.get("attention_mask") is not None:
        kwargs["attention_mask"] = ones_in_front(kwargs["attention_mask"],
                                                 wrapper.num_virtual_tokens)
    kwargs.pop("position_ids", None)    # PEFT: positions of the [prompt; tokens] sequence
    return args, kwargs
