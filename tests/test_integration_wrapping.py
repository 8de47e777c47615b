"""What `wrap` refuses, and how it tells models apart: a wrapped model, encoder-decoder models and
attention terms the prefix attention cannot compute are clear errors that leave the caller's
model as it was; causal LMs are recognised by capability (GPT2LMHeadModel); the mode of each
wrapped model is picked once, at wrap time."""
import pytest
import torch
import transformers as T

import ptuning_fast as pf
from conftest import assert_close
from models import batch, tiny_bert, tiny_gpt2, tiny_llama, wrapped_and_twin
from ptuning_fast import reference
from ptuning_fast.integrations import attention
from ptuning_fast.integrations import model as model_module
from ptuning_fast.integrations.modes import choice as modes
from ptuning_fast.integrations.support import task_type_of
from test_falcon_prefix import falcon

peft = pytest.importorskip("peft")


def snapshot(model):
    return ([p.requires_grad for p in model.parameters()], model.config._attn_implementation,
            model.training)


class _Attention(torch.nn.Module):
    """Stands in for a model's attention module calling the registered function."""
    layer_idx, is_causal = 0, True


def _qkv():
    return (torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8))


@pytest.mark.parametrize("name, value", [
    ("seq_idx", torch.zeros(2, 5, dtype=torch.int32)),  # Mamba-style packing ids
    ("some_future_kwarg", 1.5),
])
def test_unknown_attention_kwargs_are_refused(name, value):
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match=f"_Attention.*`{name}`") as info:
        attention.prefix_attention_forward(_Attention(), q, k, v, None, **{name: value})
    assert "cannot compute it" in str(info.value)


def test_harmless_kwargs_and_none_are_accepted():
    q, k, v = _qkv()
    out, _ = attention.prefix_attention_forward(
        _Attention(), q, k, v, None, scaling=0.3, position_ids=torch.arange(5)[None],
        use_cache=True, cache_position=torch.arange(5), position_bias=None, s_aux=None,
        sliding_window=None, softcap=None, output_attentions=False)
    want = reference.prefix_attention(q, k, v, scale=0.3).transpose(1, 2)
    assert_close(out, want, torch.float32)


def test_is_causal_kwarg_overrides_the_module():
    # transformers lets a call run a decoder bidirectionally (is_causal=False in kwargs).
    q, k, v = _qkv()
    out, _ = attention.prefix_attention_forward(_Attention(), q, k, v, None, is_causal=False)
    want = reference.prefix_attention(q, k, v, causal=False).transpose(1, 2)
    assert_close(out, want, torch.float32)


def test_untested_encoder_decoder_prefix_tuning_is_refused_untouched():
    """Prefix tuning on encoder-decoders is tested against PEFT on T5 and BART only
    (test_model_matrix.py); mT5 shares T5's attention but is refused until it is tested."""
    mt5 = T.MT5ForConditionalGeneration(T.MT5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=32,
                                                    num_layers=1, num_heads=4))
    before = snapshot(mt5)
    with pytest.raises(NotImplementedError,
                       match="MT5ForConditionalGeneration.*encoder-decoder.*T5's and BART's"):
        pf.wrap(mt5, pf.PrefixTuningConfig(3))
    assert snapshot(mt5) == before


def test_wrapping_a_wrapped_model_is_refused():
    inner = pf.wrap(tiny_llama(0), pf.PrefixTuningConfig(3))
    with pytest.raises(TypeError, match="PTuningModel.*model.base_model"):
        pf.wrap(inner, pf.PrefixTuningConfig(3))
    twin = peft.get_peft_model(tiny_llama(0), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                      num_virtual_tokens=3))
    with pytest.raises(TypeError, match="PEFT model"):
        pf.wrap(twin, pf.PrefixTuningConfig(3))


@pytest.mark.parametrize("make, kwargs, error, match", [
    (tiny_bert, dict(modules_to_save=["no_such_head"]), ValueError, "no_such_head"),
    (tiny_llama, dict(modules_to_save=["lm_head"]), ValueError, "lm_head.*CAUSAL_LM"),
    (tiny_bert, dict(modules_to_save=["bert"]), ValueError, "bert.*SEQ_CLS.*classifier"),
    (tiny_llama, dict(backend="cuda"), ValueError, "backend"),
])
def test_a_refused_wrap_leaves_the_model_as_it_was(make, kwargs, error, match):
    base = make(0)
    before = snapshot(base)
    with pytest.raises(error, match=match):
        pf.wrap(base, pf.PrefixTuningConfig(3), **kwargs)
    assert snapshot(base) == before


