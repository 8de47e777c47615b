"""Which `generate()` call, if any, each wrapped base model is in: the registry the attention
function reads when generate() gives it no keyword argument to carry the prefix.

generate() rejects unknown keyword arguments, so during generation a layer's prefix reaches the
attention function another way: the wrapper makes a `Generation` current for its own base model
(`generating`). That is bound to the model, not the process: each module of a wrapped base model
is mapped to that base model (`claim`), and the current generations live in a context variable
(per thread; nested calls restore the outer one), so another model using the same attention
implementation during one model's generate never sees its prefix.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
import types
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from . import attention_terms


@dataclass(eq=False)
class Generation:
    """One `generate()` call of one wrapped model: what its step hook and its base model's
    attention layers read. Compared by identity: a hook acts only for its own call."""
    binding: "PrefixBinding | None"     # noqa: F821 (attention.PrefixBinding); None: no prefix
    task_ids: torch.Tensor | None


# Every module of a wrapped base model -> id(base model). Weak keys: no model is kept alive, and
# the caller's modules are not modified.
_OWNER: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
_CURRENT: contextvars.ContextVar[types.MappingProxyType] = contextvars.ContextVar(
    "ptuning_fast_generations", default=types.MappingProxyType({}))


def claim(base_model: nn.Module) -> None:
    """Maps every module of `base_model` to it, so `current_generation` can tell whose it is
    (and notes which module's table makes each T5-style position bias, which the attention
    function needs for the same modules)."""
    key = id(base_model)
    for module in base_model.modules():
        _OWNER[module] = key
    attention_terms.map_relative_bias_owners(base_model)


def release(base_model: nn.Module) -> None:
    """Undoes `claim` (unwrapping): no module of `base_model` stays mapped."""
    for module in base_model.modules():
        _OWNER.pop(module, None)


# How many `generating` contexts are open in the process (any thread). A plain int that
# PTuningModel.forward reads before it opens one: torch.compile cannot trace ContextVar.get, and
# outside generate() (training, compiled or not) there is nothing to hide a forward from.
_open_contexts = 0
_open_lock = threading.Lock()


def any_generation_open() -> bool:
    return _open_contexts > 0


@contextlib.contextmanager
def generating(base_model: nn.Module, generation: Generation | None):
    """Makes `generation` current for `base_model`'s modules (None: none), in this context only
    (threads have their own; the previous state comes back on exit, so nested calls work)."""
    global _open_contexts
    current = dict(_CURRENT.get())
    current[id(base_model)] = generation
    token = _CURRENT.set(types.MappingProxyType(current))
    with _open_lock:
        _open_contexts += 1
    try:
        yield
    finally:
        with _open_lock:
            _open_contexts -= 1
        _CURRENT.reset(token)


def current_generation(module: nn.Module) -> Generation | None:
    """The generation current for the wrapped base model that `module` belongs to, if any."""
    key = _OWNER.get(module)
    return None if key is None else _CURRENT.get().get(key)
