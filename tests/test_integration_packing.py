"""Packed sequences (padding-free batches) with prefix tuning: every sequence packed into a row
sees the prefix and only itself, its positions shifted by P, so a packed batch gives the
logits, loss and prefix gradients that its sequences give one per row (PEFT's prefix tuning,
which sees one long sequence, is the reference only on the unpacked rows). Prompt tuning and
P-Tuning likewise: every packed sequence sees the prompt and only itself."""
import copy

import pytest
import torch
from transformers import DataCollatorWithFlattening

import ptuning_fast as pf
from conftest import assert_close
from models import VOCAB, peft_twin, tiny_llama
from test_integration_terms import tiny_terms

pytest.importorskip("peft")



def base_model(arch):
    return tiny_llama(0) if arch == "llama" else tiny_terms(arch)


def sequences(lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]


def one_per_row(seqs):
    """input_ids, attention_mask (right padding), labels: each sequence its own row."""
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)], mask[row, :len(s)] = s, 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


def real_positions(logits, seqs):
    """(sum of lengths, V): each row's logits at its real tokens, rows one after another."""
    return torch.cat([logits[row, :len(s)] for row, s in enumerate(seqs)])


def step(model, **batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def assert_same(packed_out, packed_grads, rows_out, rows_grads, seqs, name_map=lambda n: n):
    assert_close(packed_out.logits[0], real_positions(rows_out.logits, seqs), torch.float32,
                 name="logits")
    assert_close(packed_out.loss, rows_out.loss, torch.float32, name="loss")
    assert packed_grads
    for name, grad in packed_grads.items():
        assert grad.abs().sum() > 0, f"{name} got no gradient"
        assert_close(grad, rows_grads[name_map(name)], torch.float32, "grad", name=name)


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "cu_seq_lens"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2", "gpt_oss"])
def test_collated_batch_equals_peft_on_one_sequence_per_row(arch, flash_kwargs):
    """DataCollatorWithFlattening's (1, total) batch (position ids restarting; optionally
    cu_seq_lens_q/k and max_length_q/k too) against PEFT on the same sequences one per row:
    logits at every real token, the loss, and the prefix gradients."""
    base = base_model(arch)
    ours = pf.wrap(copy.deepcopy(base), pf.PrefixTuningConfig(3)).train()
    twin = peft_twin(ours, base).train()
    seqs = sequences([4, 7, 1, 6])           # a one-token sequence too; windows of 5 matter
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(
        [{"input_ids": s.tolist()} for s in seqs])
    packed_out, packed_grads = step(ours, **batch)
    ids, mask, labels = one_per_row(seqs)
    rows_out, rows_grads = step(twin, input_ids=ids, attention_mask=mask, labels=labels)
    assert_same(packed_out, packed_grads, rows_out, rows_grads, seqs,
                lambda n: n.replace("prompt_encoder.", "prompt_encoder.default.", 1))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_several_packed_rows_with_per_task_prefixes(backend):
    """Two rows, each packing sequences of its own task (prefix_index per row), against every
    sequence as its own row with its row's task; projection prefixes; given as position ids."""
    config = pf.PrefixTuningConfig(3, num_tasks=2, prefix_projection=True, encoder_hidden_size=16)
    model = pf.wrap(tiny_llama(0), config, backend=backend).train()
    with torch.no_grad():
        for p in model.trainable_parameters().values():
            p.normal_(0, 0.5)
    rows = [sequences([3, 5, 2], seed=4), sequences([6, 4], seed=5)]   # both rows 10 tokens
    ids = torch.stack([torch.cat(r) for r in rows])
    positions = torch.stack([torch.cat([torch.arange(len(s)) for s in r]) for r in rows])
    labels = torch.stack([torch.cat([torch.cat([s.new_full((1,), -100), s[1:]]) for s in r])
                          for r in rows])
    tasks = torch.tensor([1, 0])
    packed_out, packed_grads = step(model, input_ids=ids, position_ids=positions, labels=labels,
                                    task_ids=tasks)
    seqs = rows[0] + rows[1]
    one_ids, mask, one_labels = one_per_row(seqs)
    rows_out, rows_grads = step(model, input_ids=one_ids, attention_mask=mask, labels=one_labels,
                                task_ids=torch.tensor([1] * len(rows[0]) + [0] * len(rows[1])))
    packed_logits = packed_out.logits.reshape(-1, packed_out.logits.shape[-1])
    assert_close(packed_logits, real_positions(rows_out.logits, seqs), torch.float32,
                 name="logits")
    assert_close(packed_out.loss, rows_out.loss, torch.float32, name="loss")
    for name, grad in packed_grads.items():
        assert_close(grad, rows_grads[name], torch.float32, "grad", name=name)


def test_cu_seq_lens_alone_number_each_sequence_from_zero():
    """cu_seq_lens_q/k without position ids: each sequence is numbered from 0 (+ P), as in its
    own row."""
    model = pf.wrap(tiny_llama(0), pf.PrefixTuningConfig(3))
    seqs = sequences([5, 2, 4])
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": s.tolist()} for s in seqs])
    with torch.no_grad():
        given = model(**batch).logits
        del batch["position_ids"]
        derived = model(**batch).logits
    assert_close(derived, given, torch.float32, name="logits")


def test_packing_matters():
    """Guards the tests above: the same tokens as one sequence give other logits."""
    model = pf.wrap(tiny_llama(0), pf.PrefixTuningConfig(3))
    seqs = sequences([4, 5])
    batch = DataCollatorWithFlattening()([{"input_ids": s.tolist()} for s in seqs])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        joined = model(input_ids=batch["input_ids"]).logits
    assert (packed[0, 4:] - joined[0, 4:]).abs().max() > 1e-4


def test_bad_cu_seq_lens_are_named():
    model = pf.wrap(tiny_llama(0), pf.PrefixTuningConfig(3))
    ids = torch.randint(3, VOCAB, (1, 6))
    with pytest.raises(ValueError, match="cu_seqlens.*end at B \\* L = 6"):
        model(input_ids=ids, cu_seq_lens_q=torch.tensor([0, 2, 5], dtype=torch.int32),
              cu_seq_lens_k=torch.tensor([0, 2, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seq_lens_q.*cu_seq_lens_k.*equal"):
        model(input_ids=ids, cu_seq_lens_q=torch.tensor([0, 2, 6]),
              cu_seq_lens_k=torch.tensor([0, 3, 6]))
    with pytest.raises(NotImplementedError, match="cu_seq_lens.*attention_mask"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids),
              cu_seq_lens_q=torch.tensor([0, 2, 6]), cu_seq_lens_k=torch.tensor([0, 2, 6]))


PROMPT_CONFIGS = {"prompt": lambda: pf.PromptTuningConfig(3),
                  "ptuning": lambda: pf.PTuningConfig(3, encoder_hidden_size=16)}


@pytest.mark.parametrize("arch, method, flash_kwargs, backend", [
    *[("llama", m, f, "auto") for m in PROMPT_CONFIGS for f in (False, True)],
    ("llama", "prompt", True, "triton"),    # the kernels read the per-row prompt prefix views
    # attention terms in the prompt's and the sequences' calls: windows, soft-capping, sinks
    *[(arch, "prompt", True, "auto") for arch in ("mistral", "gemma2", "gpt_oss")],
])
def test_packed_prompt_methods_equal_peft_on_one_sequence_per_row(arch, method, flash_kwargs,
                                                                  backend):
    """Prompt tuning / P-Tuning on a collated (1, total) batch (with cu_seq_lens_q/k and
    seq_idx, or position ids alone): every sequence sees the prompt and only itself, so the
    logits at its tokens, the loss (over the same labels: the collator ignores each
    sequence's first) and the prompt gradients are PEFT's on the sequences one per row."""
    config = PROMPT_CONFIGS[method]()
    base = base_model(arch)
    ours = pf.wrap(copy.deepcopy(base), config, backend=backend).train()
    twin = peft_twin(ours, base).train()
    seqs = sequences([4, 7, 1, 6])
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs,
                                       return_seq_idx=flash_kwargs)(
        [{"input_ids": s.tolist()} for s in seqs])
    packed_out, packed_grads = step(ours, **batch)
    ids, mask, labels = one_per_row(seqs)
    labels[:, 0] = -100
    rows_out, rows_grads = step(twin, input_ids=ids, attention_mask=mask, labels=labels)
    P = config.num_virtual_tokens
    assert packed_out.logits.shape[1] == P + batch["input_ids"].shape[1]     # PEFT's shape
    packed_out.logits, rows_out.logits = packed_out.logits[:, P:], rows_out.logits[:, P:]
    assert_same(packed_out, packed_grads, rows_out, rows_grads, seqs,
                lambda n: n.replace("prompt_encoder.", "prompt_encoder.default.", 1))


@pytest.mark.parametrize("config", [pf.PromptTuningConfig(3), pf.PTuningConfig(3)],
                         ids=["prompt", "ptuning"])
def test_packed_prompt_methods_without_own_attention_are_refused(config):
    """shared_prompt=False leaves the model's own attention, which cannot give each packed
    sequence the prompt: refused by name (PEFT's concatenation lets the sequences see each
    other)."""
    model = pf.wrap(tiny_llama(0), config, shared_prompt=False)
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": s.tolist()} for s in sequences([4, 3])])
    with pytest.raises(NotImplementedError, match="packed sequences.*P-Tuning.*shared_prompt"):
        model(**batch)
    # One sequence per row with explicit positions still runs (positions ignored, as in PEFT).
    ids = torch.randint(3, VOCAB, (2, 5))
    with pytest.warns(UserWarning, match="position_ids are ignored"):
        model(input_ids=ids, position_ids=torch.arange(5).expand(2, -1))


def test_packed_prompt_with_an_attention_mask_is_refused():
    """cu_seq_lens_q/k and an attention_mask: refused, as for prefix tuning (the mask is never
    dropped)."""
    model = pf.wrap(tiny_llama(0), pf.PromptTuningConfig(3))
    ids = torch.randint(3, VOCAB, (1, 6))
    with pytest.raises(NotImplementedError, match="cu_seq_lens.*attention_mask"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids),
              cu_seq_lens_q=torch.tensor([0, 2, 6]), cu_seq_lens_k=torch.tensor([0, 2, 6]))


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_seq_idx_that_disagrees_with_the_segments_is_refused(method):
    """seq_idx restates the packed sequences (accepted above); one that does not is named."""
    config = pf.PrefixTuningConfig(3) if method == "prefix" else pf.PromptTuningConfig(3)
    model = pf.wrap(tiny_llama(0), config)
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)(
        [{"input_ids": s.tolist()} for s in sequences([4, 3])])
    batch["seq_idx"] = torch.tensor([[0, 0, 0, 1, 1, 1, 1]], dtype=torch.int32)
    with pytest.raises(ValueError, match="`seq_idx` disagrees"):
        model(**batch)
    batch["seq_idx"] = torch.zeros(1, 5, dtype=torch.int32)
    with pytest.raises(ValueError, match="`seq_idx` must be an integer tensor of shape \\(1, 7\\)"):
        model(**batch)


