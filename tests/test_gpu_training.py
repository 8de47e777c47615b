"""Whole training steps and decoding on a GPU: a bf16 Llama-shaped model (GQA 4:1, mixed
task_ids, gradient checkpointing) through the kernels against the reference backend, loss and
every trainable gradient under FlashAttention's rule; a train step and static-cache decoding in
CUDA graphs; no host sync in a train step; two train steps bitwise equal.

The GPU tests are marked `gpu` (skipped without CUDA). The comparison itself also runs here on
CPU in fp32 (the kernels under the interpreter, a tiny model), so that its logic is tested in CI.
"""
import pytest
import torch
from conftest import HAS_CUDA, assert_close, assert_error_within, gpu
from models import batch, tiny_llama
from test_integration_training import CONFIGS, randomized

import ptuning_fast as pf

BF16 = torch.bfloat16
CUDA = "cuda"
# Llama-3-shaped at a small width: GQA 4:1, head_dim 64 (the kernels' MMA tiles), two layers;
# sequences longer than one 128-query block.
LLAMA = dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)
TASKS = 3
BATCH = dict(batch_size=4, length=200, padding="left")


def model_pair(method, dtype, device, backend="triton", checkpointing=True, shape=LLAMA):
    """(model in `dtype` on `backend`, its float64 twin on the reference backend): the same base
    weights (one seed) and the same randomized soft-prompt parameters, TASKS tasks."""
    model = randomized(pf.wrap(tiny_llama(0, **shape).to(device, dtype), CONFIGS[method](TASKS),
                               backend=backend)).train()
    exact = pf.wrap(tiny_llama(0, **shape).to(device, torch.float64), CONFIGS[method](TASKS),
                    backend="reference").train()
    exact.prompt_encoder.load_state_dict(model.prompt_encoder.state_dict())
    exact.prompt_encoder.double()
    if checkpointing:
        model.gradient_checkpointing_enable()
        exact.gradient_checkpointing_enable()
    return model, exact


def step_inputs(device, **kw):
    """input_ids, attention_mask, labels and mixed task_ids, on `device`."""
    ids, mask, labels = batch("llama", **{**BATCH, **kw})
    tasks = torch.arange(ids.shape[0]) % TASKS
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "labels": labels.to(device), "task_ids": tasks.to(device)}


def loss_and_grads(model, inputs):
    """One forward and backward: the loss and every trainable parameter's gradient."""
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.trainable_parameters().items()}


def check_step_against_reference(model, exact, inputs, dtype):
    """The kernels' loss and gradients against float64, at most 2x the error of the reference
    backend in the same precision (the rule of ptuning_fast/error_bound.py; gradients measured
    relative to their largest element). Returns the kernels' loss and gradients."""
    loss, grads = loss_and_grads(model, inputs)
    model.backend = "reference"
    try:
        low_loss, low_grads = loss_and_grads(model, inputs)
    finally:
        model.backend = "triton"
    exact_loss, exact_grads = loss_and_grads(exact, inputs)
    assert set(grads) == set(exact_grads) and grads
    assert_error_within(loss, low_loss, exact_loss, name="loss", dtype=dtype)
    for name, g in grads.items():
        assert exact_grads[name].abs().max() > 0, f"{name}: no gradient reached it"
        assert_error_within(g, low_grads[name], exact_grads[name], name=f"d {name}",
                            kind="grad", dtype=dtype, relative=True)
    return loss, grads


@pytest.mark.skipif(HAS_CUDA, reason="the GPU runs test_gpu_bf16_train_step_matches_reference")
def test_train_step_comparison_on_cpu(one_torch_thread):
    """The comparison of the GPU test below on a tiny fp32 model under the interpreter."""
    model, exact = model_pair("prefix_proj", torch.float32, "cpu", shape={})
    check_step_against_reference(model, exact, step_inputs("cpu", batch_size=3, length=9),
                                 torch.float32)


@gpu
@pytest.mark.parametrize("method", ["prefix", "prefix_proj", "prompt", "ptuning"])
def test_gpu_bf16_train_step_matches_reference(method):
    model, exact = model_pair(method, BF16, CUDA)
    check_step_against_reference(model, exact, step_inputs(CUDA), BF16)


