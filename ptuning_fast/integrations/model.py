"""`wrap` / `PTuningModel`: a frozen transformers model plus one soft-prompt module.

Same function as PEFT's PeftModel with the same weights:
- prefix tuning: real-token positions are shifted by P (PEFT's prefilled cache does this), and
  every layer attends to its prefix through the registered attention function; the prefix is
  never copied per row and never enters the KV cache.
- prompt tuning / P-Tuning: the prompt is prepended to the input embeddings (fused gather, one
  prompt shared by every row), P ones to the attention mask, P zeros to token_type_ids and, for
  token-level tasks, P -100 labels. Logits keep PEFT's shape (B, P + L, V).
"""
from __future__ import annotations

import contextlib
import functools
import types
import warnings

import torch
from torch import nn

from .. import ops
from ..config import ModelDims, resolve_config
from ..prompts import PrefixEncoder, PromptEmbedding, PromptEncoder
from ..validation import check_index_range
from . import attention, seq2seq
from . import shared_prompt as shared_pass
from . import packed_inputs
from .packed_inputs import packed_segments_of, refuse_packed
from .peft_surface import BaseModelState, PeftSurfaceMixin
from .support import (ignored_in_front, numbers_positions_from_mask, ones_in_front,
                      prefix_in_cache, refuse_unsliceable_prefix, refuse_unsupported,
                      supports_shared_prompt, task_type_of, unverified_model)

_HEAD_NAMES = ("classifier", "score")   # PEFT's default modules_to_save for classification


# The heads a task type may train and a checkpoint may hold (PEFT's modules_to_save defaults):
# never the transformer itself, its embeddings or a causal LM's output projection.
HEADS_BY_TASK = {"SEQ_CLS": _HEAD_NAMES, "TOKEN_CLS": _HEAD_NAMES, "QUESTION_ANS": ("qa_outputs",)}


def heads_to_train(config, given, base_model, task_type: str) -> list[str]:
    """`given` (wrap's modules_to_save) or the task's default heads, plus the config's
    `modules_to_save` as PEFT adds them; PEFT's default names ("classifier", "score") that the
    model lacks are skipped, as PEFT skips them."""
    children = [n for n, _ in base_model.named_children()]
    names = list(given) if given is not None \
        else [n for n in children if n in HEADS_BY_TASK.get(task_type, ())]
    return names + [n for n in (config.modules_to_save or []) if n not in names
                    and (n in children or n not in _HEAD_NAMES)]


def check_wrappable(base_model) -> None:
    """What `PTuningModel` refuses before touching anything: a model that is already wrapped,
    and models whose attention or inputs it cannot handle."""
    if isinstance(base_model, PTuningModel):
        raise TypeError(
            "wrap() got a PTuningModel: wrapping a wrapped model would silently drop the outer "
            "prompt/prefix. Wrap the base model once (model.base_model is the unwrapped one)")
    if any(c.__name__ == "PeftModel" for c in type(base_model).__mro__):
        raise TypeError(f"wrap() got a PEFT model ({type(base_model).__name__}); expected a "
                        "plain transformers model (PeftModel.get_base_model() gives it)")
    if not isinstance(base_model, nn.Module) or not hasattr(base_model, "config"):
        raise TypeError(f"wrap() expects a transformers model (an nn.Module with a `config`), "
                        f"got {type(base_model).__name__}")


def build_prompt_module(config, dims: ModelDims, word_embeddings=None, tokenizer=None):
    if config.method == "prefix_tuning":
        return PrefixEncoder.from_config(config, dims)
    if config.method == "p_tuning":
        return PromptEncoder.from_config(config, dims)
    return PromptEmbedding.from_config(config, dims, word_embeddings, tokenizer)


def _submodule(model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"`{what}` names {name!r}, which {type(model).__name__} does not have "
                         f"(its modules: {sorted(n for n, _ in model.named_children())})") from None


def _refuse_empty_batch(name: str, ref) -> None:
    """transformers' models cannot run a batch of 0 rows (their reshapes fail with an error that
    names nothing; per-task ids of 0 rows failed in a min()): say so up front."""
    if isinstance(ref, torch.Tensor) and ref.dim() >= 1 and ref.shape[0] == 0:
        raise ValueError(f"`{name}` has an empty batch (shape {tuple(ref.shape)}); expected at "
                         "least one row")


