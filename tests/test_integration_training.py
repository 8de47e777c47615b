"""Beyond PEFT: gradient checkpointing with prefix tuning, mixed-task batches, a shared prefix
that is never copied per row, frozen bases, clear errors, and a transformers.Trainer run."""
import pytest
import torch

import ptuning_fast as pf
from conftest import assert_close
from models import batch, tiny_bert, tiny_llama
from ptuning_fast.integrations import attention

CONFIGS = {
    "prefix": lambda T=1: pf.PrefixTuningConfig(3, num_tasks=T),
    "prefix_proj": lambda T=1: pf.PrefixTuningConfig(3, prefix_projection=True,
                                                     encoder_hidden_size=16, num_tasks=T),
    "prompt": lambda T=1: pf.PromptTuningConfig(3, num_tasks=T),
    "ptuning": lambda T=1: pf.PTuningConfig(3, encoder_hidden_size=16, num_tasks=T),
}
BUILD = {"llama": tiny_llama, "bert": tiny_bert}


def randomized(model):
    with torch.no_grad():
        for p in model.trainable_parameters().values():
            p.normal_(0, 0.5)
    return model


def loss_and_grads(model, model_name, **kw):
    ids, mask, labels = batch(model_name, padding="left")
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels, **kw).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.trainable_parameters().items()}


@pytest.mark.parametrize("model_name, method, backend", [
    ("llama", "prefix", "reference"), ("bert", "prefix", "reference"),
    ("llama", "prefix_proj", "reference"), ("llama", "prompt", "reference"),
    ("llama", "prefix", "triton"),
])
def test_gradient_checkpointing_gives_same_gradients(model_name, method, backend, monkeypatch):
    model = randomized(pf.wrap(BUILD[model_name](0), CONFIGS[method](), backend=backend)).train()
    loss, grads = loss_and_grads(model, model_name)
    model.gradient_checkpointing_enable()
    enabled = getattr(model.base_model, "is_activation_checkpointing", None)   # transformers 5.2x
    assert enabled if enabled is not None else model.base_model.is_gradient_checkpointing
    calls = []
    real = attention.ops.layer_prefix_attention
    monkeypatch.setattr(attention.ops, "layer_prefix_attention",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    loss_gc, grads_gc = loss_and_grads(model, model_name)
    if method.startswith("prefix"):   # each layer ran twice: forward, and recomputed in backward
        assert len(calls) == 2 * model.dims.num_layers
    assert_close(loss_gc, loss, torch.float32, name="loss under checkpointing")
    for name, g in grads.items():
        assert_close(grads_gc[name], g, torch.float32, "grad", name=name)
    assert not [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]


@pytest.mark.parametrize("model_name", ["llama", "bert"])
def test_layers_get_one_bool_mask_per_forward(model_name, monkeypatch):
    """The tokenizer's integer padding mask is bool once per forward (transformers' mask
    preprocessing casts it before our mask function passes it through), not converted in every
    layer's attention, forward and backward: each layer gets that same bool tensor, with the
    tokenizer's values."""
    model = pf.wrap(BUILD[model_name](0), CONFIGS["prefix"]())
    masks = []
    real = attention.ops.layer_prefix_attention
    monkeypatch.setattr(attention.ops, "layer_prefix_attention",
                        lambda *a, **kw: masks.append(kw["attention_mask"]) or real(*a, **kw))
    ids, mask, labels = batch(model_name, padding="left")
    assert mask.dtype == torch.long
    model(input_ids=ids, attention_mask=mask, labels=labels)
    assert len(masks) == model.dims.num_layers
    assert all(m is masks[0] for m in masks) and masks[0].dtype == torch.bool
    assert torch.equal(masks[0], mask.bool())


def test_reentrant_checkpointing_rejected():
    model = pf.wrap(tiny_llama(0), CONFIGS["prefix"]())
    with pytest.raises(ValueError, match="use_reentrant"):
        model.gradient_checkpointing_enable({"use_reentrant": True})


MIXED_CASES = [(m, k, "reference") for m in ("llama", "bert") for k in CONFIGS] + [
    ("llama", "prefix", "triton"),
    ("llama", "prompt", "triton")]


@pytest.mark.parametrize("model_name, method, backend", MIXED_CASES)
def test_mixed_task_batch_equals_each_row_alone(model_name, method, backend):
    model = randomized(pf.wrap(BUILD[model_name](0), CONFIGS[method](T=3),
                               backend=backend)).train()
    ids, mask, labels = batch(model_name, padding="left")
    tasks = torch.tensor([2, 0, 2])
    out = model(input_ids=ids, attention_mask=mask, task_ids=tasks)
    (out.logits.float().pow(2).sum()).backward()
    together = {n: p.grad.clone() for n, p in model.trainable_parameters().items()}
    summed = {n: torch.zeros_like(g) for n, g in together.items()}
    for row in range(3):
        model.zero_grad(set_to_none=True)
        alone = model(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1],
                      task_ids=tasks[row:row + 1])
        assert_close(out.logits[row:row + 1], alone.logits, torch.float32, name=f"row {row}")
        alone.logits.float().pow(2).sum().backward()
        for n, p in model.trainable_parameters().items():
            if p.grad is not None:
                summed[n] += p.grad
    for n, g in together.items():
        assert_close(g, summed[n], torch.float32, "grad", name=n)
    # task 1 is unused: its rows of the embedding got no gradient
    grad_rows = together["prompt_encoder.embedding.weight"].view(3, 3, -1)
    assert grad_rows[1].abs().max() == 0 and grad_rows[0].abs().max() > 0


