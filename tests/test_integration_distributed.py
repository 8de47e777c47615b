"""DistributedDataParallel on 2 CPU processes (gloo) matches a single-process run, and only the
soft-prompt gradients are all-reduced."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import ptuning_fast as pf
from conftest import assert_close
from distributed import WORLD, free_port, needs_gloo, soft_prompt_model
from models import batch

STEPS = 3
METHODS = {"prefix": lambda: pf.PrefixTuningConfig(3, prefix_projection=True,
                                                   encoder_hidden_size=16),
           "prompt": lambda: pf.PTuningConfig(3, encoder_hidden_size=16)}


def make_model(method):
    return soft_prompt_model(METHODS[method]())


def step_batches():
    """STEPS batches of 4 rows; rank r trains on rows [2r, 2r + 2)."""
    return [batch("llama", batch_size=4, length=6, padding="left", seed=10 + s)
            for s in range(STEPS)]


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        results = {}
        for method in METHODS:
            model = make_model(method)
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            reduced = []

            def hook(state, bucket):
                reduced.append(bucket.buffer().numel())
                return default_hooks.allreduce_hook(None, bucket)

            ddp.register_comm_hook(None, hook)
            opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
            for ids, mask, labels in step_batches():
                rows = slice(2 * rank, 2 * rank + 2)
                loss = ddp(input_ids=ids[rows], attention_mask=mask[rows],
                           labels=labels[rows]).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
            trainable = sum(p.numel() for p in model.trainable_parameters().values())
            results[f"{method}/reduced_per_step"] = torch.tensor(sum(reduced) / STEPS)
            results[f"{method}/trainable"] = torch.tensor(float(trainable))
            for n, p in model.trainable_parameters().items():
                results[f"{method}/{n}"] = p.detach().clone()
        save_file(results, os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@needs_gloo
def test_ddp_two_processes_match_single_process(tmp_path):
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD,
                       start_method="spawn", join=True)
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(WORLD)]
    for method in METHODS:
        # DDP averages gradients: the single process minimizes the mean of the two halves' losses
        model = make_model(method)
        params = model.trainable_parameters()
        opt = torch.optim.AdamW(list(params.values()), lr=1e-2)
        for ids, mask, labels in step_batches():
            losses = [model(input_ids=ids[2 * r:2 * r + 2], attention_mask=mask[2 * r:2 * r + 2],
                            labels=labels[2 * r:2 * r + 2]).loss for r in range(WORLD)]
            opt.zero_grad()
            (sum(losses) / WORLD).backward()
            opt.step()
        for r in range(WORLD):
            assert ranks[r][f"{method}/reduced_per_step"] == ranks[r][f"{method}/trainable"], \
                "DDP all-reduced more than the trainable soft-prompt parameters"
            for n, p in params.items():
                assert_close(ranks[r][f"{method}/{n}"], p, torch.float32, "grad",
                             name=f"{method} rank {r} {n}")
        start = make_model(method).trainable_parameters()
        assert any(not torch.equal(start[n], p) for n, p in params.items())   # it trained