@gpu
@pytest.mark.parametrize("method", ["prefix_proj", "prompt"])
def test_gpu_train_step_is_bitwise_deterministic(method):
    model, _ = model_pair(method, BF16, CUDA)
    inputs = step_inputs(CUDA)
    loss, grads = loss_and_grads(model, inputs)
    again, grads_again = loss_and_grads(model, inputs)
    assert torch.equal(loss, again)
    for name, g in grads.items():
        assert torch.equal(grads_again[name], g), f"{name}: two backward passes differ"


@gpu
@pytest.mark.parametrize("method", ["prefix_proj", "prompt"])
def test_gpu_train_step_has_no_host_sync(method):
    """forward, backward (with checkpointing's recomputation) and the optimizer step with
    torch's sync debug mode set to "error": any host sync (.item(), a data-dependent shape, a
    pageable copy) raises. The first step runs before: Triton compiles and the autotuner times
    its candidates once per process, which do synchronize."""
    model, _ = model_pair(method, BF16, CUDA)
    inputs = step_inputs(CUDA)
    optimizer = torch.optim.SGD(model.trainable_parameters().values(), lr=1e-2)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        optimizer.step()

    train_step()
    torch.cuda.synchronize()
    probe = torch.ones(1, device=CUDA)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):
            probe.item()                         # the detector is on
        train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _restore(params, values):
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)


@gpu
@pytest.mark.parametrize("method", ["prefix_proj", "prompt"])
def test_gpu_train_step_in_a_cuda_graph(method):
    """forward, backward and an SGD step captured once (PyTorch's whole-network recipe: warm-up
    on a side stream, gradients allocated inside the capture), replayed on two batches copied
    into the static inputs: each replay's loss and gradients are the eager step's on that
    batch from the same parameters, and the parameters move by -lr x gradient. Without
    checkpointing (its RNG bookkeeping is not the subject here). Nothing is timed inside a
    capture: the captured launches take the autotuner's recorded pick, or the fixed tile where
    none is recorded, so replay and eager agree within the bf16 tolerance, not bitwise."""
    model, _ = model_pair(method, BF16, CUDA, checkpointing=False)
    params = list(model.trainable_parameters().values())
    lr = 1e-2
    optimizer = torch.optim.SGD(params, lr=lr)
    static = step_inputs(CUDA)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            model(**static).loss.backward()
            optimizer.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = model(**static).loss
        static_loss.backward()
        optimizer.step()

    for seed in (5, 6):
        fresh = step_inputs(CUDA, seed=seed)
        for name, t in static.items():
            t.copy_(fresh[name])
        before = _snapshot(params)
        graph.replay()
        loss, grads, after = static_loss.clone(), [p.grad.clone() for p in params], \
            _snapshot(params)
        _restore(params, before)
        eager_loss = model(**fresh).loss
        eager_grads = torch.autograd.grad(eager_loss, params)
        assert_close(loss, eager_loss.detach(), BF16, name=f"batch {seed}: loss")
        for p, g, want in zip(params, grads, eager_grads):
            scale = want.abs().max()
            assert_close(g / scale, want / scale, BF16, "grad", name=f"batch {seed}: grad")
        for b, a, g in zip(before, after, grads):
            torch.testing.assert_close(a, b - lr * g)
        _restore(params, after)


@gpu
def test_gpu_static_cache_generation_in_cuda_graphs():
    """transformers' own static-cache decoding on CUDA: its decoding step compiled with
    mode="reduce-overhead" (CUDA graphs), our attention inside as custom ops. The tokens are
    the dynamic cache's, and the step ran as a graph (no cudagraph skip). fp32 with IEEE dots:
    greedy argmax must not hinge on rounding between the two paths' different splits."""
    from torch._dynamo.utils import counters
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        model = randomized(pf.wrap(tiny_llama(0, **LLAMA).to(CUDA), CONFIGS["prefix"](TASKS),
                                   backend="triton")).eval()
        inputs = step_inputs(CUDA, length=37)
        kw = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                  task_ids=inputs["task_ids"], max_new_tokens=8, min_new_tokens=8,
                  do_sample=False, pad_token_id=0)
        dynamic = model.generate(**kw)
        torch._dynamo.reset()
        counters.clear()
        static = model.generate(cache_implementation="static", **kw)
        assert hasattr(model.base_model, "_compiled_call"), "transformers did not compile"
        assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
        assert torch.equal(static, dynamic), f"{static}\n{dynamic}"
    finally:
        torch._dynamo.reset()
        torch.set_float32_matmul_precision(previous)