def _cache_in(kwargs: dict):
    """The KV cache among a forward's kwargs. transformers 5.24 renamed the argument
    `past_key_values` to `cache` (generate() passes the new name, models still take the old
    one); read whichever is there."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def _cache_length(kwargs) -> int:
    """Tokens already in the KV cache among a forward's kwargs."""
    cache = _cache_in(kwargs)
    return cache.get_seq_length() if cache is not None else 0


def _refuse_static_cache(past) -> None:
    """Where the prefix goes through the KV cache (Falcon, cache_prefix.py) or for seq2seq
    models: a static cache would need the prefix in its preallocated buffer. Refused rather
    than silently different."""
    if past is not None and getattr(past, "is_compileable", False):
        raise NotImplementedError(
            f"ptuning_fast does not support static caches here (got {type(past).__name__}): "
            "use the default dynamic cache (no `cache_implementation`, or 'dynamic')")


def _check_static_cache(past) -> None:
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


# transformers' dynamic caches (DYNAMIC_CACHE_IMPLEMENTATIONS), and the static one.
_GENERATION_CACHES = (None, "dynamic", "offloaded", "quantized", "static")


def _refuse_static_generation(kwargs: dict, base_model, *, static_ok: bool) -> None:
    config = kwargs.get("generation_config") or getattr(base_model, "generation_config", None)
    implementation = kwargs.get("cache_implementation",
                                getattr(config, "cache_implementation", None))
    allowed = _GENERATION_CACHES if static_ok else _GENERATION_CACHES[:-1]
    if implementation not in allowed:
        raise NotImplementedError(
            f"ptuning_fast's generate does not support cache_implementation={implementation!r} "
            f"here (the result would silently change): use one of {list(allowed[1:])} or none")
    (_check_static_cache if static_ok else _refuse_static_cache)(_cache_in(kwargs))


def _retarget_forward_patch(wrapper: "PTuningModel", patched) -> bool:
    """Libraries patch a transformers model's forward in place: `model.forward =
    MethodType(new_forward, model)`, `new_forward` calling the `model.forward` it captured and
    reading the model's backbone and LM head (TRL's `add_fused_lm_head`). For a PeftModel they
    patch `get_base_model()`, and PEFT's forward hands the extra arguments (`fused_lm_head`)
    and its own labels (P -100s in front) through to it. They recognise PeftModel by class, so
    on this wrapper the patch lands on the wrapper itself, where the backbone is not at
    `base_model` and the prompt would be skipped. Such a patch — bound to the wrapper, wrapping
    the wrapper's current forward — is applied where PEFT has it instead: on the base model,
    wrapping the base model's forward, with this wrapper's forward in front (prompt, labels,
    prefix binding), as for a PeftModel. `base_model` keeps its meaning (PEFT's). Patches that
    do not wrap the wrapper's bound forward (accelerate's autocast wraps the function and stays
    on the wrapper) are set as usual. Returns whether `patched` went to the base model."""
    if not isinstance(patched, types.MethodType) or patched.__self__ is not wrapper \
            or "base_model" not in wrapper._modules:
        return False
    function, current = patched.__func__, wrapper.forward
    cells = function.__closure__ or ()

    def holds_current(cell) -> bool:
        try:
            content = cell.cell_contents
        except ValueError:          # a closure variable not assigned yet
            return False
        return isinstance(content, types.MethodType) and content == current

    hits = [holds_current(cell) for cell in cells]
    if not any(hits):
        return False
    base = wrapper.base_model
    closure = tuple(types.CellType(base.forward) if hit else cell
                    for hit, cell in zip(hits, cells))
    moved = types.FunctionType(function.__code__, function.__globals__, function.__name__,
                               function.__defaults__, closure)
    moved.__kwdefaults__ = function.__kwdefaults__
    moved.__dict__.update(function.__dict__)
    moved.__qualname__ = function.__qualname__
    if moved.__dict__.get("__wrapped__") is type(wrapper).forward:
        # generate() validates its kwargs against the signature a patch says it wraps.
        moved.__wrapped__ = type(base).forward
    base.forward = types.MethodType(moved, base)
    return True


