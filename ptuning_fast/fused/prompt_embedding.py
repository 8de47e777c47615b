"""Custom op `ptuning_fast::prompt_embedding` and its backward."""
from __future__ import annotations

import torch

from ..kernels import prompt_embedding as kernels


@torch.library.custom_op("ptuning_fast::prompt_embedding", mutates_args=())
def prompt_embedding_op(input_ids: torch.Tensor, weight: torch.Tensor, prompt: torch.Tensor,
                        prompt_index: torch.Tensor | None) -> torch.Tensor:
    return kernels.prompt_embedding_fwd(input_ids, weight, prompt, prompt_index)


@prompt_embedding_op.register_fake
def _(input_ids, weight, prompt, prompt_index):
    B, L = input_ids.shape
    return weight.new_empty(B, prompt.shape[-2] + L, weight.shape[1])


@torch.library.custom_op("ptuning_fast::prompt_embedding_prompt_grad", mutates_args=())
def prompt_grad_op(grad_out: torch.Tensor, prompt_index: torch.Tensor | None, num_tasks: int,
                   num_prompt: int, dtype: torch.dtype) -> torch.Tensor:
    return kernels.prompt_grad(grad_out, prompt_index, num_tasks, num_prompt, dtype)


@prompt_grad_op.register_fake
def _(grad_out, prompt_index, num_tasks, num_prompt, dtype):
    return grad_out.new_empty(num_tasks, num_prompt, grad_out.shape[-1], dtype=dtype)


def _setup_context(ctx, inputs, output):
    input_ids, weight, prompt, prompt_index = inputs
    ctx.save_for_backward(input_ids, prompt_index)
    ctx.prompt_shape = tuple(prompt.shape)
    ctx.prompt_dtype = prompt.dtype
    ctx.vocab_size = weight.shape[0]


def _backward(ctx, grad_out):
    input_ids, prompt_index = ctx.saved_tensors
    P = ctx.prompt_shape[-2]
    grad_weight = grad_prompt = None
    if ctx.needs_input_grad[1]:
        # Only when the embeddings are trainable; a frozen base never pays for this scatter.
        grad_weight = torch.ops.aten.embedding_dense_backward(
            grad_out[:, P:], input_ids, ctx.vocab_size, -1, False)
    if ctx.needs_input_grad[2]:
        num_tasks = ctx.prompt_shape[0] if len(ctx.prompt_shape) == 3 else 1
        grad_prompt = prompt_grad_op(grad_out, prompt_index, num_tasks, P, ctx.prompt_dtype)
        grad_prompt = grad_prompt.view(ctx.prompt_shape)
    return None, grad_weight, grad_prompt, None


prompt_embedding_op.register_autograd(_backward, setup_context=_setup_context)
