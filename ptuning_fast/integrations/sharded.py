"""Whole tensors of a model sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`), for saving.

Between steps FSDP2 leaves every parameter it manages as a DTensor holding this rank's shard
(the frozen base and the soft prompt alike). A checkpoint needs the whole prompt module, so the
shards are gathered first: an all-gather over the DTensor's mesh, a collective in which every
rank must take part. Then only the main process (rank 0) writes.
"""
from __future__ import annotations

import torch
from torch import nn


def _is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:            # a torch built without torch.distributed
        return False
    return isinstance(tensor, DTensor)


def is_sharded(module: nn.Module) -> bool:
    return any(_is_dtensor(t) for t in (*module.parameters(), *module.buffers()))


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor of a DTensor shard (a collective: every rank calls it), else `tensor`."""
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


@torch.no_grad()
def whole_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with every shard gathered, in state-dict order on every rank."""
    return {k: whole(v).detach() for k, v in module.state_dict().items()}


class _CheckpointOutput(nn.Module):
    """Calls `output_for_checkpoint()` of the prompt module as a forward, so that
    `torch.func.functional_call` can run it on whole parameters swapped in for the shards."""

    def __init__(self, prompts: nn.Module):
        super().__init__()
        self.prompts = prompts

    def forward(self) -> torch.Tensor:
        return self.prompts.output_for_checkpoint()


@torch.no_grad()
def checkpoint_output(module: nn.Module) -> torch.Tensor:
    """PEFT's "prompt_embeddings" (`module.output_for_checkpoint()`, (T * P, width)) of a prompt
    module whose parameters may be FSDP2 shards: the encoder runs on the gathered parameters,
    the module itself is left as it is."""
    if not is_sharded(module):
        return module.output_for_checkpoint()
    tensors = {f"prompts.{k}": whole(v).detach()
               for k, v in (*module.named_parameters(), *module.named_buffers())}
    return torch.func.functional_call(_CheckpointOutput(module), tensors, ())


def is_main_process() -> bool:
    """Rank 0 of torch.distributed's default group, or the only process."""
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