@pytest.mark.parametrize("num_tasks", [1, 3])
def test_shared_prefix_reaches_attention_without_batch_copy(num_tasks, monkeypatch):
    model = pf.wrap(tiny_llama(0), CONFIGS["prefix"](T=num_tasks))
    seen = []
    real = attention.ops.layer_prefix_attention

    def spy(q, k, v, prefix_k=None, prefix_v=None, **kw):
        seen.append((q.shape[0], prefix_k, kw.get("prefix_index")))
        return real(q, k, v, prefix_k, prefix_v, **kw)

    monkeypatch.setattr(attention.ops, "layer_prefix_attention", spy)
    ids, mask, _ = batch("llama", batch_size=4)
    tasks = torch.tensor([0, 2, 2, 1]) if num_tasks > 1 else None
    model(input_ids=ids, attention_mask=mask, task_ids=tasks)
    assert len(seen) == model.dims.num_layers
    storage = model.prompt_encoder.embedding.weight.untyped_storage().data_ptr()
    for batch_size, prefix_k, index in seen:
        assert batch_size == 4
        # (Hkv, P, D) or (T, Hkv, P, D): no batch dim, and a view of the encoder's output
        assert prefix_k.shape[0] == (num_tasks if num_tasks > 1 else model.dims.num_kv_heads)
        assert prefix_k.dim() == (3 if num_tasks == 1 else 4)
        assert prefix_k.untyped_storage().data_ptr() == storage
        assert (index is None) == (num_tasks == 1)


def test_shared_prompt_is_not_expanded(monkeypatch):
    # The concatenation (PEFT's way; the shared prompt pass has no prompt embedding to expand).
    model = pf.wrap(tiny_llama(0), CONFIGS["prompt"](), shared_prompt=False)
    seen = []
    real = pf.ops.prompt_embedding

    def spy(input_ids, weight, prompt, **kw):
        seen.append(prompt.shape)
        return real(input_ids, weight, prompt, **kw)

    monkeypatch.setattr("ptuning_fast.integrations.model.ops.prompt_embedding", spy)
    ids, mask, _ = batch("llama", batch_size=4)
    model(input_ids=ids, attention_mask=mask)
    assert seen == [torch.Size([3, 32])]


def test_task_id_errors():
    multi = pf.wrap(tiny_llama(0), CONFIGS["prefix"](T=2))
    single = pf.wrap(tiny_llama(0), CONFIGS["prompt"]())
    ids, mask, _ = batch("llama")
    with pytest.raises(ValueError, match="num_tasks=2: pass `task_ids`"):
        multi(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        multi(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="shape \\(3,\\)"):
        multi(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer"):
        multi(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="num_tasks=1"):
        single(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 0, 0]))


