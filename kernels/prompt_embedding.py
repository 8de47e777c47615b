"""Fused prompt concatenation + embedding lookup.

Forward writes `out[b, :P] = prompt[task(b)]` and `out[b, P:] = weight[input_ids[b]]` straight
into the (B, P + L, d) output: no per-row prompt copy, no `torch.cat`, no intermediate gather.
Backward sums the prompt gradient over the rows that used each prompt, in a fixed row order
(one program owns each output tile, so no atomics and a bitwise-deterministic result).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import define_kernels
from .compile_specs import CompileSpec
from .launch import cdiv, contiguous_last, dense_index, next_power_of_2, num_splits, on_input_device
from .split_reduce import plan_task_splits, sum_splits, task_split


define_kernels()     # before the first @triton.jit: see launch.interpreting


@triton.jit
def _prompt_embedding_fwd_kernel(
    Out, Weight, Prompt, InputIds, PromptIndex,
    seq_len, num_prompt, width,
    stride_out_b, stride_out_r,
    stride_w_v,
    stride_p_t, stride_p_r,
    stride_ids_b, stride_ids_l,
    HAS_INDEX: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Last dims are contiguous (the launcher guarantees it), so column offsets need no stride
    # and loads vectorize.
    row_block = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    col_block = tl.program_id(2)
    rows = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = col_block * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < width
    total = num_prompt + seq_len

    if HAS_INDEX:
        task = tl.load(PromptIndex + batch).to(tl.int64)
    else:
        task = 0
    is_prompt = rows < num_prompt
    is_word = (rows >= num_prompt) & (rows < total)

    prompt_ptr = Prompt + task * stride_p_t + rows[:, None].to(tl.int64) * stride_p_r + cols[None, :]
    from_prompt = tl.load(prompt_ptr, mask=is_prompt[:, None] & col_ok[None, :], other=0.0)

    word_pos = tl.where(is_word, rows - num_prompt, 0)
    ids = tl.load(InputIds + batch * stride_ids_b + word_pos * stride_ids_l, mask=is_word, other=0)
    word_ptr = Weight + ids[:, None].to(tl.int64) * stride_w_v + cols[None, :]
    from_words = tl.load(word_ptr, mask=is_word[:, None] & col_ok[None, :], other=0.0)

    value = tl.where(is_prompt[:, None], from_prompt.to(Out.dtype.element_ty),
                     from_words.to(Out.dtype.element_ty))
    out_ptr = Out + batch * stride_out_b + rows[:, None].to(tl.int64) * stride_out_r + cols[None, :]
    tl.store(out_ptr, value, mask=(rows < total)[:, None] & col_ok[None, :])


@triton.jit
def _prompt_grad_kernel(
    Partials, GradOut,           # Partials: fp32 (splits, P, d), dense
    Order, TaskRows, TaskSplits, SplitTask,   # per-task plan (split_reduce.TaskSplits), read
                                              # only with HAS_INDEX
    batch, num_prompt, width, rows_per_split,
    stride_go_b, stride_go_r,
    HAS_INDEX: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One axis: split * tiles + tile. Splits (and before them tasks) would pass the 65,535
    # programs of axes 1 and 2 (CUDA's limit).
    col_blocks = tl.cdiv(width, BLOCK_D)
    tiles = tl.cdiv(num_prompt, BLOCK_R) * col_blocks
    split = tl.program_id(0) // tiles
    row_block = tl.program_id(0) % tiles // col_blocks
    col_block = tl.program_id(0) % col_blocks
    if HAS_INDEX:
        _, first, first_row, task_rows = task_split(split, TaskRows, TaskSplits, SplitTask,
                                                    rows_per_split)
    else:
        first = split * rows_per_split
        first_row = 0
        task_rows = batch
    rows = row_block * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = col_block * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < num_prompt)[:, None] & (cols < width)[None, :]
    tile = rows[:, None].to(tl.int64) * stride_go_r + cols[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    # This split's batch rows of its task, in row order; `sum_splits` then adds the task's
    # splits in order: deterministic, no atomics.
    for i in range(first, tl.minimum(first + rows_per_split, task_rows)):
        if HAS_INDEX:
            b = tl.load(Order + first_row + i)
        else:
            b = tl.cast(i, tl.int64)
        acc += tl.load(GradOut + b * stride_go_b + tile, mask=mask, other=0.0).to(tl.float32)
    out = (split.to(tl.int64) * num_prompt + rows[:, None]) * width + cols[None, :]
    tl.store(Partials + out, acc, mask=mask)


def _grad_tile(width: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D) of the prompt gradient: a quarter of `_tile`'s size (at most 256 wide).
    A prompt is only P x d, so large tiles leave too few programs even after the row split
    (B = 8, P = 64, d = 2048: 32 tiles of 4 x 1024)."""
    block_d = min(next_power_of_2(max(width, 16)), 256)
    return max(1, 1024 // block_d), block_d


def _tile(width: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D): a tile of ~4096 elements, as wide as the row allows (up to 1024).

    Memory-bound copy: wide contiguous column blocks give 16-byte vector accesses; several rows
    per program keep each program's transfer large enough to hide latency.
    """
    block_d = min(next_power_of_2(max(width, 16)), 1024)
    return max(1, 4096 // block_d), block_d


NUM_WARPS = 4


@on_input_device
def prompt_embedding_fwd(input_ids: torch.Tensor, weight: torch.Tensor, prompt: torch.Tensor,
                         prompt_index: torch.Tensor | None,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) ids, (V, d) weight, (P, d) or (T, P, d) prompt -> (B, P + L, d), weight's dtype.

    `out`, if given, must be a (B, P + L, d) tensor of weight's dtype with a contiguous last dim.
    """
    weight, prompt = contiguous_last(weight), contiguous_last(prompt)
    prompt_index = dense_index(prompt_index)
    B, L = input_ids.shape
    P, d = prompt.shape[-2], weight.shape[1]
    if out is None:
        out = torch.empty(B, P + L, d, dtype=weight.dtype, device=weight.device)
    if out.numel() == 0:
        return out
    prompt3 = prompt if prompt.dim() == 3 else prompt.unsqueeze(0)
    block_r, block_d = _tile(d)
    grid = (cdiv(P + L, block_r), B, cdiv(d, block_d))
    _prompt_embedding_fwd_kernel[grid](
        out, weight, prompt3, input_ids, prompt_index if prompt_index is not None else input_ids,
        L, P, d,
        out.stride(0), out.stride(1),
        weight.stride(0),
        prompt3.stride(0), prompt3.stride(1),
        input_ids.stride(0), input_ids.stride(1),
        HAS_INDEX=prompt_index is not None,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=NUM_WARPS,
    )
    return out


@on_input_device
def prompt_grad(grad_out: torch.Tensor, prompt_index: torch.Tensor | None, num_tasks: int,
                num_prompt: int, dtype: torch.dtype) -> torch.Tensor:
    """Sum of grad_out[b, :P] over the rows b that used each prompt -> (T, P, d) in `dtype`.

    The batch rows are cut into splits (enough programs to fill the GPU: a prompt is only
    P x d, far fewer tiles than SMs), each split's sum an fp32 partial, added in split order.
    Per task, the splits follow the tasks the batch uses (`split_reduce.plan_task_splits`): a
    table of T prompts costs no partials for the tasks no row uses.
    """
    if prompt_index is None and num_tasks != 1:
        raise ValueError(f"prompt_grad: `num_tasks` = {num_tasks} prompts need a `prompt_index`; "
                         "without one every row uses the one prompt (num_tasks = 1)")
    grad_out = contiguous_last(grad_out)
    prompt_index = dense_index(prompt_index)
    B, _, d = grad_out.shape
    grad = torch.empty(num_tasks, num_prompt, d, dtype=dtype, device=grad_out.device)
    if grad.numel() == 0:
        return grad
    if B == 0:
        return grad.zero_()
    block_r, block_d = _grad_tile(d)
    tiles = cdiv(num_prompt, block_r) * cdiv(d, block_d)
    rows_per_split = cdiv(B, num_splits(grad_out.device, tiles, B, NUM_WARPS))
    if prompt_index is not None:
        plan = plan_task_splits(prompt_index, num_tasks, 1, rows_per_split)
        splits, plan_pointers, split_start = plan.bound, plan.pointers(), plan.task_splits
    else:
        splits, plan_pointers, split_start = cdiv(B, rows_per_split), (grad_out,) * 4, None
    partials = torch.empty(splits, num_prompt, d, dtype=torch.float32, device=grad_out.device)
    _prompt_grad_kernel[(splits * tiles,)](
        partials, grad_out, *plan_pointers,
        B, num_prompt, d, rows_per_split,
        grad_out.stride(0), grad_out.stride(1),
        HAS_INDEX=prompt_index is not None,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=NUM_WARPS,
    )
    return sum_splits(partials, grad, split_start=split_start)


def compile_specs():
    """Every (dtype, tile) configuration the launchers can pick, for the ahead-of-time compile test."""
    widths = [16 << i for i in range(7)]              # 16 .. 1024: every tile either can return
    # A prompt has the embeddings' dtype or is kept in fp32 (mixed-precision training).
    dtype_pairs = [(w, p) for w in ("fp16", "bf16", "fp32") for p in sorted({w, "fp32"})]
    for dtype, prompt_dtype in dtype_pairs:
        for width in widths:
            block_r, block_d = _tile(width)
            for has_index in (False, True):
                tile = dict(HAS_INDEX=has_index, BLOCK_R=block_r, BLOCK_D=block_d)
                yield CompileSpec(
                    f"prompt_embedding_fwd[{dtype},prompt={prompt_dtype},{block_r}x{block_d},index={has_index}]",
                    _prompt_embedding_fwd_kernel,
                    {"Out": f"*{dtype}", "Weight": f"*{dtype}", "Prompt": f"*{prompt_dtype}",
                     "InputIds": "*i64", "PromptIndex": "*i64",
                     **{n: "i32" for n in ("seq_len", "num_prompt", "width", "stride_out_b",
                                           "stride_out_r", "stride_w_v", "stride_p_t",
                                           "stride_p_r", "stride_ids_b", "stride_ids_l")}},
                    tile, NUM_WARPS, ints={"stride_ids_l": 1})   # contiguous (B, L) ids
                grad_r, grad_d = _grad_tile(width)
                if grad_d != width and width > 256:
                    continue                          # the same grad tile as width 256
                yield CompileSpec(
                    f"prompt_grad[{dtype},prompt={prompt_dtype},{grad_r}x{grad_d},index={has_index}]",
                    _prompt_grad_kernel,
                    {"Partials": "*fp32", "GradOut": f"*{dtype}", "Order": "*i64",
                     "TaskRows": "*i64", "TaskSplits": "*i64", "SplitTask": "*i64",
                     **{n: "i32" for n in ("batch", "num_prompt", "width", "rows_per_split",
                                           "stride_go_b", "stride_go_r")}},
                    dict(HAS_INDEX=has_index, BLOCK_R=grad_r, BLOCK_D=grad_d), NUM_WARPS)
