"""Prefix tuning on Falcon, whose attention layers compute attention themselves: the prefix goes
through the KV cache they are given (ptuning_fast/integrations/cache_prefix.py). Beyond the
model matrix's cells: each Falcon variant (rotary with and without the new decoder
architecture, ALiBi) under eager and SDPA attention against PEFT, decoding by hand with the
cache a forward returns, mixed-task generation, and that gradient checkpointing would lose the
prefix without the layers' cache flag (so the matrix's checkpointing check can fail)."""
import contextlib
import copy

import pytest
import torch

import ptuning_fast as pf
from conftest import assert_close
from models import peft_twin

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

P = 3
# transformers >= 5.25 reports multi-query Falcon's one key head (num_key_value_heads = 1): PEFT
# then sizes the prefix right and prefix tuning has a function to match; before, it failed.
MULTI_QUERY_SUPPORTED = getattr(transformers.FalconConfig(multi_query=True),
                                "num_key_value_heads", None) == 1
VARIANTS = {
    "new_decoder_architecture": dict(new_decoder_architecture=True, num_kv_heads=2),
    "rotary_multi_head": dict(multi_query=False),
    "alibi": dict(alibi=True, multi_query=False, parallel_attn=False, bias=True),
    **({"multi_query": dict(multi_query=True)} if MULTI_QUERY_SUPPORTED else {}),
}


def falcon(variant="alibi", attn="eager", head="FalconForCausalLM", seed=0):
    torch.manual_seed(seed)
    config = transformers.FalconConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_dropout=0.0,
        attention_dropout=0.0, attn_implementation=attn, num_labels=3, **VARIANTS[variant])
    return getattr(transformers, head)(config).eval()


def wrapped(base, num_tasks=1):
    model = pf.wrap(base, pf.PrefixTuningConfig(P, num_tasks=num_tasks))
    with torch.no_grad():
        model.prompt_encoder.embedding.weight.normal_(0, 0.5)
    return model


def batch(seed=1, rows=3, length=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    for b in range(1, rows):
        mask[b, :2 * b] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, ids.masked_fill(mask == 0, -100)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_step_matches_peft(variant, attn):
    base = falcon(variant, attn)
    ours = wrapped(copy.deepcopy(base))
    twin = peft_twin(ours, base)
    ids, mask, labels = batch()
    ours.train(), twin.train()
    a = ours(input_ids=ids, attention_mask=mask, labels=labels)
    b = twin(input_ids=ids, attention_mask=mask, labels=labels)
    assert_close(a.logits, b.logits, torch.float32, "fwd", name="logits")
    assert_close(a.loss, b.loss, torch.float32, "fwd", name="loss")
    a.loss.backward(), b.loss.backward()
    grad = ours.prompt_encoder.embedding.weight.grad
    assert grad.abs().max() > 0, "the prefix got no gradient"
    assert_close(grad, twin.prompt_encoder["default"].embedding.weight.grad, torch.float32,
                 "grad", name="prefix grad")


def test_the_prefix_changes_the_outputs():
    model = wrapped(falcon())
    ids, mask, _ = batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        model.prompt_encoder.embedding.weight.mul_(2.0)
        after = model(input_ids=ids, attention_mask=mask).logits
    assert (before - after).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["alibi", "new_decoder_architecture"])
def test_decoding_by_hand_with_the_returned_cache(variant):
    """A forward with use_cache=True returns a cache of the real tokens only (no prefix); fed
    back with the next token, it gives the logits of a full forward over both."""
    model = wrapped(falcon(variant))
    ids, mask, _ = batch()
    nxt = torch.randint(3, 97, (3, 1))
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = first.cache
        assert isinstance(cache, transformers.DynamicCache), type(cache)
        assert cache.get_seq_length() == ids.shape[1]
        step = model(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
                     cache=cache, use_cache=True)
        full = model(input_ids=torch.cat([ids, nxt], 1),
                     attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1))
    assert_close(step.logits[:, -1], full.logits[:, -1], torch.float32, "fwd", name="logits")


def test_mixed_task_generation_equals_each_row_alone():
    model = wrapped(falcon("new_decoder_architecture"), num_tasks=2)
    ids, mask, _ = batch()
    tasks = torch.tensor([1, 0, 1])
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, num_beams=2)
    together = model.generate(input_ids=ids, attention_mask=mask, task_ids=tasks, **kw)
    for row in range(3):
        alone = model.generate(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1],
                               task_ids=tasks[row:row + 1], **kw)
        assert torch.equal(together[row, :alone.shape[1]], alone[0]), row


def _checkpointed_grad(model, keep_flag: bool):
    from ptuning_fast.integrations import cache_prefix
    ids, mask, labels = batch()
    model.zero_grad(set_to_none=True)
    original = cache_prefix.cache_kept_under_checkpointing
    if not keep_flag:
        cache_prefix.cache_kept_under_checkpointing = lambda base: contextlib.nullcontext()
    try:
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    finally:
        cache_prefix.cache_kept_under_checkpointing = original
    return model.prompt_encoder.embedding.weight.grad


def test_gradient_checkpointing_keeps_the_prefix_only_through_the_layer_flag():
    """transformers' checkpointed layers drop the cache unless told it is only read: with the
    flag the gradients equal those without checkpointing; without it the prefix is lost (so
    the matrix's checkpointing comparison would catch a regression). The flag does not stay."""
    model = wrapped(falcon())
    model.train()
    plain = _checkpointed_grad(model, keep_flag=True).clone()
    model.gradient_checkpointing_enable()
    kept = _checkpointed_grad(model, keep_flag=True)
    assert_close(kept, plain, torch.float32, "grad", name="checkpointed grad")
    layers = model.base_model.transformer.h
    assert not any("_can_checkpoint_with_cache" in layer.__dict__ for layer in layers)
    try:        # without the flag the layers get no prefix: a mask of P more keys, or no grad
        lost = _checkpointed_grad(model, keep_flag=False)
    except RuntimeError:
        return
    assert lost is None or lost.abs().max() == 0, "without the flag the prefix should be lost"


