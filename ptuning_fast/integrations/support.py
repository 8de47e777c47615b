"""Which transformers models a method can wrap, and as which PEFT task type.

Checked at wrap time, before the caller's model is touched: a model that a method cannot handle
gets a NotImplementedError naming the model and the reason, never a silent wrong result.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from ..config import layers_wider_than

# transformers' class-name suffixes of the heads PEFT has a task type for.
_TASK_BY_SUFFIX = (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                   ("ForTokenClassification", "TOKEN_CLS"),
                   ("ForQuestionAnswering", "QUESTION_ANS"))


def task_type_of(model: nn.Module) -> str:
    """PEFT's task type for a transformers model. Generating models by capability
    (`can_generate()`): encoder-decoders are SEQ_2_SEQ_LM, the others CAUSAL_LM (GPT2LMHeadModel's
    name has no "ForCausalLM"); the classification / QA heads by transformers' class naming."""
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate) and can_generate():
        if is_encoder_decoder(model):
            return "SEQ_2_SEQ_LM"
        return "CAUSAL_LM"
    name = type(model).__name__
    for suffix, task in _TASK_BY_SUFFIX:
        if name.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION"


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def uses_attention_interface(model: nn.Module) -> bool:
    """Whether every attention layer of `model` calls the function registered under the
    config's attention implementation (transformers' AttentionInterface). transformers answers
    this itself (`_can_set_attn_implementation`, read from the modeling file: Falcon and
    DeBERTa-v2 call their own attention code); without that hook, a model that declares attention
    backends (`_supports_attention_backend`) is taken to use the interface."""
    cls = type(model)
    can_set = getattr(cls, "_can_set_attn_implementation", None)
    if callable(can_set):
        return bool(can_set())
    return bool(getattr(cls, "_supports_attention_backend", False))


def text_config(model: nn.Module):
    """The config of `model`'s text stack (multimodal configs nest it), else the config."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def supports_shared_prompt(model: nn.Module, task_type: str) -> bool:
    """Whether Prompt Tuning / P-Tuning on `model` can compute the prompt once per task
    (integrations/shared_prompt.py): a decoder-only causal LM (its prompt positions see only the
    prompt) whose every attention layer calls the registered function (which keeps the prompt's
    keys and values, then attends to them as a prefix), each layer with keys of its own (no
    `num_kv_shared_layers`)."""
    return _shared_prompt_possible(model, task_type) \
        and model_type_of(model) in SHARED_PROMPT_VERIFIED


def _shared_prompt_possible(model: nn.Module, task_type: str) -> bool:
    """What the shared pass needs of a model's structure, verified against PEFT or not."""
    if task_type != "CAUSAL_LM" or is_encoder_decoder(model):
        return False
    if not uses_attention_interface(model) or not hasattr(model, "set_attn_implementation"):
        return False
    return not getattr(text_config(model), "num_kv_shared_layers", 0)


