"""Prompt Tuning / P-Tuning on a causal LM: the prompt's positions computed once per task, not
once per row.

PEFT concatenates the P prompt vectors in front of every row's embeddings, so the frozen model
computes the prompt positions B times. Under causal attention those positions see only the
prompt: their hidden states, keys and values are the same in every row of a task (their positions
are 0 .. P - 1 in every row, whatever the padding). So the wrapper runs two passes:

1. the model on the T task prompts alone (T x P positions, T = num_tasks), each layer's keys and
   values kept as they reach the attention function (after RoPE), and the logits;
2. the model on the B rows' L tokens, positions from P (or, for models that number positions from
   the mask, that numbering over PEFT's mask of P ones + the mask), every layer attending to the
   kept keys and values as a prefix — prefix tuning's attention, with the prompt's K/V where
   prefix tuning has trained ones.

The logits are [pass 1's for the row's task; pass 2's], (B, P + L, V) as under PEFT, and the loss
is the model's loss function on them with P -100 labels in front (the last prompt position still
predicts each row's first label). Gradients reach the prompt through the kept keys and values
and through those prompt logits. The result is the concatenation's function (the model-matrix
tests compare it with PEFT); the frozen model runs on T P + B L positions instead of B (P + L),
forward and backward.

It applies when that equality holds and the saving is real: a decoder-only causal LM whose
attention goes through transformers' AttentionInterface (`supports_shared_prompt`), no cache in
the inputs, fewer tasks than rows, no dropout in training (the concatenation draws each row's
prompt dropout independently), and no output the two passes would split (hidden states, attention
weights, a returned cache, router logits). Everything else takes the concatenation.
"""
from __future__ import annotations

import torch
from torch import nn

from ..prompts import LayerPrefixes
from . import attention
from .support import ignored_in_front, text_config

# Forward kwargs that ask for per-position outputs of the [prompt; tokens] sequence that the two
# passes would return split (or, for the cache, without the prompt): the concatenation runs then.
_SPLIT_OUTPUTS = ("output_hidden_states", "output_attentions", "output_router_logits",
                  "use_cache", "logits_to_keep")


def has_dropout(model: nn.Module) -> bool:
    """Whether training `model` draws random numbers: a Dropout module with p > 0, or an
    attention module whose `attention_dropout` (what transformers hands the attention function
    in training mode) is positive."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return True
        p = getattr(module, "attention_dropout", 0.0)
        if isinstance(p, (int, float)) and p > 0:
            return True
    return False


def applies(wrapper, batch: int, past_len: int, kwargs: dict, *,
            base_has_dropout: bool) -> bool:
    """Whether the forward of `batch` rows of `wrapper` (of a model that `supports_shared_prompt`)
    takes the two passes (see the module doc). `base_has_dropout`: `has_dropout(base model)`."""
    if past_len:
        return False
    if getattr(wrapper.base_model.config, "_attn_implementation", None) \
            != attention.ATTN_IMPLEMENTATION:
        # A forward inside a generate() of the concatenation (a logits processor), which runs
        # the base model's own attention meanwhile: the concatenation again.
        return False
    if wrapper.ptuning_config.num_tasks >= batch:
        return False
    if "forward" in vars(wrapper.base_model):
        # A forward patched onto the base model (TRL's fused LM head; see the wrapper's
        # `_retarget_forward_patch`) expects PEFT's one call with the labels; the two passes
        # would hand it two, the first without labels.
        return False
    if wrapper.base_model.training and base_has_dropout:
        return False
    if kwargs.get("return_dict") is False:
        return False
    return not any(kwargs.get(name) not in (None, False) for name in _SPLIT_OUTPUTS)


def prompt_pass(wrapper, token_type_ids=None):
    """Pass 1: the model on the task prompts -> (LayerPrefixes of every layer's prompt keys and
    values, each (Hkv, P, D) or (T, Hkv, P, D) with several tasks; (T, P, V) logits)."""
    prompt = wrapper.prompt_encoder().to(wrapper._model_dtype())
    shared = prompt.dim() == 2                        # one task: (P, d), else (T, P, d)
    rows = prompt.unsqueeze(0) if shared else prompt
    capture = wrapper._binding(None)
    capture.captured = attention.CapturedKV()
    kwargs = {} if token_type_ids is None \
        else {"token_type_ids": token_type_ids.new_zeros(rows.shape[:2])}    # PEFT's P zeros
    out = wrapper.base_model(inputs_embeds=rows, use_cache=False,
                             **{attention.PREFIX_KWARG: capture}, **kwargs)
    layers = wrapper.dims.num_layers
    kept = capture.captured.layers
    if sorted(kept) != list(range(layers)):
        raise RuntimeError(f"{type(wrapper.base_model).__name__}: the prompt pass reached the "
                           f"attention of layers {sorted(kept)}, expected 0..{layers - 1}")
    per_layer = []
    for index in range(layers):
        kv = torch.stack(kept[index])                 # (2, T, Hkv, P, D)
        per_layer.append(kv[:, 0] if shared else kv)
    return LayerPrefixes(None, 1 if shared else rows.shape[0], tuple(per_layer)), out.logits


def forward(wrapper, input_ids, attention_mask, labels, task_ids, inputs_embeds,
            token_type_ids, **kwargs):
    """The two passes of the module doc; returns the base model's output with PEFT's logits
    (B, P + L, V) (or (B, L, V) with `prompt_logits=False`) and loss."""
    P = wrapper.num_virtual_tokens
    prefixes, prompt_logits = prompt_pass(wrapper, token_type_ids)
    ref = input_ids if input_ids is not None else inputs_embeds
    batch = ref.shape[0]
    position_ids = wrapper._prefix_position_ids(input_ids, ref, P, attention_mask)
    extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
    binding = wrapper._binding(task_ids, prefixes=prefixes)
    out = wrapper.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds,
                             attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False, **{attention.PREFIX_KWARG: binding}, **extra,
                             **kwargs)
    if labels is None and not wrapper.prompt_logits:
        return out
    rows = prompt_logits.expand(batch, -1, -1) if task_ids is None \
        else prompt_logits.index_select(0, task_ids)
    logits = torch.cat([rows.to(out.logits.dtype), out.logits], dim=1)
    if labels is not None:
        vocab = text_config(wrapper.base_model).vocab_size
        # The user's kwargs (num_items_in_batch, ...) as the model hands its own to the loss.
        out.loss = wrapper.base_model.loss_function(
            logits=logits, labels=ignored_in_front(labels, P), vocab_size=vocab, **kwargs)
    if wrapper.prompt_logits:
        out.logits = logits
    return out
