"""Encoder-decoder models (T5, BART), every method: `integrations/seq2seq.py` does PEFT's
placement (the prompt in front of the encoder's input; the prefix on the decoder's
self-attention only). Static caches are refused."""
from __future__ import annotations

from .. import seq2seq
from .base import Mode
from .caches import refuse_static_generation


class Seq2SeqMode(Mode):
    def __init__(self, prefix_layers: dict | None):
        """`prefix_layers`: prefix tuning's decoder self-attention module -> prefix layer
        (`seq2seq.prefix_layers`); None for prompt tuning / P-Tuning."""
        self.prefix_layers = prefix_layers
        self.uses_own_attention = prefix_layers is not None

    def forward(self, wrapper, input_ids, attention_mask, labels, task_ids, inputs_embeds,
                position_ids, token_type_ids, kwargs):
        return seq2seq.forward(wrapper, input_ids, attention_mask, labels, task_ids,
                               inputs_embeds, position_ids, token_type_ids, **kwargs)

    def generate(self, wrapper, args, input_ids, task_ids, kwargs):
        refuse_static_generation(kwargs, wrapper.base_model, static_ok=False)
        return seq2seq.generate(wrapper, args, task_ids, kwargs)