def test_causal_lms_recognised_by_capability():
    assert task_type_of(tiny_gpt2(0)) == "CAUSAL_LM"           # no "ForCausalLM" in its name
    assert task_type_of(tiny_llama(0)) == "CAUSAL_LM"
    assert task_type_of(tiny_bert(0)) == "SEQ_CLS"
    assert task_type_of(T.LlamaModel(tiny_llama(0).config)) == "FEATURE_EXTRACTION"


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_gpt2_trains_with_labels_like_peft(method):
    config = pf.PromptTuningConfig(3) if method == "prompt" else pf.PrefixTuningConfig(3)
    ours, twin = wrapped_and_twin("gpt2", config)
    ids, mask, labels = batch("llama")
    a = ours(input_ids=ids, attention_mask=mask, labels=labels)
    b = twin(input_ids=ids, attention_mask=mask, labels=labels)
    assert_close(a.loss, b.loss, torch.float32, name="loss")
    assert_close(a.logits, b.logits, torch.float32, name="logits")


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_gpt2_generates(method):
    config = pf.PromptTuningConfig(3) if method == "prompt" else pf.PrefixTuningConfig(3)
    ours, _ = wrapped_and_twin("gpt2", config)
    ids = torch.randint(3, 97, (2, 5))
    tokens = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                           do_sample=False, pad_token_id=0)
    seq = ids                                   # greedy by hand, one full pass per token
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat([seq, ours(input_ids=seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(tokens[:, -4:], seq[:, -4:])


@pytest.mark.parametrize("config", [pf.PrefixTuningConfig(3, num_tasks=2),
                                    pf.PromptTuningConfig(3, num_tasks=2)],
                         ids=["prefix", "prompt"])
def test_an_empty_batch_names_the_argument(config):
    model = pf.wrap(tiny_llama(0), config)
    empty = torch.empty(0, 4, dtype=torch.long)
    no_tasks = torch.empty(0, dtype=torch.long)
    with pytest.raises(ValueError, match="`input_ids` has an empty batch.*\\(0, 4\\)"):
        model(input_ids=empty, task_ids=no_tasks)
    with pytest.raises(ValueError, match="`inputs_embeds` has an empty batch"):
        model(inputs_embeds=torch.empty(0, 4, 32), task_ids=no_tasks)
    with pytest.raises(ValueError, match="`input_ids` has an empty batch"):
        model.generate(input_ids=empty, task_ids=no_tasks, max_new_tokens=2)


def _t5():
    torch.manual_seed(0)
    return T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=97, d_model=32, d_kv=8, d_ff=32, num_layers=2, num_heads=4,
        decoder_start_token_id=0, attn_implementation="eager")).eval()


@pytest.mark.parametrize("make, config, kwargs, mode", [
    (tiny_llama, lambda: pf.PrefixTuningConfig(3), {}, modes.PrefixAttentionMode),
    (tiny_llama, lambda: pf.PromptTuningConfig(3), {}, modes.SharedPromptMode),
    (tiny_llama, lambda: pf.PromptTuningConfig(3), {"shared_prompt": False},
     modes.ConcatenationMode),
    (tiny_bert, lambda: pf.PTuningConfig(3), {}, modes.ConcatenationMode),
    (falcon, lambda: pf.PrefixTuningConfig(3), {}, modes.PrefixInCacheMode),
    (_t5, lambda: pf.PrefixTuningConfig(3), {}, modes.Seq2SeqMode),
    (_t5, lambda: pf.PromptTuningConfig(3), {}, modes.Seq2SeqMode),
])
def test_the_mode_is_picked_at_wrap_time(make, config, kwargs, mode):
    model = pf.wrap(make(), config(), **kwargs)
    assert type(model._mode) is mode
    assert model.uses_own_attention == (
        model.base_model.config._attn_implementation == attention.ATTN_IMPLEMENTATION)


def test_forward_and_generate_never_pick_a_mode_again(monkeypatch):
    model = pf.wrap(tiny_llama(), pf.PromptTuningConfig(3), shared_prompt=True)

    def refuse(*args, **kwargs):
        raise AssertionError("a mode was picked after wrapping")

    monkeypatch.setattr(model_module, "pick_mode", refuse)
    ids, mask, labels = batch("llama", padding="left")
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, labels=labels)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False,
                   pad_token_id=0)