def test_packed_batch_under_gradient_checkpointing():
    """The segments ride in the layers' kwargs: recomputed layers see them too."""
    model = pf.wrap(tiny_terms("mistral"), pf.PrefixTuningConfig(3)).train()
    batch = DataCollatorWithFlattening()([{"input_ids": s.tolist()} for s in sequences([6, 3, 5])])
    out, grads = step(model, **batch)
    model.gradient_checkpointing_enable()
    out_gc, grads_gc = step(model, **batch)
    assert_close(out_gc.loss, out.loss, torch.float32, name="loss")
    for name, grad in grads.items():
        assert_close(grads_gc[name], grad, torch.float32, "grad", name=name)


@pytest.mark.parametrize("arch", ["gemma2", "gpt_oss"])
def test_packed_training_step_with_terms_compiles_fullgraph(arch):
    """Packing (segments built from position ids in the forward) with windows, soft-capping or
    sinks through the Triton custom ops traces as one graph (no host sync, no graph break) and
    gives the eager step's loss and gradients."""
    torch._dynamo.reset()
    model = pf.wrap(tiny_terms(arch), pf.PrefixTuningConfig(3), backend="triton").train()
    batch = DataCollatorWithFlattening()([{"input_ids": s.tolist()} for s in sequences([6, 3, 5])])
    eager_out, eager_grads = step(model, **batch)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    model.zero_grad(set_to_none=True)
    loss = compiled(**batch).loss
    loss.backward()
    torch.testing.assert_close(loss, eager_out.loss)
    for name, p in model.trainable_parameters().items():
        torch.testing.assert_close(p.grad, eager_grads[name])
