"""The PeftModel calls PEFT users make, and a few beyond PEFT, as a mixin of `PTuningModel`.

PEFT's: `get_nb_trainable_parameters`, `print_trainable_parameters` (PEFT's exact line),
`get_base_model`, `disable_adapter()` (a context in which the model is its base model),
`unload()` (the base model back as it was before wrapping).
Beyond PEFT: `nearest_tokens` (Lester et al.'s reading of a trained prompt through its nearest
vocabulary tokens) and `ensemble` (one input under several task prompts in one batch, the
predictions combined).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from . import generations


class BaseModelState:
    """What wrapping changes on the caller's model (parameters' requires_grad, the attention
    implementation, the training flag), recorded to be put back: by `unload`, or when loading a
    checkpoint fails after the model was wrapped."""

    def __init__(self, base_model: nn.Module):
        self.base_model = base_model
        self.requires_grad = [(p, p.requires_grad) for p in base_model.parameters()]
        self.attn = getattr(base_model.config, "_attn_implementation", None)
        self.training = base_model.training

    def restore_attention(self) -> None:
        if self.attn is not None and self.attn != getattr(self.base_model.config,
                                                          "_attn_implementation", None):
            self.base_model.set_attn_implementation(self.attn)

    @contextlib.contextmanager
    def base_attention(self):
        """The base model's own attention implementation meanwhile; on exit, the one that was
        set on entry (nested uses restore each other's)."""
        current = getattr(self.base_model.config, "_attn_implementation", None)
        self.restore_attention()
        try:
            yield
        finally:
            if current != getattr(self.base_model.config, "_attn_implementation", None):
                self.base_model.set_attn_implementation(current)

    def restore(self, *, training: bool = True) -> None:
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)
        self.restore_attention()
        if training:
            self.base_model.train(self.training)


@dataclass
class NearestTokens:
    """`nearest_tokens`' answer. `ids`, `similarity`: (P, k), or (T, P, k) with several tasks —
    for each virtual token its k nearest vocabulary ids, most similar first, and their cosine
    similarities; `tokens`: the same as strings (nested lists) when a tokenizer was given."""
    ids: torch.Tensor
    similarity: torch.Tensor
    tokens: list | None = None


@dataclass
class EnsembleOutput:
    """`ensemble`'s answer for B inputs under E prompts.

    logits      (B, E, ..., V) each prompt's logits (the model's dtype)
    log_probs   (B, ..., V) float32: log of the prompts' averaged probabilities
    votes       (B, ...) majority vote of the prompts' argmax predictions (ties: the
                smallest class id, as torch.mode)
    """
    logits: torch.Tensor
    log_probs: torch.Tensor
    votes: torch.Tensor