def model_type_of(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


# Where a fast path is taken, it was shown to compute PEFT's function: each model type below is
# tested against PEFT's algorithm (the prompt concatenated, or the prefix in the model's own KV
# cache) by the model matrix (tests/model_matrix.py) or the zoo sweep (tests/model_zoo.py),
# logits, loss and every gradient. A layer may drop the forward's keyword arguments (StableLM),
# transform V after the cache (DiffLlama), chunk its attention (Llama 4) or keep state outside
# attention (hybrid SSMs): none of that can be read off a model, so any other type gets PEFT's
# own way, exact by construction (`wrap` warns): the prefix through the model's KV cache and its
# own attention, the prompt concatenated.
# Prefix tuning of decoders and encoders through ptuning_fast's attention function. (T5's and
# BART's encoder-decoders have their own verified path, seq2seq.py; BartForCausalLM is not it.)
PREFIX_ATTENTION_VERIFIED = frozenset({
    "bert", "gemma", "gemma2", "gemma3_text", "gemma4_text", "gpt2", "gpt_neox", "gpt_oss",
    "llama", "mistral", "opt", "phi3", "qwen2", "qwen3", "roberta",
})
# Prompt Tuning / P-Tuning's shared prompt pass (integrations/shared_prompt.py).
SHARED_PROMPT_VERIFIED = frozenset({
    "gemma", "gemma2", "gemma3_text", "gpt2", "gpt_neox", "gpt_oss", "llama", "mistral", "opt",
    "phi3", "qwen2", "qwen3",
})


# Encoder-decoders whose prefix tuning is implemented (integrations/seq2seq.py).
# T5's relative position bias over the prefix: integrations/attention_terms.py. mT5 / UMT5 share
# T5's attention but are not tested here, so they stay refused.
PREFIX_SEQ2SEQ_MODEL_TYPES = ("bart", "t5")

# Decoders whose learned positions are numbered from the attention mask (cumsum(mask) - 1, pads
# at -1) rather than from the cache length: under PEFT that numbering runs over the P ones its
# mask gets for the prefix, so the wrapper numbers real tokens the same way.
_POSITIONS_FROM_MASK = ("opt",)


def ones_in_front(mask, count: int):
    """PEFT's attention mask for `count` virtual tokens in front of the tokens: (B, count + L),
    `count` ones then `mask` (B, L); None stays None (every key visible)."""
    if mask is None:
        return None
    return torch.cat([mask.new_ones(mask.shape[0], count), mask], 1)


def ignored_in_front(labels, count: int):
    """PEFT's labels behind `count` virtual tokens: (B, count + L), `count` -100s (ignored by the
    loss) then `labels` (B, L)."""
    return torch.cat([labels.new_full((labels.shape[0], count), -100), labels], 1)


def numbers_positions_from_mask(model: nn.Module) -> bool:
    return model_type_of(model) in _POSITIONS_FROM_MASK


# Models whose attention layers compute attention themselves but read every key through
# `cache.update`: their prefix goes through the cache (integrations/cache_prefix.py), the model's
# own attention computes. Each is tested against PEFT (tests/test_falcon_prefix.py).
PREFIX_IN_CACHE_MODEL_TYPES = ("falcon",)
# Cache layers that hold only keys and values, where a prefix can stand in front.
_KEY_VALUE_CACHE_LAYERS = frozenset({"DynamicLayer", "DynamicSlidingWindowLayer"})
# Their attention implementations that call `cache.update` and take the mask the model built
# (Falcon's flash-attention class is not tested here).
_PREFIX_IN_CACHE_ATTENTION = ("eager", "sdpa")


# Models whose attention neither uses AttentionInterface nor reads a KV cache (DeBERTa v1/v2):
# no way in for a prefix without patching their modeling code.
_NO_PREFIX_PATH = ("deberta", "deberta-v2")


def unverified_model(model: nn.Module, method: str, task_type: str, shared_prompt) -> str | None:
    """The warning for a model type whose fast path is not verified, where `wrap` takes PEFT's
    own way instead of it; None where nothing changes."""
    name, model_type = type(model).__name__, model_type_of(model)
    if method == "prefix_tuning":
        if model_type in PREFIX_IN_CACHE_MODEL_TYPES or not prefix_in_cache(model):
            return None
        way = ("its prefix goes through the model's own KV cache and attention, as PEFT's "
               "does: exact, without ptuning_fast's attention kernels")
    else:
        if shared_prompt is False or supports_shared_prompt(model, task_type) \
                or not _shared_prompt_possible(model, task_type):
            return None
        way = "its prompt is concatenated in front of every row, as PEFT does (no shared pass)"
    return (f"{name}: model type {model_type!r} is not among those whose fast {method} path "
            f"ptuning_fast has verified against PEFT, so {way}")


def prefix_in_cache(model: nn.Module) -> bool:
    """Whether `model`'s prefix reaches its layers through a `PrefixedCache`: Falcon's, and
    every decoder's whose attention path is not verified (PREFIX_ATTENTION_VERIFIED)."""
    model_type = model_type_of(model)
    return model_type in PREFIX_IN_CACHE_MODEL_TYPES or not is_encoder_decoder(model) \
        and model_type not in PREFIX_ATTENTION_VERIFIED


def refuse_prefix_in_cache(model: nn.Module) -> None:
    """NotImplementedError where a prefix in the model's KV cache has no PEFT function to be
    equal to, or would not reach the layers."""
    config = model.config
    # transformers >= 5.25 reports these layers' one key head (num_key_value_heads = 1), so
    # PEFT sizes the prefix with one head too and computes a function: the cache path's.
    if model_type_of(model) == "falcon" and config.multi_query \
            and not config.new_decoder_architecture \
            and getattr(config, "num_key_value_heads", None) != 1:
        raise NotImplementedError(
            f"{type(model).__name__}: prefix tuning on Falcon with multi-query attention "
            "(multi_query=True, new_decoder_architecture=False, as Falcon-7B) is not supported: "
            f"PEFT sizes the prefix with num_attention_heads={config.num_attention_heads} heads "
            "per layer but these layers' keys have one head, and PEFT's forward fails "
            "(\"RuntimeError: Sizes of tensors must match except in dimension 2\"), so there "
            "is no PEFT function to match. Supported: new_decoder_architecture=True "
            "(Falcon-40B/180B, Falcon 2) and multi_query=False (Falcon-RW, ALiBi). Prompt "
            "Tuning and P-Tuning work on it")
    from transformers.cache_utils import DynamicCache
    kinds = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
    others = sorted(kinds - _KEY_VALUE_CACHE_LAYERS)
    if others:
        raise NotImplementedError(
            f"{type(model).__name__}: prefix tuning on this model is not supported: its prefix "
            f"would go through its KV cache (its fast path is not verified), and that cache "
            f"keeps state besides keys and values ({', '.join(others)} layers: linear attention "
            "or SSM), which a prefix of keys and values cannot give. Prompt Tuning and "
            "P-Tuning work on it")
    params = inspect.signature(model.forward).parameters
    if "cache" not in params and "past_key_values" not in params:
        raise NotImplementedError(
            f"{type(model).__name__}: prefix tuning on this model reaches the layers through the "
            "KV cache, and this head's forward takes none (it would drop the prefix). Prompt "
            "Tuning and P-Tuning work on it")
    refuse_attention_in_cache_model(model)


def refuse_attention_in_cache_model(model: nn.Module) -> None:
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation not in _PREFIX_IN_CACHE_ATTENTION:
        raise NotImplementedError(
            f"{type(model).__name__}: prefix tuning on this model runs the model's own "
            f"attention, tested with {list(_PREFIX_IN_CACHE_ATTENTION)}; got "
            f"attn_implementation={implementation!r}")


def refuse_unsupported(base_model: nn.Module, method: str) -> None:
    """NotImplementedError for a model / method pair that ptuning_fast cannot compute exactly."""
    name = type(base_model).__name__
    if is_encoder_decoder(base_model) and task_type_of(base_model) != "SEQ_2_SEQ_LM":
        raise NotImplementedError(
            f"{name}: on encoder-decoder models ptuning_fast supports the seq2seq LM (a "
            f"generating model such as T5ForConditionalGeneration), not "
            f"{task_type_of(base_model)}")
    if method != "prefix_tuning":
        try:
            embeddings = base_model.get_input_embeddings()
        except NotImplementedError as err:    # CANINE: hashed characters, no embedding table
            raise NotImplementedError(
                f"{name}: Prompt Tuning and P-Tuning put the prompt in front of the word "
                f"embeddings, and this model has no embedding table to take it ({err})") from None
        width = getattr(embeddings, "embedding_dim", None)
        hidden = getattr(text_config(base_model), "hidden_size", width)
        if width is not None and width != hidden:
            # ELECTRA, ALBERT: PEFT sizes the prompt by hidden_size, which cannot be put in
            # front of narrower word embeddings; PEFT's forward fails there.
            raise NotImplementedError(
                f"{name}: Prompt Tuning and P-Tuning put the prompt in front of the word "
                f"embeddings, which are {width} wide on this model, but PEFT sizes it by "
                f"hidden_size={hidden} (and fails): there is no PEFT function to match. "
                "Prefix tuning works on it")
        return
    model_type = model_type_of(base_model)
    if is_encoder_decoder(base_model) and model_type not in PREFIX_SEQ2SEQ_MODEL_TYPES:
        raise NotImplementedError(
            f"{name}: prefix tuning on this encoder-decoder model is not supported (only T5's "
            "and BART's prefix placement is tested against PEFT); Prompt Tuning and P-Tuning "
            "are")
    shared_kv = getattr(text_config(base_model), "num_kv_shared_layers", 0)
    if shared_kv:
        raise NotImplementedError(
            f"{name}: prefix tuning on a model whose last {shared_kv} "
            "layers reuse earlier layers' keys and values (num_kv_shared_layers) is not "
            "supported: those layers would need the prefix of the layer they read from")
    if model_type in _NO_PREFIX_PATH:
        raise NotImplementedError(
            f"{name}: prefix tuning on DeBERTa is not supported: its attention "
            "(DisentangledSelfAttention) is computed in the model's own code and takes no KV "
            "cache, so a prefix can reach it neither through transformers' AttentionInterface "
            "nor through a cache. PEFT 0.21 refuses it as well (\"ValueError: Model does not "
            "support past key values which are required for prefix tuning.\"); P-Tuning v2's "
            "own code edits that attention module, and ptuning_fast does not patch model code. "
            "Prompt Tuning and P-Tuning work on it")
    if prefix_in_cache(base_model):
        refuse_prefix_in_cache(base_model)
        return
    if not uses_attention_interface(base_model):
        raise NotImplementedError(
            f"{name}: prefix tuning needs a model whose attention goes through transformers' "
            "AttentionInterface (the prefix reaches each layer through it); this model's "
            "modeling code calls its own attention, which would silently ignore the prefix. "
            "Prompt Tuning and P-Tuning work on it")


def refuse_unsliceable_prefix(base_model: nn.Module, config, dims) -> None:
    """NotImplementedError where PEFT's one prefix shape, sliced per layer, cannot serve every
    layer of a model whose layers differ (PEFT skips those layers, while the attention mask it
    builds counts the prefix for them too)."""
    if config.method != "prefix_tuning" or config.per_layer_shapes:
        return
    wider = layers_wider_than(dims.layer_kv_shapes, dims.num_kv_heads, dims.head_dim)
    if wider:
        shapes = [dims.layer_kv_shapes[i] for i in wider]
        raise NotImplementedError(
            f"{type(base_model).__name__}: PEFT sizes one prefix for this model "
            f"({dims.num_kv_heads} kv heads of dim {dims.head_dim}, its widest heads) and "
            f"slices it for each layer, but layers {wider} have (kv heads, head dim) {shapes}: "
            "PEFT skips them, leaving their caches without the P entries its attention mask "
            "counts, so there is no PEFT function to match. "
            "PrefixTuningConfig(per_layer_shapes=True) gives each layer "
            "a prefix of its own shape (a checkpoint PEFT cannot load)")