def test_changed_attention_implementation_is_an_error():
    model = pf.wrap(tiny_llama(0), CONFIGS["prefix"]())
    model.base_model.set_attn_implementation("sdpa")
    ids, mask, _ = batch("llama")
    with pytest.raises(RuntimeError, match="'sdpa'"):
        model(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bert_trains_with_attention_dropout(backend):
    # BERT's default attention_probs_dropout_prob: transformers passes dropout=0.1 in training.
    model = randomized(pf.wrap(tiny_bert(0, attention_probs_dropout_prob=0.1),
                               CONFIGS["prefix"](), backend=backend)).train()

    def step(seed):
        torch.manual_seed(seed)
        return loss_and_grads(model, "bert")

    loss, grads = step(0)
    assert torch.isfinite(loss)
    assert grads["prompt_encoder.embedding.weight"].abs().max() > 0     # reaches the prefix
    again, grads_again = step(0)
    assert torch.equal(loss, again)
    for name, g in grads.items():
        assert torch.equal(grads_again[name], g), name
    assert not torch.equal(step(1)[0], loss)                             # dropout is on
    # Checkpointing restores the generator before recomputing: the same masks are drawn.
    model.gradient_checkpointing_enable()
    loss_gc, grads_gc = step(0)
    assert_close(loss_gc, loss, torch.float32, name="loss under checkpointing")
    for name, g in grads.items():
        assert_close(grads_gc[name], g, torch.float32, "grad", name=name)
    model.gradient_checkpointing_disable()
    # Eval mode: no dropout, the same function as the dropout-free model.
    plain = pf.wrap(tiny_bert(0), CONFIGS["prefix"](), backend=backend)
    plain.load_state_dict(model.state_dict())
    model.eval(), plain.eval()
    ids, mask, _ = batch("bert", padding="left")
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                       plain(input_ids=ids, attention_mask=mask).logits)


def test_trainer_trains_only_the_prompt(tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from transformers import Trainer, TrainingArguments
    model = pf.wrap(tiny_llama(0), CONFIGS["prefix_proj"]())
    base_before = {n: p.clone() for n, p in model.base_model.named_parameters()}
    prompt_before = model.prompt_encoder.output_for_checkpoint().detach().clone()
    ids, mask, labels = batch("llama", batch_size=8, length=6)
    rows = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]}
            for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, learning_rate=5e-2,
                             per_device_train_batch_size=4, report_to=[], save_strategy="no",
                             logging_steps=1, use_cpu=True, gradient_checkpointing=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert result.global_step == 4
    assert not torch.equal(model.prompt_encoder.output_for_checkpoint(), prompt_before)
    for n, p in model.base_model.named_parameters():
        assert torch.equal(p, base_before[n]), f"base parameter {n} changed"


@pytest.mark.parametrize("use_cache", [True, False])
def test_autocast_bf16_training_step(use_cache, monkeypatch):
    """Under autocast, attention runs in bf16 as SDPA would, whatever mix of dtypes the layer
    hands over (RoPE leaves q/k in fp32, v_proj gives bf16; a KV cache may or may not cast v),
    while the prefix encoder stays fp32."""
    model = randomized(pf.wrap(tiny_llama(0), CONFIGS["prefix_proj"]())).train()
    ids, mask, labels = batch("llama")
    with torch.no_grad():
        exact = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    dtypes = []
    real = attention.ops.layer_prefix_attention
    monkeypatch.setattr(attention.ops, "layer_prefix_attention", lambda q, k, v, pk, pv, **kw:
                        dtypes.append({t.dtype for t in (q, k, v, pk, pv)}) or
                        real(q, k, v, pk, pv, **kw))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels,
                     use_cache=use_cache).loss
    assert dtypes == [{torch.bfloat16}] * model.dims.num_layers
    loss.backward()
    assert_close(loss.float(), exact, torch.bfloat16, name="autocast loss")
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in model.trainable_parameters().values())
