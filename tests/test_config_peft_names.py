"""A PEFT user's script keeps working when `peft.X(...)` becomes `pf.X(...)`: every field name
and default of PEFT's config classes is accepted, the same keyword arguments (PEFT's enums,
strings in any case) build the same prompt module from the same random state, so the wrapped
models give PEFT's logits; each field has PEFT's name only; what we cannot honour is an error."""
import copy
import dataclasses

import pytest
import torch

import ptuning_fast as pf
from conftest import assert_close
from models import batch, tiny_bert, tiny_llama
from tiny_tokenizer import tiny_tokenizer

peft = pytest.importorskip("peft")

PAIRS = [(pf.PromptTuningConfig, "PromptTuningConfig"),
         (pf.PTuningConfig, "PromptEncoderConfig"),
         (pf.PrefixTuningConfig, "PrefixTuningConfig")]


def _value(v):
    return getattr(v, "value", v)


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=[p[1] for p in PAIRS])
def test_every_peft_field_and_default_accepted(ours, theirs):
    theirs = getattr(peft, theirs)
    peft_fields = {f.name for f in dataclasses.fields(theirs)}
    assert peft_fields <= {f.name for f in dataclasses.fields(ours)}
    a, b = ours(num_virtual_tokens=3), theirs(num_virtual_tokens=3)
    for name in peft_fields - {"peft_version"}:        # PEFT stamps its own version
        assert _value(getattr(a, name)) == _value(getattr(b, name)), name
    # Every field given explicitly by name, with PEFT's values, is accepted.
    ours(**{name: getattr(b, name) for name in peft_fields})


def _assert_same_outputs(mine, twin, model_name="llama", padding="left"):
    ids, mask, labels = batch(model_name, padding=padding)
    with torch.no_grad():
        a = mine(input_ids=ids, attention_mask=mask, labels=labels)
        b = twin(input_ids=ids, attention_mask=mask, labels=labels)
    assert_close(a.logits, b.logits, torch.float32, name="logits")
    assert_close(a.loss, b.loss, torch.float32, name="loss")


def _peft_and_ours(base, ours_cls, peft_cls, kwargs, seed=0):
    """PEFT's model and ours from the same kwargs, each built from the same random state."""
    twin_base = copy.deepcopy(base)
    torch.manual_seed(seed)
    twin = peft.get_peft_model(twin_base, getattr(peft, peft_cls)(**kwargs))
    torch.manual_seed(seed)
    mine = pf.wrap(base, ours_cls(**kwargs), backend="reference")
    return mine, twin


