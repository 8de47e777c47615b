"""FSDP2 on 2 CPU processes (gloo): a soft prompt trained on a frozen tiny Llama whose layers and
root `fully_shard` shards, directly and through HF Trainer with accelerate's FSDP config (both
runs in one pair of processes: starting a process costs more than the runs).

Each run checks what a user relies on: the loss of every step equals that of one process
training on the whole batch, only the prompt parameters change (the gathered base equals the
untouched model), and `save_pretrained`, called on every rank, gathers the shards and is
written by rank 0 alone; the adapter loads back with `PTuningModel.from_pretrained` and gives
the sharded model's logits.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import ptuning_fast as pf
from conftest import assert_close
from distributed import WORLD, free_port, needs_gloo, soft_prompt_model
from models import batch, tiny_bert, tiny_llama

STEPS = 3
ROWS = 4                      # per step; rank r takes rows [r * ROWS / WORLD, (r + 1) * ...)
METHODS = {
    "prompt_tuning": lambda: pf.PromptTuningConfig(3),
    "prefix_tuning": lambda: pf.PrefixTuningConfig(3, prefix_projection=True,
                                                   encoder_hidden_size=16),
}


def step_batches():
    return [batch("llama", batch_size=ROWS, length=6, padding="left", seed=10 + s)
            for s in range(STEPS)]


def eval_batch():
    ids, mask, _ = batch("llama", batch_size=3, length=5, padding="right", seed=99)
    return ids, mask


def _finish(model, run: str, results: dict, out_dir: str, rank: int) -> None:
    """Records what the test compares (whole trained parameters, how far the frozen base moved,
    the logits of an eval batch) and saves the adapter from every rank into a per-rank folder:
    only rank 0's may exist afterwards."""
    from ptuning_fast.integrations.sharded import whole
    untouched = {f"base_model.{k}": v for k, v in tiny_llama(0).state_dict().items()}
    drift, grads = 0.0, 0
    for name, p in model.named_parameters():
        full = whole(p).detach()                 # a collective: same order on every rank
        if p.requires_grad:
            results[f"{run}/{name}"] = full.clone()
        else:
            drift = max(drift, (full - untouched[name]).abs().max().item())
            grads += p.grad is not None
    results[f"{run}/frozen_drift"] = torch.tensor(drift)
    results[f"{run}/frozen_grads"] = torch.tensor(float(grads))
    model.eval()
    with torch.no_grad():
        ids, mask = eval_batch()
        results[f"{run}/logits"] = model(input_ids=ids, attention_mask=mask).logits.clone()
    model.save_pretrained(os.path.join(out_dir, f"{run.replace('/', '-')}-rank{rank}"))


