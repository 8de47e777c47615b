"""PeftModel's calls on PTuningModel: parameter counts and PEFT's printed line, disable_adapter
(forward and generate are the base model's), get_base_model, unload (the base model back as it
was)."""
import copy

import pytest
import torch

import ptuning_fast as pf
from models import batch, tiny_bert, tiny_llama
from ptuning_fast.integrations import attention, generations

peft = pytest.importorskip("peft")

METHODS = {
    "prompt": (lambda: pf.PromptTuningConfig(num_virtual_tokens=3),
               lambda task: peft.PromptTuningConfig(task_type=task, num_virtual_tokens=3)),
    "ptuning": (lambda: pf.PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=12),
                lambda task: peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=3,
                                                      encoder_hidden_size=12)),
    "prefix": (lambda: pf.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True),
               lambda task: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=3,
                                                    prefix_projection=True)),
}


def _randomize(model):
    """A prompt that visibly changes the output (never the all-zero or default one)."""
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 1)
    return model


@pytest.mark.parametrize("method", list(METHODS))
def test_parameter_counts_and_printed_line_match_peft(method, capsys):
    ours_cfg, peft_cfg = METHODS[method]
    base = tiny_llama(0)
    twin = peft.get_peft_model(copy.deepcopy(base), peft_cfg("CAUSAL_LM"))
    mine = pf.wrap(base, ours_cfg())
    assert mine.get_nb_trainable_parameters() == twin.get_nb_trainable_parameters()
    twin.print_trainable_parameters()
    theirs = capsys.readouterr().out
    mine.print_trainable_parameters()
    assert capsys.readouterr().out == theirs
    assert theirs.startswith("trainable params: ") and " || trainable%: " in theirs


def test_counts_on_a_classifier():
    """Trainable equal to PEFT's; PEFT's total also counts the copy of the head it trains."""
    base = tiny_bert(0)
    twin = peft.get_peft_model(copy.deepcopy(base), METHODS["prompt"][1]("SEQ_CLS"))
    mine = pf.wrap(base, METHODS["prompt"][0]())
    trainable, total = mine.get_nb_trainable_parameters()
    head = sum(p.numel() for p in base.classifier.parameters())
    assert trainable == twin.get_nb_trainable_parameters()[0]
    assert total + head == twin.get_nb_trainable_parameters()[1]
    assert total == sum(p.numel() for p in base.parameters()) + 3 * 32


def test_get_base_model():
    base = tiny_llama(0)
    mine = pf.wrap(base, METHODS["prefix"][0]())
    assert mine.get_base_model() is base


@pytest.mark.parametrize("method", list(METHODS))
def test_disable_adapter_computes_the_base_model(method):
    fresh = tiny_llama(0)
    mine = _randomize(pf.wrap(tiny_llama(0), METHODS[method][0](), backend="reference"))
    ids, mask, labels = batch("llama", padding="left")
    with torch.no_grad():
        adapted = mine(input_ids=ids, attention_mask=mask).logits
        expected = fresh(input_ids=ids, attention_mask=mask, labels=labels)
        with mine.disable_adapter():
            with mine.disable_adapter():           # nested: still off
                inner = mine(input_ids=ids, attention_mask=mask, labels=labels)
            off = mine(input_ids=ids, attention_mask=mask, labels=labels)
        again = mine(input_ids=ids, attention_mask=mask).logits
    for out in (off, inner):
        torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=0)
        torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=0)
    torch.testing.assert_close(again, adapted, rtol=0, atol=0)      # back on afterwards
    P = 0 if method == "prefix" else 3
    assert (adapted[:, P:] - expected.logits).abs().max() > 1e-3     # the prompt mattered


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_disable_adapter_during_generate(method):
    fresh = tiny_llama(0)
    mine = _randomize(pf.wrap(tiny_llama(0), METHODS[method][0](), backend="reference"))
    ids, mask, _ = batch("llama", padding="left")
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
              pad_token_id=0)
    with mine.disable_adapter():
        tokens = mine.generate(**kw)
    assert torch.equal(tokens, fresh.generate(**kw))
    assert mine.generate(**kw).shape == tokens.shape        # and generating with it still works


@pytest.mark.parametrize("method", list(METHODS))
def test_unload_gives_the_untouched_base_model_back(method):
    base = tiny_llama(0, attn_implementation="sdpa")
    fresh = copy.deepcopy(base)
    base.lm_head.weight.requires_grad_(False)        # the caller's own flags come back too
    flags = [p.requires_grad for p in base.parameters()]
    mine = _randomize(pf.wrap(base, METHODS[method][0](), backend="reference"))
    if method == "prefix":
        assert base.config._attn_implementation == attention.ATTN_IMPLEMENTATION
    ids, mask, _ = batch("llama", padding="left")
    with torch.no_grad():
        mine(input_ids=ids, attention_mask=mask)
    back = mine.unload()
    assert back is base
    assert back.config._attn_implementation == "sdpa"
    assert [p.requires_grad for p in back.parameters()] == flags
    assert not any(m in generations._OWNER for m in back.modules())
    assert not back._forward_pre_hooks and not back._forward_hooks
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, attention_mask=mask).logits,
                                   fresh(input_ids=ids, attention_mask=mask).logits,
                                   rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="unloaded"):
        mine(input_ids=ids, attention_mask=mask)
    with pytest.raises(RuntimeError, match="unloaded"):
        mine.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)
    pf.wrap(back, METHODS[method][0]())          # and it can be wrapped again


def test_peft_bookkeeping_attributes():
    cfg = pf.PrefixTuningConfig(num_virtual_tokens=3)
    mine = pf.wrap(tiny_llama(0), cfg)
    assert mine.active_adapter == "default" and mine.peft_config == {"default": cfg}
    assert cfg.is_prompt_learning and cfg.to_dict()["prefix_projection"] is False
