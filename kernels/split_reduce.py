"""Split reductions: fixed-order sums of fp32 split partials, and the per-task split plan.

A reduction too long for one program (a shared prefix's gradient over every row, head and
query block; a prompt's gradient over every batch row) is cut into splits, each program
writing an fp32 partial for its range; `sum_splits` adds each output row's partials in split
order and stores `scale * sum` in the output's dtype. The same inputs always give the same
bits: no atomics, and the split boundaries depend only on the shapes, the target and (per
task) the index's values.

Per-task gradients (a (T, ...) table, row b using task index[b]): only the tasks the batch
uses have work, at most min(T, B) of them, and which ones is known only on the device.
`plan_task_splits` builds, with a few small device ops (no host sync, capturable), the rows of
each task (the batch sorted by task, stably) and cuts each task's items into splits of one
host-chosen size: the splits follow the work, however many tasks the table has, and their
count has a host-side bound (`TaskSplits.bound`) that sizes the grid and the partials.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import define_kernels
from .compile_specs import CompileSpec
from .launch import WAVES, cdiv, device_target

BLOCKS = (16, 64, 256, 1024)    # elements a program sums; a power of two, 16 at least


define_kernels()     # before the first @triton.jit: see launch.interpreting


@triton.jit
def _sum_splits_kernel(
    Out, Partials,               # Out: (rows, row_numel), dense; Partials: (splits, row_numel) fp32
    SplitStart,                  # (rows + 1,) int64: row r sums splits [SplitStart[r], [r + 1])
    row_numel, splits_per_row, scale,   # without SEGMENTED, row r sums splits_per_row from r's
    SEGMENTED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Rows fold into axis 0 (a task table's rows can pass axis 1's 65,535).
    blocks = tl.cdiv(row_numel, BLOCK)
    row = (tl.program_id(0) // blocks).to(tl.int64)
    offs = (tl.program_id(0) % blocks) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < row_numel
    if SEGMENTED:
        first = tl.load(SplitStart + row)
        end = tl.load(SplitStart + row + 1)
    else:
        first = row * splits_per_row
        end = first + splits_per_row
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(first, end):
        acc += tl.load(Partials + s * row_numel + offs, mask=ok, other=0.0)
    tl.store(Out + row * row_numel + offs, (acc * scale).to(Out.dtype.element_ty), mask=ok)


@triton.jit
def task_split(split, TaskRows, TaskSplits, SplitTask, items_per_split):
    """Split `split` of a per-task plan (`TaskSplits`): its task, its first item in the task's
    items, and the task's rows as (first position in Order, count). int32, as a kernel's own
    program ids and counts are (the plan is int64 as torch makes it): with int64 loop bounds
    ptxas spilled more in the fp32 prefix dK/dV configs (sm_90, D = 256: 524 B, 500 B so)."""
    task = tl.load(SplitTask + split).to(tl.int32)
    first = (split - tl.load(TaskSplits + task).to(tl.int32)) * items_per_split
    first_row = tl.load(TaskRows + task).to(tl.int32)
    return task, first, first_row, tl.load(TaskRows + task + 1).to(tl.int32) - first_row


def block_size(numel: int, device: torch.device, rows: int = 1) -> int:
    """The largest block that still gives WAVES waves of programs on the target over `rows`
    rows of `numel` elements (a prefix's gradient can be only a few thousand elements:
    1024-element blocks would run it on a handful of SMs, each adding up every split
    serially); under the interpreter, see below."""
    target = device_target(device)
    # The interpreter runs programs one after another, each at a fixed cost of milliseconds:
    # there, the largest block that still leaves two programs (a task prefix's gradient in the
    # tests: 9360 programs of 16 elements; that case's backward took 24 s, 2.5 s with 147
    # programs of 1024).
    programs = 2 if target is None else WAVES * target.sm_count
    fitting = [b for b in BLOCKS if rows * cdiv(numel, b) >= programs]
    return fitting[-1] if fitting else BLOCKS[0]


def sum_splits(partials: torch.Tensor, out: torch.Tensor, scale: float = 1.0,
               split_start: torch.Tensor | None = None) -> torch.Tensor:
    """out (rows, ...) dense, any float dtype: row r = scale * the sum, in split order, of the
    partials [split_start[r], split_start[r + 1]) (a (rows + 1,) int64 device tensor: no host
    sync), or without split_start of the r-th of `rows` equal runs of splits. partials: dense
    fp32 (splits, *out.shape[1:])."""
    rows = out.shape[0] if out.dim() else 1
    row_numel = out.numel() // max(rows, 1)
    if out.numel():
        block = block_size(row_numel, out.device, rows)
        _sum_splits_kernel[(rows * cdiv(row_numel, block),)](
            out, partials, out if split_start is None else split_start, row_numel,
            partials.shape[0] // rows, float(scale), SEGMENTED=split_start is not None,
            BLOCK=block, num_warps=_warps(block))
    return out


def _warps(block: int) -> int:
    return max(1, min(4, block // 128))


@dataclass
class TaskSplits:
    """Where each task's rows and splits are (every tensor int64 on the index's device).

    Task t's rows are order[task_rows[t]:task_rows[t + 1]] (in row order); its items, (row,
    then the caller's items_per_row of a row), are cut into splits of items_per_split from
    its first item, numbered [task_splits[t], task_splits[t + 1]) in task order; split i
    belongs to task split_task[i]. `bound` (a host int) is the split count at the most:
    splits past the last used one get the last task and no items."""
    order: torch.Tensor          # (B,)
    task_rows: torch.Tensor      # (T + 1,)
    task_splits: torch.Tensor    # (T + 1,): sum_splits' split_start
    split_task: torch.Tensor     # (bound,)
    bound: int
    items_per_split: int

    def pointers(self) -> tuple:
        """Order, TaskRows, TaskSplits, SplitTask: the order the kernels take them in."""
        return self.order, self.task_rows, self.task_splits, self.split_task


def task_split_bound(batch: int, num_tasks: int, items_per_row: int,
                     items_per_split: int) -> int:
    """The most splits `plan_task_splits` can make: the splits of the whole batch's items,
    plus one for each task but the first (each task's last split may be short)."""
    return cdiv(batch * items_per_row, items_per_split) + min(num_tasks, batch) - 1


def plan_task_splits(index: torch.Tensor, num_tasks: int, items_per_row: int,
                     items_per_split: int) -> TaskSplits:
    """The split plan of a per-task reduction over the rows of a dense int64 (B,) `index` with
    values in [0, num_tasks): device ops only (a stable sort, searches and cumulative sums, on
    B and T + 1 elements), so the same index always gives the same plan and no host sync."""
    device, batch = index.device, index.numel()
    sorted_tasks, order = torch.sort(index, stable=True)
    tasks = torch.arange(num_tasks + 1, device=device)
    task_rows = torch.searchsorted(sorted_tasks, tasks)
    per_task = (task_rows[1:] - task_rows[:-1]) * items_per_row
    task_splits = torch.zeros(num_tasks + 1, dtype=torch.int64, device=device)
    torch.cumsum((per_task + items_per_split - 1) // items_per_split, 0,
                 out=task_splits[1:])
    bound = task_split_bound(batch, num_tasks, items_per_row, items_per_split)
    split_task = torch.searchsorted(task_splits, torch.arange(bound, device=device),
                                    right=True).sub_(1).clamp_(max=num_tasks - 1)
    return TaskSplits(order, task_rows, task_splits, split_task, bound, items_per_split)


def compile_specs():
    for i, block in enumerate(BLOCKS):
        for elem in ("fp16", "bf16", "fp32")[i % 2:][:2]:
            for segmented in (False, True):
                constexprs = dict(SEGMENTED=segmented, BLOCK=block)
                yield CompileSpec(
                    f"sum_splits[{elem},SEGMENTED={segmented},BLOCK={block}]", _sum_splits_kernel,
                    {"Out": f"*{elem}", "Partials": "*fp32", "SplitStart": "*i64",
                     "row_numel": "i32", "splits_per_row": "i32", "scale": "fp32"},
                    constexprs, _warps(block), 1)