def _fully_shard_run(method: str, rank: int, results: dict, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard
    run = f"fully_shard/{method}"
    model = soft_prompt_model(METHODS[method]())
    for layer in model.base_model.model.layers:
        fully_shard(layer)
    fully_shard(model)                     # the root: embeddings, head and the prompt module
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rows = slice(rank * ROWS // WORLD, (rank + 1) * ROWS // WORLD)
    for step, (ids, mask, labels) in enumerate(step_batches()):
        loss = model(input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        results[f"{run}/loss{step}"] = mean / WORLD
    _finish(model, run, results, out_dir, rank)


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        for method in METHODS:
            _fully_shard_run(method, rank, results, out_dir)
            _trainer_run(method, out_dir, results, rank)
        save_file(results, os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    """(output folder, what each rank recorded) of both runs of every method."""
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    out = tmp_path_factory.mktemp("fsdp")
    mp.start_processes(_worker, args=(free_port(), str(out)), nprocs=WORLD,
                       start_method="spawn", join=True)
    return str(out), [load_file(out / f"rank{r}.safetensors") for r in range(WORLD)]


def _single_process(method):
    """One process on the whole batch, minimizing the mean of the ranks' losses (FSDP averages
    the ranks' gradients as DDP does): per-step losses and the trained model."""
    model = soft_prompt_model(METHODS[method]())
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(list(params.values()), lr=1e-2)
    losses, half = [], ROWS // WORLD
    for ids, mask, labels in step_batches():
        parts = [model(input_ids=ids[r * half:(r + 1) * half],
                       attention_mask=mask[r * half:(r + 1) * half],
                       labels=labels[r * half:(r + 1) * half]).loss for r in range(WORLD)]
        loss = sum(parts) / WORLD
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses, model


def _check_run(ranks: list[dict], run: str, losses, reference, out_dir: str) -> None:
    """The sharded `run` ("<kind>/<method>"; `ranks`: what each rank recorded) against one
    process: `losses` per step and the trained `reference` model."""
    params = reference.trainable_parameters()
    for r, got in enumerate(ranks):
        for step, expected in enumerate(losses):
            assert_close(got[f"{run}/loss{step}"], expected, torch.float32,
                         name=f"{run} rank {r} loss of step {step}")
        for name, p in params.items():
            assert_close(got[f"{run}/{name}"], p, torch.float32, "grad",
                         name=f"{run} rank {r} {name}")
        assert got[f"{run}/frozen_drift"] == 0, f"{run}: the frozen base changed"
        assert got[f"{run}/frozen_grads"] == 0, f"{run}: a frozen parameter got a .grad"
    method = run.split("/")[1]
    start = soft_prompt_model(METHODS[method]()).trainable_parameters()
    assert any(not torch.equal(start[n], p) for n, p in params.items()), "nothing trained"

    saved = os.path.join(out_dir, f"{run.replace('/', '-')}-rank0")
    assert os.path.isfile(os.path.join(saved, "adapter_model.safetensors"))
    assert not os.path.exists(os.path.join(out_dir, f"{run.replace('/', '-')}-rank1")), \
        "rank 1 wrote a checkpoint: only rank 0 may"
    loaded = pf.PTuningModel.from_pretrained(tiny_llama(0), saved, backend="reference")
    ids, mask = eval_batch()
    with torch.no_grad():
        logits = loaded(input_ids=ids, attention_mask=mask).logits
        expected = reference.eval()(input_ids=ids, attention_mask=mask).logits
    assert_close(logits, ranks[0][f"{run}/logits"], torch.float32,
                 name=f"{run}: reloaded adapter vs the sharded model")
    assert_close(logits, expected, torch.float32, "grad",
                 name=f"{run}: reloaded adapter vs the single-process model")


@needs_gloo
@pytest.mark.parametrize("method", METHODS)
def test_fully_shard_two_processes_match_single_process(sharded_runs, method):
    out_dir, ranks = sharded_runs
    losses, reference = _single_process(method)
    _check_run(ranks, f"fully_shard/{method}", losses, reference, out_dir)


# ---------------------------------------------------------------------------------------------
# HF Trainer with accelerate's FSDP config

class _Rows(torch.utils.data.Dataset):
    """The ROWS rows of one batch: with ROWS / WORLD rows per rank, every step is one epoch over
    all of them, whatever order the sampler draws (the loss is their mean)."""

    def __init__(self):
        ids, mask, labels = batch("llama", batch_size=ROWS, length=6, padding="left", seed=10)
        self.rows = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]}
                     for i in range(ROWS)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _cpu_fsdp_trainer(**kwargs):
    """A Trainer whose accelerate state takes the FSDP plugin on CPU processes. accelerate
    (1.x) enables FSDP only for accelerator device types and maps a CPU run to plain
    multi-CPU data parallelism; this flips that one decision after the Accelerator is built,
    so that everything else (fsdp2_prepare_model's fully_shard with the config's auto-wrap,
    Trainer's FSDP branches, the optimizer on DTensors) runs as on GPUs."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from transformers import Trainer

    class CpuFsdpTrainer(Trainer):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            state = self.accelerator.state
            state.distributed_type = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True

    return CpuFsdpTrainer(**kwargs)


def _trainer_run(method: str, out_dir: str, results: dict | None = None, rank: int | None = None):
    """Trains `method` with HF Trainer for STEPS steps of the ROWS rows: sharded over the
    process group when `rank` is given (recorded into `results`), else in this one process
    (returns the logged losses and the model)."""
    from transformers import Trainer, TrainingArguments
    sharded = rank is not None
    model = soft_prompt_model(METHODS[method]())
    fsdp = dict(fsdp=True, ddp_backend="gloo", fsdp_config={
        "version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}) if sharded else {}
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, f"trainer-{rank}"), max_steps=STEPS,
        per_device_train_batch_size=ROWS // WORLD if sharded else ROWS,
        learning_rate=1e-2, weight_decay=0.0, lr_scheduler_type="constant", logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0, **fsdp)
    trainer = (_cpu_fsdp_trainer if sharded else Trainer)(model=model, args=args,
                                                          train_dataset=_Rows())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if not sharded:
        return torch.tensor(losses), model
    run = f"trainer/{method}"
    assert trainer.is_fsdp_enabled and type(trainer.model).__name__.startswith("FSDP"), \
        f"the Trainer did not shard the model ({type(trainer.model).__name__})"
    results.update({f"{run}/loss{s}": torch.tensor(loss) for s, loss in enumerate(losses)})
    _finish(trainer.model, run, results, out_dir, rank)
    return None


@needs_gloo
@pytest.mark.parametrize("method", METHODS)
def test_trainer_with_accelerate_fsdp_matches_single_process(sharded_runs, method, tmp_path):
    out_dir, ranks = sharded_runs
    losses, reference = _trainer_run(method, str(tmp_path))
    assert losses.shape == (STEPS,)
    # Trainer's first loss is the untrained model's mean loss over the batch's label tokens
    # (Trainer divides by the labels it counts: with a prompt in front, all of them).
    rows = _Rows().rows
    with torch.no_grad():
        untrained = soft_prompt_model(METHODS[method]())(
            **{k: torch.stack([row[k] for row in rows]) for k in rows[0]}).loss
    assert_close(losses[0], untrained, torch.float32, name=f"{method}: Trainer's first loss")
    for r in range(WORLD):
        assert f"trainer/{method}/loss{STEPS - 1}" in ranks[r], "a logged loss is missing"
    _check_run(ranks, f"trainer/{method}", list(losses), reference, out_dir)


# ---------------------------------------------------------------------------------------------
# Saving a sharded model, in this process: a group of one rank makes DTensors too

@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@needs_gloo
@pytest.mark.parametrize("build, config", [
    (tiny_llama, lambda: pf.PTuningConfig(3, encoder_reparameterization_type="lstm",
                                          encoder_hidden_size=8)),
    (tiny_llama, lambda: pf.PrefixTuningConfig(3, prefix_projection=True, encoder_hidden_size=16)),
    (tiny_bert, lambda: pf.PromptTuningConfig(3)),               # with a classifier head
], ids=["p_tuning_lstm", "prefix_projection", "bert_prompt_head"])
def test_save_of_a_sharded_model_equals_the_unsharded_save(one_rank_group, tmp_path, build,
                                                           config):
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model = pf.wrap(build(0), config(), backend="reference")
    with torch.no_grad():
        for p in model.trainable_parameters().values():
            p.normal_(0, 0.3)
    model.save_pretrained(tmp_path / "plain", full_state=True)
    backbone = model.base_model.base_model                     # LlamaModel / BertModel
    for layer in backbone.layers if hasattr(backbone, "layers") else backbone.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    assert all(type(p).__name__ == "DTensor" for p in model.trainable_parameters().values())
    model.save_pretrained(tmp_path / "sharded", full_state=True)
    model.save_pretrained(tmp_path / "not_main", is_main_process=False)   # gathers, writes nothing
    assert not (tmp_path / "not_main").exists()
    for name in ("adapter_model.safetensors", "ptuning_fast_state.safetensors"):
        plain, sharded = load_file(tmp_path / "plain" / name), load_file(tmp_path / "sharded" / name)
        assert plain.keys() == sharded.keys()
        for key in plain:
            assert torch.equal(plain[key], sharded[key]), f"{name}: {key} differs"