class PeftSurfaceMixin:
    """Methods of `PTuningModel` that mirror PeftModel's (and go beyond it). Relies on the
    wrapper's `base_model`, `prompt_encoder`, `ptuning_config`, `is_prefix` and
    `_base_state` (a `BaseModelState` taken before wrapping)."""

    # -- PeftModel's ---------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters) counted as PEFT counts them: every parameter
        of the wrapped model once (the base model's and the prompt module's). The trainable
        count equals PEFT's; with a classification head, PEFT's total is larger by the head's
        size, because PEFT trains a copy of the head beside the frozen original (its
        modules_to_save wrapper) where this model trains the head in place."""
        trainable = total = 0
        for _, p in self.named_parameters():
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Prints PEFT's line: `trainable params: N || all params: M || trainable%: x`."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    active_adapter = "default"      # PEFT's name for a model's one adapter

    @property
    def peft_config(self) -> dict:
        """PEFT's `{adapter name: config}` view of this model's one config."""
        return {self.active_adapter: self.ptuning_config}

    def get_base_model(self) -> nn.Module:
        """The transformers model inside (frozen, shared with this wrapper)."""
        self._check_not_unloaded()
        return self.base_model

    @contextlib.contextmanager
    def disable_adapter(self):
        """A context in which this model computes its base model's function: forward and
        generate run the base model without prompt or prefix (`task_ids` are ignored), with
        its original attention implementation. Nested uses are fine."""
        self._check_not_unloaded()
        was_disabled = self._adapter_disabled
        self._adapter_disabled = True
        try:
            with self._base_state.base_attention() if self.uses_own_attention \
                    else contextlib.nullcontext():
                yield self
        finally:
            self._adapter_disabled = was_disabled

    def unload(self) -> nn.Module:
        """Gives the base model back as it was before wrapping: its parameters' requires_grad
        and its attention implementation restored, nothing of ptuning_fast left on it (a
        trained classification head keeps its trained weights: it is trained in place). This
        wrapper is unusable afterwards."""
        self._check_not_unloaded()
        base = self.base_model
        self._base_state.restore(training=False)
        generations.release(base)
        self._unloaded = True
        return base

    def _check_not_unloaded(self) -> None:
        if self._unloaded:
            raise RuntimeError("this PTuningModel was unloaded (unload() gave its base model "
                               "back); wrap the base model again to use a prompt")

    def _base_forward(self, input_ids, attention_mask, labels, inputs_embeds, position_ids,
                      token_type_ids, kwargs):
        """The base model's own forward (inside `disable_adapter`)."""
        for name, value in (("input_ids", input_ids), ("attention_mask", attention_mask),
                            ("labels", labels), ("inputs_embeds", inputs_embeds),
                            ("position_ids", position_ids), ("token_type_ids", token_type_ids)):
            if value is not None:
                kwargs[name] = value
        return self.base_model(**kwargs)

    # -- beyond PEFT ---------------------------------------------------------------------------
    @torch.no_grad()
    def nearest_tokens(self, k: int = 5, tokenizer=None) -> NearestTokens:
        """For each virtual token of the prompt, the `k` vocabulary tokens whose input embeddings
        are nearest by cosine similarity (Lester et al. 2021, section 7). Prompt Tuning and
        P-Tuning (the encoder's output); prefixes are per-layer keys/values, not points of the
        embedding space, so prefix tuning raises. `tokenizer`: also return the tokens' strings
        (its `convert_ids_to_tokens`)."""
        self._check_not_unloaded()
        if self.is_prefix:
            raise ValueError("nearest_tokens needs prompts in the input embedding space (Prompt "
                             "Tuning, P-Tuning); prefix tuning's prefixes are per-layer keys "
                             "and values, which no vocabulary token is near")
        vocab = self.base_model.get_input_embeddings().weight
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= vocab.shape[0]:
            raise ValueError(f"`k` must be an int in [1, {vocab.shape[0]}] (the vocabulary "
                             f"size), got {k!r}")
        was_training = self.prompt_encoder.training
        self.prompt_encoder.eval()              # no encoder dropout in what is read
        prompt = self.prompt_encoder().float()   # (P, d) or (T, P, d)
        self.prompt_encoder.train(was_training)
        similarity = nn.functional.normalize(prompt, dim=-1) @ \
            nn.functional.normalize(vocab.float().to(prompt.device), dim=-1).T
        scores, ids = similarity.topk(k, dim=-1)
        tokens = None
        if tokenizer is not None:
            tokens = _nested(ids.tolist(), tokenizer.convert_ids_to_tokens)
        return NearestTokens(ids=ids, similarity=scores, tokens=tokens)

    def ensemble(self, input_ids=None, attention_mask=None, task_ids=None, *,
                 inputs_embeds=None, token_type_ids=None, **kwargs) -> EnsembleOutput:
        """Prompt ensembling (Lester et al. 2021, section 6) in one batch: each of the B inputs
        runs under each of the E prompts `task_ids` (E,) (default: all of the config's
        num_tasks prompts) in a single forward of B * E rows, then the predictions are combined:
        averaged probabilities and a majority vote. Needs num_tasks > 1. Returns an
        `EnsembleOutput`; gradients flow unless called under torch.no_grad()."""
        self._check_not_unloaded()
        T = self.ptuning_config.num_tasks
        if T < 2:
            raise ValueError("ensemble needs several prompts: the config has num_tasks=1 "
                             "(use num_tasks=T and train one prompt per task id)")
        if "labels" in kwargs:
            raise ValueError("ensemble combines predictions; it takes no `labels`")
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref is None:
            raise ValueError("pass `input_ids` or `inputs_embeds`")
        device = self.prompt_encoder.embedding.weight.device
        prompts = torch.arange(T, device=device) if task_ids is None \
            else torch.as_tensor(task_ids, device=device)
        if prompts.dim() != 1 or prompts.numel() == 0 or prompts.is_floating_point():
            raise ValueError(f"`task_ids` must be a non-empty 1D integer sequence of prompts to "
                             f"ensemble, got {task_ids!r}")
        B, E = ref.shape[0], prompts.numel()
        repeat = (lambda t: None if t is None else t.repeat_interleave(E, dim=0))
        out = self(input_ids=repeat(input_ids), attention_mask=repeat(attention_mask),
                   inputs_embeds=repeat(inputs_embeds), token_type_ids=repeat(token_type_ids),
                   task_ids=prompts.repeat(B), **kwargs)     # row b * E + e: prompt e
        logits = out.logits.reshape(B, E, *out.logits.shape[1:])
        log_probs = torch.logsumexp(logits.float().log_softmax(-1), dim=1) - \
            torch.log(torch.tensor(float(E), device=logits.device))
        votes = logits.argmax(-1).mode(dim=1).values
        return EnsembleOutput(logits=logits, log_probs=log_probs, votes=votes)


def _nested(ids, convert):
    """convert_ids_to_tokens over the last level of a nested list of ids."""
    if ids and isinstance(ids[0], list):
        return [_nested(row, convert) for row in ids]
    return convert(ids)
