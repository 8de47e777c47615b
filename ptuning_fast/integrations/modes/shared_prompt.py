"""Prompt Tuning / P-Tuning on a causal decoder whose attention goes through the interface:
the prompt's positions computed once per task (`integrations/shared_prompt.py`) wherever that is
the same function, the concatenation elsewhere. generate() from the shared prompt on CUDA (or
everywhere with `shared_prompt=True`): the prompt's keys and values then act as a prefix that
the decode kernel reads, the cache holding real tokens only."""
from __future__ import annotations

from .. import generations
from .. import shared_prompt as shared_pass
from .base import generate_with_step_hook
from .caches import refuse_static_generation
from .concatenation import ConcatenationMode
from .prefix_attention import prefix_step


class SharedPromptMode(ConcatenationMode):
    uses_own_attention = True

    def __init__(self, *, generate_on_cpu: bool, base_has_dropout: bool):
        # Not on CPU by default: there the extra pass costs what it saves (a forward of P
        # positions reads every weight, like a decoding step) and the torch path's per-step
        # prefix concatenation makes decoding slower than the concatenation (bench/NOTES.md).
        self.generate_on_cpu = generate_on_cpu
        self.base_has_dropout = base_has_dropout

    def applies(self, wrapper, batch: int, past_len: int, kwargs: dict) -> bool:
        return shared_pass.applies(wrapper, batch, past_len, kwargs,
                                   base_has_dropout=self.base_has_dropout)

    def prompted_forward(self, wrapper, input_ids, attention_mask, labels, task_ids,
                         inputs_embeds, token_type_ids, past_len: int, kwargs):
        batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        if self.applies(wrapper, batch, past_len, kwargs):
            return shared_pass.forward(wrapper, input_ids, attention_mask, labels, task_ids,
                                       inputs_embeds, token_type_ids, **kwargs)
        return super().prompted_forward(wrapper, input_ids, attention_mask, labels, task_ids,
                                        inputs_embeds, token_type_ids, past_len, kwargs)

    def generate(self, wrapper, args, input_ids, task_ids, kwargs):
        if not (self.generate_on_cpu or input_ids.device.type == "cuda") \
                or not self.applies(wrapper, input_ids.shape[0], 0, {}):
            return super().generate(wrapper, args, input_ids, task_ids, kwargs)
        refuse_static_generation(kwargs, wrapper.base_model, static_ok=True)
        with generations.generating(wrapper.base_model, None):
            prefixes, _ = shared_pass.prompt_pass(wrapper, kwargs.get("token_type_ids"))
        generation = generations.Generation(wrapper._binding(task_ids, prefixes=prefixes),
                                            task_ids)
        return generate_with_step_hook(wrapper, generation, _step, args, kwargs)


def _step(wrapper, generation, args, kwargs):
    # PEFT's prompt generation numbers the [prompt; tokens] sequence itself (its position
    # ids from generate(), mask-based, are dropped): the prefix steps' numbering from P.
    kwargs.pop("position_ids", None)
    return prefix_step(wrapper, generation, args, kwargs)
