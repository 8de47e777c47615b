"""The fixed-order sum of split partials (kernels/split_reduce.py), every block size, bitwise
against the same additions in split order; and the block each target gets."""
import pytest
import torch
from conftest import DEVICE

from ptuning_fast.kernels import launch, split_reduce

pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not launch.interpreting(),
                                reason="Triton kernels on CPU need TRITON_INTERPRET=1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("block", split_reduce.BLOCKS)
def test_every_block_sums_in_split_order(block, dtype):
    numel, splits = 2 * block + 5, 3             # a masked tail in the last program
    partials = torch.randn(splits, numel, device=DEVICE)
    out = torch.full((numel + 7,), float("nan"), dtype=dtype, device=DEVICE)
    split_reduce._sum_splits_kernel[(-(-numel // block),)](
        out, partials, out, numel, splits, 0.5, SEGMENTED=False, BLOCK=block,
        num_warps=split_reduce._warps(block))
    want = torch.zeros(numel, device=DEVICE)
    for part in partials:
        want += part
    assert torch.equal(out[:numel], (want * 0.5).to(dtype))
    assert out[numel:].isnan().all()                # nothing written past numel


def _in_split_order(partials, first, end):
    want = torch.zeros_like(partials[0])
    for s in range(first, end):
        want += partials[s]
    return want


@pytest.mark.parametrize("segmented", [False, True], ids=["equal_runs", "segments"])
def test_rows_sum_their_own_splits_in_order(segmented):
    # A per-task gradient: row r sums its own run of splits; an unused task (an empty run)
    # gets zeros. Rows x blocks all on grid axis 0.
    rows, row_shape = 5, (3, 7)
    counts = [2, 0, 3, 1, 0] if segmented else [2] * rows
    starts = [sum(counts[:r]) for r in range(rows + 1)]
    partials = torch.randn(starts[-1], *row_shape, device=DEVICE)
    out = torch.full((rows, *row_shape), float("nan"), device=DEVICE)
    split_start = torch.tensor(starts, device=DEVICE) if segmented else None
    split_reduce.sum_splits(partials, out, 0.5, split_start)
    for r in range(rows):
        assert torch.equal(out[r], _in_split_order(partials, starts[r], starts[r + 1]) * 0.5)


def test_task_split_plan():
    # Tasks 3, 0, 3, 5, 3 of 7: task 3 has rows 0, 2, 4 (row order), 4 items each.
    index = torch.tensor([3, 0, 3, 5, 3], device=DEVICE)
    plan = split_reduce.plan_task_splits(index, 7, 4, 5)
    rows = plan.task_rows.tolist()
    assert [plan.order[rows[t]:rows[t + 1]].tolist() for t in range(7)] == \
        [[1], [], [], [0, 2, 4], [], [3], []]
    # cdiv(4, 5) = 1 split for tasks 0 and 5, cdiv(12, 5) = 3 for task 3.
    assert plan.task_splits.tolist() == [0, 1, 1, 1, 4, 4, 5, 5]
    assert plan.bound == split_reduce.task_split_bound(5, 7, 4, 5) == 4 + min(7, 5) - 1
    assert plan.split_task.tolist()[:5] == [0, 3, 3, 3, 5]
    assert plan.split_task.tolist()[5:] == [6] * 3     # past the last: no items
    # The bound holds at its worst: every task used, each with a short last split.
    for batch, tasks, per_row, per in [(8, 1000, 3, 7), (8, 33, 4096, 1986), (64, 3, 1, 5)]:
        index = torch.randint(0, tasks, (batch,), device=DEVICE)
        plan = split_reduce.plan_task_splits(index, tasks, per_row, per)
        assert plan.task_splits[-1].item() <= plan.bound == plan.split_task.numel()
        assert plan.bound <= -(-batch * per_row // per) + min(tasks, batch) - 1


def test_block_sizes():
    with launch.pretend_target(launch.H100):
        # >= 2 waves of 132 SMs: the largest block that still gives 264 programs.
        assert split_reduce.block_size(264 * 256, torch.device("cuda")) == 256
        assert split_reduce.block_size(100, torch.device("cuda")) == 16
    if launch.interpreting():
        # The interpreter: the largest block that leaves two programs.
        assert split_reduce.block_size(149_760, torch.device("cpu")) == 1024
        assert split_reduce.block_size(40, torch.device("cpu")) == 16
        assert split_reduce.block_size(10, torch.device("cpu")) == 16
