"""Encoder-decoder models (T5, Flan-T5, BART) as PEFT's PeftModelForSeq2SeqLM tunes them.

Prompt Tuning / P-Tuning: the prompt leads the encoder's input embeddings and P ones lead the
encoder's attention mask (which the decoder's cross-attention reads too); the decoder's inputs,
mask and the labels are left as they are. The prompt module holds PEFT's two sets of rows
(`num_transformer_submodules=2`) and feeds the first (see prompts.py).

Prefix tuning (BART, T5): PEFT puts its prefix cache into the decoder only, and replaces the
cross-attention part of that cache by an empty one, so only the decoder's self-attention
attends to a prefix: decoder layer i to the prefix of layer (2 i) mod L (how PEFT splits its
doubled (2 * 2L)-row cache into per-layer groups of four), and decoder positions start at P
(the cache length PEFT's prefix makes: BART's learned positions are shifted here; T5's relative
position bias over the prefix is computed by the attention function, `attention_terms`). The
encoder and the cross-attention get no prefix.
"""
from __future__ import annotations

import contextlib
import warnings

from . import attention, generations
from .support import ones_in_front


def _decoder_self_attentions(base_model) -> list:
    """Each decoder layer's self-attention module: BART's `layers[i].self_attn`, T5's
    `block[i].layer[0].SelfAttention`."""
    decoder = base_model.get_decoder()
    if hasattr(decoder, "layers"):
        return [layer.self_attn for layer in decoder.layers]
    return [block.layer[0].SelfAttention for block in decoder.block]


def prefix_layers(base_model, num_layers: int) -> dict:
    """Decoder self-attention module -> index of its prefix layer, PEFT's placement. Every
    other attention module (the encoder's, the cross-attention) is absent: no prefix. T5's share
    `layer_idx` values with the decoder's self-attention, so the index cannot come from it."""
    modules = _decoder_self_attentions(base_model)
    if len(modules) != num_layers:
        raise NotImplementedError(
            f"{type(base_model).__name__}: prefix tuning needs as many decoder layers as "
            f"encoder layers (PEFT sizes the prefix by the encoder's {num_layers}), got "
            f"{len(modules)}")
    return {module: (2 * i) % num_layers for i, module in enumerate(modules)}


@contextlib.contextmanager
def decoder_positions_shifted(base_model, shift: int):
    """Decoder positions + `shift` while the context is open (PEFT's prefix of `shift` cache
    entries numbers the decoder's tokens from there), through a pre-hook on the decoder's
    position embedding that is removed on exit."""
    def add(module, args, kwargs):
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + shift
        else:                                   # (input_ids, cache_length)
            args = (args[0], (args[1] if len(args) > 1 else 0) + shift, *args[2:])
        return args, kwargs

    embed_positions = getattr(base_model.get_decoder(), "embed_positions", None)
    if embed_positions is None:        # T5: relative positions only (see the module docstring)
        yield
        return
    handle = embed_positions.register_forward_pre_hook(add, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def forward(model, input_ids, attention_mask, labels, task_ids, inputs_embeds, position_ids,
            token_type_ids, **kwargs):
    """`model` is a PTuningModel over a seq2seq LM; returns the base model's output (logits
    (B, L_decoder, V): the prompt is on the encoder side only)."""
    if position_ids is not None:
        warnings.warn("position_ids are ignored with prompt tuning / P-Tuning (as in PEFT)",
                      stacklevel=3)
    if token_type_ids is not None:
        kwargs["token_type_ids"] = token_type_ids       # the base model decides (T5 takes none)
    P = model.num_virtual_tokens
    if model.is_prefix:       # the encoder's input and mask stay as they are (as in PEFT)
        kwargs[attention.PREFIX_KWARG] = model._binding(task_ids)
        with decoder_positions_shifted(model.base_model, P):
            return model.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds,
                                    attention_mask=attention_mask, labels=labels, **kwargs)
    attention_mask = ones_in_front(attention_mask, P)
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
    if model.is_prefix:
        generation = generations.Generation(model._binding(task_ids), task_ids)
        with generations.generating(model.base_model, generation), \
                decoder_positions_shifted(model.base_model, model.num_virtual_tokens):
            return model.base_model.generate(*args, **kwargs)
    if args:
        input_ids, args = args[0], args[1:]
        kwargs.pop("input_ids", None)
    else:
        input_ids = kwargs.pop("input_ids")
    if kwargs.get("encoder_outputs") is not None or kwargs.get("inputs_embeds") is not None:
        raise ValueError("PTuningModel.generate on a seq2seq model runs the encoder itself (on "
                         "the prompt and `input_ids`): do not pass `encoder_outputs` or "
                         "`inputs_embeds`")
    if kwargs.get("attention_mask") is not None:
        kwargs["attention_mask"] = ones_in_front(kwargs["attention_mask"],
                                                 model.num_virtual_tokens)
    embeds = model._embed_with_prompt(input_ids, None, task_ids)
    return model.base_model.generate(*args, inputs_embeds=embeds, **kwargs)
