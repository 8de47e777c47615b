"""Prompt Tuning and P-Tuning on encoder-decoder models (T5, Flan-T5, BART), as PEFT's
PeftModelForSeq2SeqLM does them: the prompt leads the encoder's input embeddings and P ones lead
the encoder's attention mask (which the decoder's cross-attention reads too); the decoder's
inputs, mask and the labels are left as they are. The prompt module holds PEFT's two sets of rows
(`num_transformer_submodules=2`) and feeds the first (see prompts.py).

Prefix tuning on these models is refused in `support.refuse_unsupported`.
"""
from __future__ import annotations

import warnings

import torch


def forward(model, input_ids, attention_mask, labels, task_ids, inputs_embeds, position_ids,
            token_type_ids, **kwargs):
    """`model` is a PTuningModel over a seq2seq LM; returns the base model's output (logits
    (B, L_decoder, V): the prompt is on the encoder side only)."""
    if position_ids is not None:
        warnings.warn("position_ids are ignored with prompt tuning / P-Tuning (as in PEFT)",
                      stacklevel=3)
    if token_type_ids is not None:
        kwargs["token_type_ids"] = token_type_ids       # the base model decides (T5 takes none)
    ref = input_ids if input_ids is not None else inputs_embeds
    P = model.num_virtual_tokens
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.new_ones(ref.shape[0], P), attention_mask], 1)
    if kwargs.get("encoder_outputs") is not None:
        # The encoder already ran (on a prompted input, with this wrapper's generate or forward):
        # only the mask over its P + L outputs is needed.
        return model.base_model(attention_mask=attention_mask, labels=labels, **kwargs)
    embeds = model._embed_with_prompt(input_ids, inputs_embeds, task_ids)
    return model.base_model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels,
                            **kwargs)


def generate(model, args, task_ids, kwargs):
    """`base_model.generate` on the prompted encoder input (the encoder runs once, so no step
    hook is needed); returns the decoder's tokens, as PEFT's generate does."""
    kwargs = dict(kwargs)
    if args:
        input_ids, args = args[0], args[1:]
        kwargs.pop("input_ids", None)
    else:
        input_ids = kwargs.pop("input_ids")
    if kwargs.get("encoder_outputs") is not None or kwargs.get("inputs_embeds") is not None:
        raise ValueError("PTuningModel.generate on a seq2seq model runs the encoder itself (on "
                         "the prompt and `input_ids`): do not pass `encoder_outputs` or "
                         "`inputs_embeds`")
    mask = kwargs.get("attention_mask")
    if mask is not None:
        kwargs["attention_mask"] = torch.cat(
            [mask.new_ones(mask.shape[0], model.num_virtual_tokens), mask], 1)
    embeds = model._embed_with_prompt(input_ids, None, task_ids)
    return model.base_model.generate(*args, inputs_embeds=embeds, **kwargs)