class PTuningModel(PeftSurfaceMixin, nn.Module):
    """A frozen transformers model with Prompt Tuning, P-Tuning or Prefix Tuning (P-Tuning v2).

    Trainable: `prompt_encoder` and, for classification models, the head named in
    `modules_to_save` (default: PEFT's "classifier" / "score"). Everything else is frozen and
    never gets a `.grad`. Unknown attributes resolve on the base model (config, device, ...).
    PeftModel's calls (print_trainable_parameters, disable_adapter, unload, ...) and
    nearest_tokens / ensemble come from `PeftSurfaceMixin`. A forward patch assigned to the
    wrapper that wraps its forward (TRL's fused LM head) goes to the base model, behind the
    wrapper's forward, where it sits under a PeftModel (`_retarget_forward_patch`).
    `prompt_logits=False` drops the P prompt positions from token-level logits (prompt tuning /
    P-Tuning; PEFT keeps them, hence the default).
    `shared_prompt` (prompt tuning / P-Tuning on causal decoders): compute the prompt positions
    once per task instead of once per row where that is the same function
    (integrations/shared_prompt.py). "auto": in every forward, and in generate() on CUDA (on
    CPU the concatenation generates faster); True: in generate() everywhere too; False: always
    PEFT's concatenation.
    """

    def __init__(self, base_model: nn.Module, config, backend: str = "auto", *, tokenizer=None,
                 modules_to_save: list[str] | None = None, prompt_logits: bool = True,
                 shared_prompt: bool | str = "auto"):
        super().__init__()
        # Everything is checked and built before the caller's model is touched: a refused wrap
        # leaves it as it was (parameters' requires_grad, attention implementation).
        check_wrappable(base_model)
        if backend not in ops.BACKENDS:
            raise ValueError(f"`backend` must be one of {ops.BACKENDS}, got {backend!r}")
        config = resolve_config(config)
        refuse_unsupported(base_model, config.method)
        try:
            dims = ModelDims.from_model_config(base_model.config)
        except ValueError as err:
            raise ValueError(f"{type(base_model).__name__}: {err}") from None
        task_type = task_type_of(base_model)
        config.check_model(dims, task_type)
        refuse_unsliceable_prefix(base_model, config, dims)
        modules_to_save = heads_to_train(config, modules_to_save, base_model, task_type)
        heads = {name: _submodule(base_model, name, "modules_to_save") for name in modules_to_save}
        allowed = HEADS_BY_TASK.get(task_type, ())
        if any(name not in allowed for name in heads):
            # A checkpoint loads only these heads (never the transformer or its LM head): train
            # nothing that could not be loaded back.
            raise ValueError(f"`modules_to_save` {list(heads)} must name heads that a "
                             f"{task_type} model ({type(base_model).__name__}) trains: "
                             f"{list(allowed) or 'none'}")
        if config.method == "prefix_tuning" and not hasattr(base_model, "set_attn_implementation"):
            raise TypeError(f"prefix tuning needs a transformers model that can switch its "
                            f"attention implementation; {type(base_model).__name__} has no "
                            "set_attn_implementation")
        prefix_layers = seq2seq.prefix_layers(base_model, dims.num_layers) \
            if config.method == "prefix_tuning" and task_type == "SEQ_2_SEQ_LM" else None
        device = next(base_model.parameters()).device
        prompt_encoder = build_prompt_module(
            config, dims, base_model.get_input_embeddings(), tokenizer).to(device)
        if config.inference_mode:     # PEFT's inference module: the encoder's output only
            prompt_encoder.export()
        base_state = BaseModelState(base_model)

        self.ptuning_config = config
        self.backend = backend
        self.prompt_logits = prompt_logits
        self.dims = dims
        self.task_type = task_type
        self.base_model = base_model
        self.prompt_encoder = prompt_encoder
        self.modules_to_save = list(modules_to_save)
        self._prefix_layers = prefix_layers    # None: each attention module's own layer_idx
        # Falcon: the prefix goes through the KV cache, the model's own attention computes
        # (cache_prefix.py); elsewhere through the registered attention function.
        self._prefix_in_cache = self.is_prefix and prefix_in_cache(base_model)
        self._base_state = base_state
        self._adapter_disabled = self._unloaded = False
        # Prompt Tuning / P-Tuning on a causal decoder: the prompt once per task (shared_prompt).
        if shared_prompt not in (True, False, "auto"):
            raise ValueError(f"`shared_prompt` must be True, False or 'auto', got "
                             f"{shared_prompt!r}")
        self._shared_prompt = shared_prompt is not False and not self.is_prefix \
            and supports_shared_prompt(base_model, task_type)
        self._shared_prompt_generate = shared_prompt is True
        self._base_has_dropout = self._shared_prompt and shared_pass.has_dropout(base_model)
        unverified = unverified_model(base_model, config.method, task_type, shared_prompt)
        if unverified:
            warnings.warn(unverified, stacklevel=3)
        if self.uses_own_attention:
            base_model.set_attn_implementation(attention.register())
        elif self._prefix_in_cache and backend != "auto" and not unverified:
            warnings.warn(f"backend={backend!r} is not used: {type(base_model).__name__} computes "
                          "attention in its own code, so its prefix goes through the KV cache and "
                          "the model's own attention computes it", stacklevel=3)
        for p in base_model.parameters():
            p.requires_grad_(False)
        for head in heads.values():
            for p in head.parameters():
                p.requires_grad_(not config.inference_mode)    # PEFT: frozen for inference
        attention.claim(base_model)

    # ----------------------------------------------------------------------------------------
    @property
    def is_prefix(self) -> bool:
        return self.ptuning_config.method == "prefix_tuning"

    @property
    def uses_own_attention(self) -> bool:
        """Whether the base model runs ptuning_fast's attention function (prefix tuning, and
        the shared prompt pass of prompt tuning / P-Tuning on causal decoders)."""
        return self.is_prefix and not self._prefix_in_cache or self._shared_prompt

    @property
    def num_virtual_tokens(self) -> int:
        return self.ptuning_config.num_virtual_tokens

    @property
    def loss_type(self):
        """The base model's, except for a causal LM with a prompt in front (prompt tuning,
        P-Tuning): None. HF Trainer reads it to count a batch's label tokens
        (`num_items_in_batch`, the loss's divisor): for a causal LM loss it skips each row's
        first label, which a shifted loss never predicts; behind a prompt that label is
        predicted (from the last prompt position), so every label must count."""
        if not self.is_prefix and self.task_type == "CAUSAL_LM":
            return None
        return getattr(self.base_model, "loss_type", None)

    def __setattr__(self, name: str, value) -> None:
        if name == "forward" and _retarget_forward_patch(self, value):
            return
        super().__setattr__(name, value)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def _model_dtype(self) -> torch.dtype:
        return self.base_model.get_input_embeddings().weight.dtype

    def _check_task_ids(self, task_ids, batch: int):
        T = self.ptuning_config.num_tasks
        if T == 1:
            if task_ids is not None:
                raise ValueError("`task_ids` given but the config has num_tasks=1")
            return None
        if task_ids is None:
            raise ValueError(f"the config has num_tasks={T}: pass `task_ids` (B,) = ({batch},)")
        task_ids = torch.as_tensor(task_ids, device=self.prompt_encoder.embedding.weight.device)
        if task_ids.is_floating_point() or task_ids.dtype == torch.bool:
            raise TypeError(f"`task_ids` must be an integer tensor, got dtype {task_ids.dtype}")
        if task_ids.dim() != 1 or task_ids.shape[0] != batch:
            raise ValueError(f"`task_ids` must have shape ({batch},), got shape "
                             f"{tuple(task_ids.shape)}")
        # Once per forward (the layers skip it): on CPU a ValueError now, on a GPU a
        # device-side assert (no host sync in a training step).
        check_index_range("task_ids", task_ids, T, f"the config's num_tasks={T}")
        return task_ids.long()

    def _binding(self, task_ids, segments=None, prefixes=None,
                 seq_idx=None) -> attention.PrefixBinding:
        """What the attention function reads: prefix tuning's prefixes, or `prefixes` given (the
        shared prompt pass's), for the rows' `task_ids`; packed sequences' `segments` and the
        `seq_idx` checked against them."""
        current = getattr(self.base_model.config, "_attn_implementation", None)
        if current != attention.ATTN_IMPLEMENTATION and not self._prefix_in_cache:
            # Another attention function would silently ignore the prefix.
            raise RuntimeError(f"the base model's attention implementation is {current!r}, not "
                               f"{attention.ATTN_IMPLEMENTATION!r}: the wrapper needs it (was "
                               "set_attn_implementation called after wrapping?)")
        if prefixes is None and self.is_prefix:
            prefixes = self.prompt_encoder().to(self._model_dtype())   # once per step, not per row
        return attention.PrefixBinding(prefixes, task_ids, self.backend,
                                       type(self.base_model).__name__, self._prefix_layers,
                                       segments, seq_idx=seq_idx)

    def _prefix_position_ids(self, input_ids, ref, start: int, attention_mask=None):
        """Positions of the real tokens as PEFT's prefilled cache of `start` entries makes them:
        start, start + 1, ... — or, for RoBERTa-style embeddings that number tokens from the
        padding mask, that numbering offset by `start` (None: the model numbers inputs_embeds
        itself, ignoring any cache, as it does under PEFT); for models that number tokens from
        the attention mask (OPT), that numbering over PEFT's mask of P ones + `attention_mask`
        (which covers the cache and the current tokens)."""
        if attention_mask is not None and numbers_positions_from_mask(self.base_model):
            full = ones_in_front(attention_mask, self.num_virtual_tokens)
            return (full.cumsum(1) * full - 1)[:, -ref.shape[1]:].long()
        embeddings = getattr(getattr(self.base_model, "base_model", None), "embeddings", None)
        if hasattr(embeddings, "create_position_ids_from_input_ids") \
                and getattr(embeddings, "padding_idx", None) is not None:
            if input_ids is None:
                return None
            return embeddings.create_position_ids_from_input_ids(
                input_ids, embeddings.padding_idx, start)
        return torch.arange(start, start + ref.shape[1], device=ref.device)[None]

    def _embed_with_prompt(self, input_ids, inputs_embeds, task_ids):
        """[prompt; word embeddings] -> (B, P + L, d), in the model's dtype."""
        prompt = self.prompt_encoder()
        emb = self.base_model.get_input_embeddings()
        if inputs_embeds is None and type(emb) is nn.Embedding:
            return ops.prompt_embedding(input_ids, emb.weight, prompt, prompt_index=task_ids,
                                        backend=self.backend)
        # Embedding modules with extra math (scaled embeddings, ...) or given inputs_embeds:
        # run the module as the model would, then prepend.
        words = emb(input_ids) if inputs_embeds is None else inputs_embeds
        rows = prompt.expand(words.shape[0], -1, -1) if task_ids is None else prompt[task_ids]
        return torch.cat([rows.to(words.dtype), words], dim=1)

    # ----------------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, labels=None, task_ids=None,
                inputs_embeds=None, position_ids=None, token_type_ids=None, **kwargs):
        """HF-style output of the base model; `task_ids` (B,) picks each row's prompt/prefix."""
        self._check_not_unloaded()
        if self._adapter_disabled:
            return self._base_forward(input_ids, attention_mask, labels, inputs_embeds,
                                      position_ids, token_type_ids, kwargs)
        args = (input_ids, attention_mask, labels, task_ids, inputs_embeds, position_ids,
                token_type_ids)
        if not attention.any_generation_open():       # training, compiled or not
            return self._forward(*args, **kwargs)
        # A forward call inside one of this model's generate() calls (a logits processor, ...)
        # brings its own prompt/prefix: the generation's step hook must not act on it too.
        with attention.generating(self.base_model, None):
            return self._forward(*args, **kwargs)

    def _forward(self, input_ids, attention_mask, labels, task_ids, inputs_embeds, position_ids,
                 token_type_ids, **kwargs):
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None and self.task_type == "SEQ_2_SEQ_LM" \
                and kwargs.get("encoder_outputs") is not None:
            ref = kwargs["encoder_outputs"][0]      # decoding with the encoder already run
        if ref is None:
            raise ValueError("pass `input_ids` or `inputs_embeds`")
        _refuse_empty_batch("input_ids" if input_ids is not None else "inputs_embeds", ref)
        batch = ref.shape[0]
        task_ids = self._check_task_ids(task_ids, batch)
        if self.task_type == "SEQ_2_SEQ_LM":
            return seq2seq.forward(self, input_ids, attention_mask, labels, task_ids,
                                   inputs_embeds, position_ids, token_type_ids, **kwargs)
        P = self.num_virtual_tokens
        past = _cache_in(kwargs)
        past_len = _cache_length(kwargs)
        if self._prefix_in_cache:
            from . import cache_prefix
            _refuse_static_cache(past)
            refuse_packed(position_ids, attention_mask, past_len, kwargs,
                          f"prefix tuning on {type(self.base_model).__name__}")
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            return cache_prefix.forward(self, self._binding(task_ids), input_ids, attention_mask,
                                        inputs_embeds, position_ids, labels, kwargs)
        if self.is_prefix:
            _check_static_cache(past)
            # Every packed sequence sees the prefix, its positions shifted by P as in its own row.
            segments, position_ids = packed_segments_of(position_ids, attention_mask, past_len,
                                                        kwargs, ref)
            if position_ids is None:
                position_ids = self._prefix_position_ids(input_ids, ref, P + past_len,
                                                         attention_mask)
            else:
                position_ids = position_ids + P
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            kwargs[attention.PREFIX_KWARG] = self._binding(task_ids, segments,
                                                           seq_idx=kwargs.get("seq_idx"))
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                   inputs_embeds=inputs_embeds, position_ids=position_ids,
                                   labels=labels, **kwargs)
        if packed_inputs.is_packed(position_ids, attention_mask, past_len, kwargs):
            return self._without_prompt_logits(packed_inputs.prompt_forward(
                self, input_ids, attention_mask, labels, task_ids, inputs_embeds, position_ids,
                token_type_ids, past_len, kwargs))
        if position_ids is not None:
            warnings.warn("position_ids are ignored with prompt tuning / P-Tuning (as in PEFT): "
                          "positions are those of the [prompt; tokens] sequence", stacklevel=2)
        if shared_pass.applies(self, batch, past_len, kwargs):
            return shared_pass.forward(self, input_ids, attention_mask, labels, task_ids,
                                         inputs_embeds, token_type_ids, **kwargs)
        attention_mask = ones_in_front(attention_mask, P)
        if past_len:
            # Decoding with a cache that already holds the prompt: only the mask needs it.
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            return self.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds,
                                   attention_mask=attention_mask, labels=labels, **kwargs)
        if token_type_ids is not None:
            kwargs["token_type_ids"] = torch.cat(
                [token_type_ids.new_zeros(batch, P), token_type_ids], 1)
        if labels is not None and self.task_type in ("CAUSAL_LM", "TOKEN_CLS"):
            labels = ignored_in_front(labels, P)
        embeds = self._embed_with_prompt(input_ids, inputs_embeds, task_ids)
        return self._without_prompt_logits(self.base_model(
            inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs))

    def _without_prompt_logits(self, out):
        """`prompt_logits=False`: token-level logits without the P prompt positions."""
        if not self.prompt_logits and self.task_type in ("CAUSAL_LM", "TOKEN_CLS") \
                and getattr(out, "logits", None) is not None:
            out.logits = out.logits[:, self.num_virtual_tokens:]
        return out

    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, *args, task_ids=None, **kwargs):
        """`base_model.generate` with the prompt/prefix (greedy, sampling, beam search, ...).

        The prefix reaches the attention function through a `Generation` made current for this
        base model only (generate() rejects unknown kwargs); a forward pre-hook on the base
        model, acting for this call only, shifts positions (prefix) or swaps the prompt into the
        first step's embeddings (prompt tuning). Other threads, nested calls and other wrapped
        models each see their own.
        """
        self._check_not_unloaded()
        if self._adapter_disabled:
            return self.base_model.generate(*args, **kwargs)
        if self.task_type not in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
            raise ValueError(f"generate() needs a causal or seq2seq LM, this base model is "
                             f"{self.task_type}")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("PTuningModel.generate needs `input_ids`")
        _refuse_empty_batch("input_ids", input_ids)
        task_ids = self._check_task_ids(task_ids, input_ids.shape[0])
        # A static cache works where the prefix (or the shared prompt) reaches our attention
        # function beside the cache: not through the cache (Falcon), not for encoder-decoders,
        # not for the concatenation (transformers then builds 4D masks of its own).
        shared = not self.is_prefix and (self._shared_prompt_generate
                                         or input_ids.device.type == "cuda") \
            and shared_pass.applies(self, input_ids.shape[0], 0, {})
        _refuse_static_generation(kwargs, self.base_model, static_ok=shared or (
            self.is_prefix and not self._prefix_in_cache and self.task_type == "CAUSAL_LM"))
        if self.task_type == "SEQ_2_SEQ_LM":
            return seq2seq.generate(self, args, task_ids, kwargs)
        pause_own_attention = contextlib.nullcontext()
        if self.is_prefix:
            generation = attention.Generation(self._binding(task_ids), task_ids)
            step = self._prefix_step_hook
        elif shared:
            # The prompt's keys and values computed once per task, then generated from as a
            # prefix (the cache holds real tokens only) by the decode kernel. Not on CPU: there
            # the extra pass costs what it saves (a forward of P positions reads every weight,
            # like a decoding step) and the torch path's per-step prefix concatenation makes
            # decoding slower: 5% slower than the concatenation, bench/NOTES.md.
            with attention.generating(self.base_model, None):
                prefixes, _ = shared_pass.prompt_pass(self, kwargs.get("token_type_ids"))
            generation = attention.Generation(self._binding(task_ids, prefixes=prefixes),
                                              task_ids)
            step = self._shared_prompt_step_hook
        else:
            generation = attention.Generation(None, task_ids)
            step = self._prompt_step_hook
            if self.uses_own_attention:
                # The concatenation attends to no prefix: the base model's own attention
                # computes it, as under PEFT, without our function's per-call checks and
                # dispatch (~70 us a layer call in CPU decoding: 5% of a generation there).
                pause_own_attention = self._base_state.base_attention()
        # The hook is never traced: transformers' compiled decoding compiles `__call__`, hooks
        # included, and Dynamo would guard on the registry of wrapped modules (a weak dict that
        # changes as models come and go: it once crashed building that guard) and on this
        # call's objects; it runs as Python before the compiled forward. (Disabled here, not
        # with a decorator: that would import torch._dynamo, and with it Triton, when
        # ptuning_fast is imported, before a caller can set TRITON_INTERPRET.)
        step_hook = torch.compiler.disable(functools.partial(self._step_hook, step, generation))
        hooks = [self.base_model.register_forward_pre_hook(step_hook, with_kwargs=True)]
        if self._prefix_in_cache:     # generate() keeps its own cache of real tokens
            from .cache_prefix import unwrap_output
            hooks.append(self.base_model.register_forward_hook(
                lambda module, args, output: unwrap_output(output)))
        try:
            with attention.generating(self.base_model, generation), pause_own_attention:
                return self.base_model.generate(*args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()

    @staticmethod
    def _step_hook(step, generation, module, args, kwargs):
        # Every concurrent generate() of this base model (threads) registers a hook; each acts
        # only in the context where its own call is current.
        if attention.current_generation(module) is not generation:
            return None
        return step(generation, args, kwargs)

    def _prefix_step_hook(self, generation, args, kwargs):
        (_refuse_static_cache if self._prefix_in_cache else _check_static_cache)(
            _cache_in(kwargs))
        P = self.num_virtual_tokens
        ids = kwargs.get("input_ids")
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + P
        elif ref is not None:
            start = P + _cache_length(kwargs)
            kwargs["position_ids"] = self._prefix_position_ids(ids, ref, start,
                                                               kwargs.get("attention_mask"))
        if self._prefix_in_cache:
            from .cache_prefix import generation_step
            kwargs = generation_step(self.base_model, generation.binding, kwargs)
        else:
            # The binding as a forward argument as well: a compiled forward (torch.compile of
            # the model's forward, a static cache's decoding step) then reads no context
            # variable, which Dynamo cannot trace.
            kwargs[attention.PREFIX_KWARG] = generation.binding
        return args, kwargs

    def _shared_prompt_step_hook(self, generation, args, kwargs):
        # PEFT's prompt generation numbers the [prompt; tokens] sequence itself (its position
        # ids from generate(), mask-based, are dropped): the prefix steps' numbering from P.
        kwargs.pop("position_ids", None)
        return self._prefix_step_hook(generation, args, kwargs)

    def _prompt_step_hook(self, generation, args, kwargs):
        _refuse_static_cache(_cache_in(kwargs))
        P = self.num_virtual_tokens
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        ref = embeds if embeds is not None else ids
        if _cache_length(kwargs) == 0 and ref is not None:
            task_ids = generation.task_ids
            if task_ids is not None and task_ids.shape[0] != ref.shape[0]:
                task_ids = task_ids.repeat_interleave(ref.shape[0] // task_ids.shape[0])
            kwargs["inputs_embeds"] = self._embed_with_prompt(
                ids if embeds is None else None, embeds, task_ids)
            kwargs["input_ids"] = None
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = ones_in_front(kwargs["attention_mask"], P)
        kwargs.pop("position_ids", None)    # PEFT: positions of the [prompt; tokens] sequence
        return args, kwargs

    # ----------------------------------------------------------------------------------------
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        """Activation (gradient) checkpointing of the base model's layers; works with prefix
        tuning, since the prefix travels in the layers' kwargs. Needs non-reentrant
        checkpointing (the default). Other kwargs (every_n_layers, offload) go to the base."""
        kw = dict(activation_checkpointing_kwargs or {})
        if kw.get("use_reentrant", False):
            raise ValueError("use_reentrant=True is not supported: reentrant checkpointing drops "
                             "gradients of tensors passed as keyword arguments (the prefix)")
        kw["use_reentrant"] = False
        if hasattr(self.base_model, "activation_checkpointing_enable"):   # transformers >= 5.x
            self.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw,
                                                            **kwargs)
        else:
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw,
                                                          **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        """Older name of `activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self):
        if hasattr(self.base_model, "activation_checkpointing_disable"):
            self.base_model.activation_checkpointing_disable()
        else:
            self.base_model.gradient_checkpointing_disable()

    gradient_checkpointing_disable = activation_checkpointing_disable

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def save_pretrained(self, save_directory, full_state: bool = False, *,
                        overwrite: bool = False, is_main_process: bool | None = None, **kwargs):
        """PEFT's format (adapter_config.json + adapter_model.safetensors); `full_state=True`
        also keeps the encoder's parameters for resuming training. Atomic per file (written
        aside, then renamed); a directory holding a different adapter is refused unless
        `overwrite=True`. Under torch.distributed only rank 0 writes (`is_main_process`
        overrides); a model sharded with FSDP2 (`fully_shard`) is gathered first, so there
        every rank must call it. Other keyword arguments (PEFT's) are accepted and ignored."""
        from . import checkpoint
        checkpoint.save(self, save_directory, full_state=full_state, overwrite=overwrite,
                        is_main_process=is_main_process)

    @classmethod
    def from_pretrained(cls, base_model, model_id, backend: str = "auto", *,
                        is_trainable: bool = False, **kwargs) -> "PTuningModel":
        """Loads a directory written by `save_pretrained` or by PEFT."""
        from . import checkpoint
        return checkpoint.load(cls, base_model, model_id, backend=backend,
                               is_trainable=is_trainable, **kwargs)


def wrap(base_model: nn.Module, config, backend: str = "auto", **kwargs) -> PTuningModel:
    """`PTuningModel(base_model, config, backend)`; `config` may be ours or PEFT's."""
    return PTuningModel(base_model, config, backend, **kwargs)