SAME_KWARGS = {
    "prompt-random": (pf.PromptTuningConfig, "PromptTuningConfig",
                      dict(task_type="CAUSAL_LM", num_virtual_tokens=4)),
    "prompt-sample-vocab": (pf.PromptTuningConfig, "PromptTuningConfig",
                                 dict(task_type="CAUSAL_LM", num_virtual_tokens=5,
                                      prompt_tuning_init="SAMPLE_VOCAB")),
    "ptuning-mlp": (pf.PTuningConfig, "PromptEncoderConfig",
                    dict(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=20)),
    "ptuning-lstm": (pf.PTuningConfig, "PromptEncoderConfig",
                     dict(task_type="CAUSAL_LM", num_virtual_tokens=3,
                          encoder_reparameterization_type="LSTM", encoder_hidden_size=8,
                          encoder_num_layers=1)),
    "prefix": (pf.PrefixTuningConfig, "PrefixTuningConfig",
               dict(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    "prefix-projection-default-width": (pf.PrefixTuningConfig, "PrefixTuningConfig",
                                        dict(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                             prefix_projection=True)),
    "prefix-zero": (pf.PrefixTuningConfig, "PrefixTuningConfig",
                    dict(task_type="CAUSAL_LM", num_virtual_tokens=3, init_weights="zero")),
    "prefix-projection-zero": (pf.PrefixTuningConfig, "PrefixTuningConfig",
                               dict(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                    prefix_projection=True, init_weights="zero")),
}


def _enum_kwargs(kwargs):
    """PEFT's enum members where a string was given (users write either)."""
    out = dict(kwargs)
    if "task_type" in out:
        out["task_type"] = peft.TaskType(out["task_type"])
    if "prompt_tuning_init" in out:
        out["prompt_tuning_init"] = peft.PromptTuningInit(out["prompt_tuning_init"])
    if "encoder_reparameterization_type" in out:
        out["encoder_reparameterization_type"] = peft.PromptEncoderReparameterizationType(
            out["encoder_reparameterization_type"])
    return out


@pytest.mark.parametrize("enums", [False, True], ids=["strings", "enums"])
@pytest.mark.parametrize("case", list(SAME_KWARGS))
def test_same_kwargs_same_model_as_peft(case, enums):
    ours_cls, peft_cls, kwargs = SAME_KWARGS[case]
    kwargs = _enum_kwargs(kwargs) if enums else kwargs
    mine, twin = _peft_and_ours(tiny_llama(0), ours_cls, peft_cls, kwargs)
    theirs = twin.prompt_encoder["default"].state_dict()
    state = mine.prompt_encoder.state_dict()
    assert state.keys() == theirs.keys()
    for name in state:                      # same init from the same random state
        torch.testing.assert_close(state[name], theirs[name], rtol=0, atol=0, msg=name)
    if "zero" in case:
        assert mine.prompt_encoder().kv.abs().max() == 0       # PEFT's zero init: a zero prefix
    _assert_same_outputs(mine, twin)


@pytest.mark.parametrize("init", ["TEXT", "text"])
def test_text_init_from_tokenizer_path_same_as_peft(tmp_path, init):
    """PEFT's TEXT init: AutoTokenizer.from_pretrained(path, **tokenizer_kwargs), the text
    tokenized with its special tokens, repeated/truncated to P. (PEFT wants its enum's exact
    value; ours also takes the lower case.)"""
    tiny_tokenizer(tmp_path)
    kwargs = dict(task_type="CAUSAL_LM", num_virtual_tokens=7,
                  prompt_tuning_init_text="classify this review as positive",
                  tokenizer_name_or_path=str(tmp_path), tokenizer_kwargs={"use_fast": True})
    base = tiny_llama(0)
    twin = peft.get_peft_model(copy.deepcopy(base),
                               peft.PromptTuningConfig(prompt_tuning_init="TEXT", **kwargs))
    mine = pf.wrap(base, pf.PromptTuningConfig(prompt_tuning_init=init, **kwargs))
    emb = mine.base_model.get_input_embeddings().weight
    ids = [1, 13, 14, 15, 16, 17, 1]     # <s> classify this review as positive, repeated
    torch.testing.assert_close(mine.prompt_encoder.embedding.weight, emb[ids])
    torch.testing.assert_close(mine.prompt_encoder.embedding.weight,
                               twin.prompt_encoder["default"].embedding.weight)


def test_seq_cls_same_as_peft_with_modules_to_save():
    base = tiny_bert(0)
    kwargs = dict(task_type=peft.TaskType.SEQ_CLS, num_virtual_tokens=3,
                  modules_to_save=["classifier"])
    mine, twin = _peft_and_ours(base, pf.PromptTuningConfig, "PromptTuningConfig", kwargs)
    assert mine.modules_to_save == ["classifier"]
    trainable, total = mine.get_nb_trainable_parameters()
    # PEFT trains a copy of the head beside the frozen original; ours trains it in place.
    head = sum(p.numel() for p in mine.base_model.classifier.parameters())
    assert (trainable, total + head) == twin.get_nb_trainable_parameters()
    _assert_same_outputs(mine, twin, "bert", "right")


@pytest.mark.parametrize("peft_cls, ours_cls, extra", [
    ("PromptTuningConfig", pf.PromptTuningConfig, {}),
    ("PromptEncoderConfig", pf.PTuningConfig, {"encoder_hidden_size": 16}),
    ("PrefixTuningConfig", pf.PrefixTuningConfig, {"prefix_projection": True}),
])
def test_inference_mode_builds_peft_inference_module(peft_cls, ours_cls, extra):
    """inference_mode=True: the encoder's output only, as PEFT builds it; the same counts."""
    kwargs = dict(task_type="CAUSAL_LM", num_virtual_tokens=3, inference_mode=True, **extra)
    mine, twin = _peft_and_ours(tiny_llama(0), ours_cls, peft_cls, kwargs)
    theirs = twin.prompt_encoder["default"].state_dict()
    assert {k: v.shape for k, v in mine.prompt_encoder.state_dict().items()} == \
        {k: v.shape for k, v in theirs.items()}
    assert mine.get_nb_trainable_parameters() == twin.get_nb_trainable_parameters()
    mine.prompt_encoder.load_state_dict(theirs)
    _assert_same_outputs(mine, twin)


# -- one name per field: PEFT's ------------------------------------------------------------------

@pytest.mark.parametrize("cls, short", [(pf.PromptTuningConfig, "init"),
                                        (pf.PromptTuningConfig, "init_text"),
                                        (pf.PTuningConfig, "encoder"),
                                        (pf.PrefixTuningConfig, "projection")])
def test_our_old_short_names_are_not_fields(cls, short):
    """Each field has PEFT's name only; the short names we used before are refused by name."""
    with pytest.raises(TypeError, match=f"'{short}'"):
        cls(4, **{short: None})
    assert not hasattr(cls(4), short)


def test_old_checkpoint_dicts_with_short_names_still_load():
    """Our JSON form written before the configs took PEFT's names."""
    from ptuning_fast.config import from_dict
    old = {"method": "prefix_tuning", "num_virtual_tokens": 3, "projection": True,
           "encoder_hidden_size": 512, "dropout": 0.0, "num_tasks": 1}
    assert from_dict(old) == pf.PrefixTuningConfig(3, prefix_projection=True,
                                                   encoder_hidden_size=512)


# -- what cannot be honoured is refused ----------------------------------------------------------

@pytest.mark.parametrize("make, error, match", [
    (lambda: pf.PrefixTuningConfig(3, num_transformer_submodules=3), ValueError,
     "num_transformer_submodules"),
    (lambda: pf.PromptTuningConfig(3, task_type="TRANSLATION"), ValueError, "task_type"),
    (lambda: pf.PromptTuningConfig(3, peft_type="LORA"), ValueError, "peft_type"),
    (lambda: pf.PromptTuningConfig(3, tokenizer_kwargs={"use_fast": True}), ValueError,
     "tokenizer_kwargs"),
    (lambda: pf.PrefixTuningConfig(3, init_weights="gaussian"), ValueError, "init_weights"),
    (lambda: pf.PromptTuningConfig(), ValueError, "num_virtual_tokens` is required"),
    (lambda: pf.PromptTuningConfig(3, modules_to_save="classifier"), ValueError,
     "modules_to_save"),
    (lambda: pf.PTuningConfig(3, inference_mode="yes"), ValueError, "inference_mode"),
])
def test_unsupported_values_refused(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("cfg, match", [
    (pf.PrefixTuningConfig(3, token_dim=48), "token_dim=48"),
    (pf.PromptTuningConfig(3, num_layers=5), "num_layers=5"),
    (pf.PrefixTuningConfig(3, num_attention_heads=3), "num_attention_heads=3"),
    # 2 is PEFT's encoder-decoder layout: a decoder-only model has 1
    (pf.PromptTuningConfig(3, num_transformer_submodules=2), "num_transformer_submodules=2"),
    (pf.PromptTuningConfig(3, task_type="SEQ_CLS"), "task_type='SEQ_CLS'"),
    (pf.PromptTuningConfig(3, modules_to_save=["lm_head"]), "modules_to_save"),
])
def test_fields_disagreeing_with_the_model_refused(cfg, match):
    base = tiny_llama(0)
    attn = base.config._attn_implementation
    with pytest.raises(ValueError, match=match):
        pf.wrap(base, cfg)
    assert base.config._attn_implementation == attn
    assert all(p.requires_grad for p in base.parameters())      # untouched


def test_fields_agreeing_with_the_model_accepted():
    """PEFT's sizes as given (the hidden size / query heads) or as PEFT records them after
    adjusting to grouped-query heads (the prefix width / kv heads)."""
    for token_dim, heads in ((32, 4), (32, 2), (32, 4)):
        pf.wrap(tiny_llama(0), pf.PrefixTuningConfig(3, token_dim=token_dim, num_layers=2,
                                                     num_attention_heads=heads))
    # PEFT's config object after get_peft_model filled those in:
    filled = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    peft.get_peft_model(tiny_llama(0), filled)
    assert filled.token_dim == 32 and filled.num_attention_heads == 2
    pf.wrap(tiny_llama(0), filled)


def test_unknown_peft_fields_refused():
    from ptuning_fast.config import from_peft_config
    with pytest.raises(ValueError, match="fields \\['future_option'\\] are not supported"):
        from_peft_config({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3,
                          "future_option": 1})


def test_cartridge_config_wraps_as_prefix_without_frozen_tokens():
    with pytest.raises(NotImplementedError, match="num_frozen_tokens=1"):
        pf.wrap(tiny_llama(0), peft.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    base = tiny_llama(0)
    cfg = peft.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, num_frozen_tokens=0)
    twin = peft.get_peft_model(copy.deepcopy(base), cfg)
    mine = pf.wrap(base, cfg, backend="reference")
    assert mine.is_prefix and not mine.ptuning_config.prefix_projection
    with torch.no_grad():
        mine.prompt_encoder.embedding.weight.copy_(twin.prompt_encoder["default"].weight)
    _assert_same_outputs(mine, twin)


def test_tokenizer_kwargs_reach_the_tokenizer_without_remote_code(tmp_path):
    tiny_tokenizer(tmp_path)
    cfg = pf.PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT",
                                prompt_tuning_init_text="lazy dog",
                                tokenizer_name_or_path=str(tmp_path),
                                tokenizer_kwargs={"trust_remote_code": True})
    with pytest.warns(UserWarning, match="trust_remote_code'\\] is dropped"):
        mine = pf.wrap(tiny_llama(0), cfg)
    emb = mine.base_model.get_input_embeddings().weight
    torch.testing.assert_close(mine.prompt_encoder.embedding.weight, emb[[1, 11, 12]])


def test_inference_mode_trains_no_head_as_peft():
    kwargs = dict(task_type="SEQ_CLS", num_virtual_tokens=3, inference_mode=True)
    mine, twin = _peft_and_ours(tiny_bert(0), pf.PromptTuningConfig, "PromptTuningConfig",
                                kwargs)
    assert not any(p.requires_grad for p in mine.base_model.classifier.parameters())
    assert mine.get_nb_trainable_parameters()[0] == twin.get_nb_trainable_parameters()[0]
