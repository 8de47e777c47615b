"""`Mode`: what a wrapped model does with its prompt or prefix in forward and generate(),
picked once at wrap time (`modes.pick_mode`); and the step-hook generation the decoder modes
share (`generate_with_step_hook`)."""
from __future__ import annotations

import contextlib
import functools

import torch

from .. import generations


class Mode:
    """One way of computing PEFT's function on a wrapped model. A mode holds only what was
    decided at wrap time; the wrapper (its prompt module, backend, base model) is passed in.

    `forward` gets the wrapper's checked inputs (`task_ids` checked, the batch not empty) and
    returns the base model's output; `generate` gets generate()'s arguments once the wrapper has
    checked the task type, `input_ids` and `task_ids`."""
    # Whether the base model runs ptuning_fast's attention function (set at wrap time).
    uses_own_attention = False
    # Attention module -> its prefix layer, where only some modules get a prefix (the
    # binding's `layer_of`); None: each attention module's own `layer_idx`.
    prefix_layers: dict | None = None

    def forward(self, wrapper, input_ids, attention_mask, labels, task_ids, inputs_embeds,
                position_ids, token_type_ids, kwargs: dict):
        raise NotImplementedError

    def generate(self, wrapper, args, input_ids, task_ids, kwargs: dict):
        raise NotImplementedError


def generate_with_step_hook(wrapper, generation: generations.Generation, step, args,
                            kwargs: dict, *, pause_own_attention=None, output_hook=None):
    """`base_model.generate` with `generation` current for the base model and `step(wrapper,
    generation, args, kwargs) -> (args, kwargs)` run before each of its forwards (shifting
    positions, adding the prefix or swapping the prompt into the first step's embeddings). The
    hook acts for this call only: other threads, nested calls and other wrapped models each see
    their own. `pause_own_attention`: a context inside which the base model runs its own
    attention; `output_hook`: a forward hook on the base model for the call's duration."""
    base = wrapper.base_model
    # The hook is never traced: transformers' compiled decoding compiles `__call__`, hooks
    # included, and Dynamo would guard on the registry of wrapped modules (a weak dict that
    # changes as models come and go: it once crashed building that guard) and on this
    # call's objects; it runs as Python before the compiled forward. (Disabled here, not
    # with a decorator: that would import torch._dynamo, and with it Triton, when
    # ptuning_fast is imported, before a caller can set TRITON_INTERPRET.)
    step_hook = torch.compiler.disable(functools.partial(_step_hook, wrapper, step, generation))
    hooks = [base.register_forward_pre_hook(step_hook, with_kwargs=True)]
    if output_hook is not None:
        hooks.append(base.register_forward_hook(output_hook))
    try:
        with generations.generating(base, generation), \
                pause_own_attention or contextlib.nullcontext():
            return base.generate(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()


def _step_hook(wrapper, step, generation, module, args, kwargs):
    # Every concurrent generate() of this base model (threads) registers a hook; each acts
    # only in the context where its own call is current.
    if generations.current_generation(module) is not generation:
        return None
    return step(wrapper, generation, args, kwargs)