def test_refusals():
    if not MULTI_QUERY_SUPPORTED:
        with pytest.raises(NotImplementedError, match="FalconForCausalLM.*multi-query attention"):
            pf.wrap(_multi_query(), pf.PrefixTuningConfig(P))
    model = wrapped(falcon())
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    with pytest.raises(NotImplementedError, match="packed sequences.*FalconForCausalLM"):
        model(input_ids=batch()[0][:1], position_ids=positions)
    with pytest.warns(UserWarning, match="backend='triton' is not used: FalconForCausalLM"):
        pf.wrap(falcon(), pf.PrefixTuningConfig(P), backend="triton")


def _multi_query():
    torch.manual_seed(0)
    return transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4))


def test_prefixed_cache_returns_the_prefix_in_front_and_stores_none_of_it():
    from ptuning_fast.integrations.attention import PrefixBinding
    from ptuning_fast.integrations.cache_prefix import PrefixedCache
    from ptuning_fast.prompts import LayerPrefixes
    layers, T, H, D, B, L = 2, 3, 2, 5, 4, 6
    kv = torch.randn(layers, 2, T, H, P, D)
    tasks = torch.tensor([2, 0, 2, 1])
    binding = PrefixBinding(LayerPrefixes(kv, T), tasks, "auto", "Tiny")
    k, v = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    stateless = PrefixedCache(binding)
    for _ in range(2):     # a recompute sees the same keys
        keys, values = stateless.update(k, v, 1)
        assert torch.equal(keys, torch.cat([kv[1, 0][tasks], k], 2))
        assert torch.equal(values, torch.cat([kv[1, 1][tasks], v], 2))
    assert stateless.get_seq_length() == P
    assert stateless.get_mask_sizes(L, 0) == stateless.get_mask_sizes(torch.arange(L), 0) \
        == (P + L, 0)
    inner = transformers.DynamicCache()
    cache = PrefixedCache(binding, inner)
    cache.update(k, v, 0)
    keys, _ = cache.update(k[:, :, :1], v[:, :, :1], 0)
    assert keys.shape[2] == P + L + 1 and inner.get_seq_length() == L + 1
    assert cache.get_seq_length() == P + L + 1 and cache.get_mask_sizes(1, 0) == (P + L + 2, 0)
    with pytest.raises(NotImplementedError, match="inner cache"):
        cache.reorder_cache(torch.arange(B))
    with pytest.raises(ValueError, match="Tiny: layer 0's keys have 3 heads"):
        stateless.update(torch.randn(B, 3, L, D), torch.randn(B, 3, L, D), 0)


def test_checkpointing_refused_where_layers_cannot_keep_the_cache(monkeypatch):
    """A transformers release whose checkpointed layers cannot be told to keep the cache would
    drop the prefix: refused, not run."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    model = wrapped(falcon())
    model.train()
    model.gradient_checkpointing_enable()
    monkeypatch.delattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache")
    ids, mask, labels = batch()
    with pytest.raises(NotImplementedError, match="FalconDecoderLayer has no"):
        model(input_ids=ids, attention_mask=mask, labels=labels)


def test_token_classification_matches_peft_algorithm_and_qa_is_refused():
    """Beyond the issue's rows: Falcon's token-classification head takes the cache (PEFT
    refuses it; compared with PEFT's algorithm run without PEFT); its QA head takes no cache, so
    the prefix could not reach it: refused."""
    from models import MaterializedPrompt
    ours = wrapped(falcon(head="FalconForTokenClassification"))
    reference = MaterializedPrompt(ours)
    ids, mask, _ = batch()
    labels = torch.randint(0, 3, ids.shape).masked_fill(mask == 0, -100)
    a = ours(input_ids=ids, attention_mask=mask, labels=labels)
    b = reference(input_ids=ids, attention_mask=mask, labels=labels)
    assert_close(a.logits, b.logits, torch.float32, "fwd", name="logits")
    a.loss.backward(), b.loss.backward()
    assert_close(ours.prompt_encoder.embedding.weight.grad,
                 reference.prompt_encoder.embedding.weight.grad, torch.float32, "grad",
                 name="prefix grad")
    with pytest.raises(NotImplementedError, match="FalconForQuestionAnswering.*takes none"):
        pf.wrap(falcon(head="FalconForQuestionAnswering"), pf.PrefixTuningConfig(P))


def test_disable_adapter_and_unload_leave_falcons_attention_alone():
    base = falcon(attn="sdpa")
    model = wrapped(base)
    ids, mask, _ = batch()
    with torch.no_grad():
        plain = base(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain)
        assert base.config._attn_implementation == "sdpa"
        assert not torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain)
    assert model.unload() is base and base.config._attn_implementation == "sdpa"


@pytest.mark.skipif(MULTI_QUERY_SUPPORTED, reason="this transformers reports multi-query "
                    "Falcon's one key head: PEFT runs it (test_training_step_matches_peft)")
def test_peft_fails_on_multi_query_falcon():
    """The multi-query refusal's README note: with a transformers that reports every query head
    as a key head, PEFT's forward fails there (no function to match)."""
    twin = peft.get_peft_model(_multi_query(), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P))
    ids, mask, _ = batch()
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
        twin(input_ids=ids, attention_mask=mask)
