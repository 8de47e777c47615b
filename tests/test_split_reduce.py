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
        out, partials, splits, numel, 0.5, BLOCK=block, num_warps=split_reduce._warps(block))
    want = torch.zeros(numel, device=DEVICE)
    for part in partials:
        want += part
    assert torch.equal(out[:numel], (want * 0.5).to(dtype))
    assert out[numel:].isnan().all()                # nothing written past numel


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
