"""The prompt modules and configs: PEFT-compatible structure and layout, inits, export, tasks,
validation and conversion to/from PEFT's configs."""
import dataclasses

import pytest
import torch

import ptuning_fast as pf
from ptuning_fast.config import ModelDims, from_peft_config, to_peft_dict
from models import BUILDERS, VOCAB, tiny_llama, wrapped_and_twin

peft = pytest.importorskip("peft")

METHOD_CONFIGS = {
    "prefix": pf.PrefixTuningConfig(3),
    "prefix_proj": pf.PrefixTuningConfig(3, prefix_projection=True, encoder_hidden_size=24),
    "prompt": pf.PromptTuningConfig(3),
    "ptuning_mlp": pf.PTuningConfig(3, encoder_hidden_size=20),
    "ptuning_lstm": pf.PTuningConfig(3, encoder_reparameterization_type="lstm",
                                     encoder_hidden_size=8),
}


@pytest.mark.parametrize("model_name", ["llama", "qwen2", "bert"])
@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_state_dict_matches_peft(model_name, method):
    ours, twin = wrapped_and_twin(model_name, METHOD_CONFIGS[method])
    mine = {k: tuple(v.shape) for k, v in ours.prompt_encoder.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in twin.prompt_encoder["default"].state_dict().items()}
    assert mine == theirs
    # the tensor PEFT checkpoints is our encoder's output, element for element
    torch.testing.assert_close(ours.prompt_encoder.output_for_checkpoint(),
                               twin.get_prompt_embedding_to_save("default"), rtol=0, atol=0)


@pytest.mark.parametrize("model_name", ["llama", "qwen2", "bert"])
@pytest.mark.parametrize("method", ["prefix", "prefix_proj"])
def test_layer_prefixes_match_peft_cache_layout(model_name, method):
    """Layer i's (Hkv, P, D) key/value equal what PEFT puts in its cache for every row."""
    ours, twin = wrapped_and_twin(model_name, METHOD_CONFIGS[method])
    prefixes = ours.prompt_encoder()
    cache = twin.get_prompt(batch_size=2)
    dims = ours.dims
    assert prefixes.kv.shape == (dims.num_layers, 2, dims.num_kv_heads, 3, dims.head_dim)
    for i in range(dims.num_layers):
        k, v = prefixes.layer(i)
        for row in range(2):    # PEFT projects per row: last-bit differences with projection
            torch.testing.assert_close(k, cache.layers[i].keys[row])
            torch.testing.assert_close(v, cache.layers[i].values[row])


def test_gqa_and_head_dim_sizes():
    dims = ModelDims.from_model_config(tiny_llama().config)   # hidden 32, 4 heads, 2 kv, D 16
    assert (dims.num_kv_heads, dims.head_dim, dims.prefix_token_dim) == (2, 16, 32)
    enc = pf.PrefixEncoder.from_config(pf.PrefixTuningConfig(5), dims)
    assert enc.embedding.weight.shape == (5, 2 * 2 * 2 * 16)
    k, v = enc().layer(1)
    assert k.shape == v.shape == (2, 5, 16)


def test_multi_task_outputs():
    dims = ModelDims.from_model_config(tiny_llama().config)
    enc = pf.PrefixEncoder.from_config(pf.PrefixTuningConfig(4, num_tasks=3), dims)
    k, _ = enc().layer(0)
    assert k.shape == (3, 2, 4, 16)
    flat = enc.embedding.weight.view(3, 4, 2, 2, 2, 16)       # (T, P, L, kv, Hkv, D)
    torch.testing.assert_close(k[2], flat[2, :, 0, 0].transpose(0, 1))
    pe = pf.PromptEncoder.from_config(pf.PTuningConfig(4, num_tasks=3), dims)
    out = pe()
    assert out.shape == (3, 4, 32)
    # each task's prompt is the encoder applied to that task's own rows
    torch.testing.assert_close(out[1], pe.mlp_head(pe.embedding.weight[4:8]))


@pytest.mark.parametrize("kind", ["ptuning_mlp", "ptuning_lstm", "prefix_proj"])
def test_export_keeps_output_and_drops_encoder(kind):
    dims = ModelDims.from_model_config(tiny_llama().config)
    cfg = METHOD_CONFIGS[kind]
    module = (pf.PrefixEncoder if kind.startswith("prefix") else pf.PromptEncoder).from_config(
        cfg, dims)
    before = module.output_for_checkpoint().detach().clone()
    n_before = sum(p.numel() for p in module.parameters())
    module.export()
    assert sum(p.numel() for p in module.parameters()) < n_before
    assert set(module.state_dict()) == {"embedding.weight"}
    torch.testing.assert_close(module.output_for_checkpoint(), before)


def _rows_in_vocab(rows, vocab):
    """(n,) bool: row i equals some vocabulary row exactly."""
    return (rows[:, None, :] == vocab[None]).all(-1).any(-1)


def test_inits_from_vocabulary():
    model = tiny_llama()
    emb = model.get_input_embeddings()
    dims = ModelDims.from_model_config(model.config)
    torch.manual_seed(0)
    sv = pf.PromptEmbedding.from_config(
        pf.PromptTuningConfig(6, prompt_tuning_init="sample_vocab"), dims, emb)
    rows = sv.embedding.weight
    assert _rows_in_vocab(rows, emb.weight).all()

    text = pf.PromptEmbedding.from_config(
        pf.PromptTuningConfig(5, prompt_tuning_init="text", prompt_tuning_init_text=[7, 8]),
        dims, emb)
    torch.testing.assert_close(text.embedding.weight, emb.weight[[7, 8, 7, 8, 7]])

    labels = pf.PromptEmbedding.from_config(
        pf.PromptTuningConfig(4, prompt_tuning_init="labels",
                              prompt_tuning_init_text=[[10, 12], [20]]), dims, emb)
    torch.testing.assert_close(labels.embedding.weight[0], emb.weight[[10, 12]].mean(0))
    torch.testing.assert_close(labels.embedding.weight[1], emb.weight[20])
    assert _rows_in_vocab(labels.embedding.weight[2:], emb.weight).all()


def test_text_init_with_tokenizer():
    class CharTokenizer:      # a tokenizer is anything callable returning {"input_ids": [...]}
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % VOCAB for c in text]}

    model = tiny_llama()
    emb = model.get_input_embeddings()
    m = pf.wrap(model, pf.PromptTuningConfig(4, prompt_tuning_init="text",
                                             prompt_tuning_init_text="abc"),
                tokenizer=CharTokenizer())
    torch.testing.assert_close(m.prompt_encoder.embedding.weight,
                               emb.weight[[ord("a") % VOCAB, ord("b") % VOCAB, ord("c") % VOCAB,
                                           ord("a") % VOCAB]])
    with pytest.raises(ValueError, match="tokenizer"):
        pf.wrap(tiny_llama(), pf.PromptTuningConfig(4, prompt_tuning_init="text",
                                                    prompt_tuning_init_text="abc"))


@pytest.mark.parametrize("make, match", [
    (lambda: pf.PromptTuningConfig(0), "num_virtual_tokens"),
    (lambda: pf.PromptTuningConfig(4, prompt_tuning_init="vocab"), "init"),
    (lambda: pf.PromptTuningConfig(4, prompt_tuning_init="text"), "init_text"),
    (lambda: pf.PromptTuningConfig(2, prompt_tuning_init="labels",
                                   prompt_tuning_init_text=["a", "b", "c"]), "labels"),
    (lambda: pf.PromptTuningConfig(4, prompt_tuning_init_text="hello"), "init_text"),
    (lambda: pf.PTuningConfig(4, encoder_reparameterization_type="gru"), "encoder"),
    (lambda: pf.PTuningConfig(4, encoder_dropout=1.5), "encoder_dropout"),
    (lambda: pf.PrefixTuningConfig(4, num_tasks=0), "num_tasks"),
    (lambda: pf.PrefixTuningConfig(4, dropout=-0.1), "dropout"),
    (lambda: pf.PrefixTuningConfig(4, encoder_hidden_size=0), "encoder_hidden_size"),
    # Wrong types name the argument (float("x") used to fail naming nothing).
    (lambda: pf.PTuningConfig(4, encoder_dropout="x"), "`encoder_dropout` must be a float.*'x'"),
    (lambda: pf.PrefixTuningConfig(4, dropout="x"), "`dropout` must be a float.*'x'"),
    (lambda: pf.PTuningConfig(4, encoder_dropout=float("nan")), "encoder_dropout"),
    (lambda: pf.PTuningConfig(4, encoder_hidden_size=True), "encoder_hidden_size"),
])
def test_bad_configs_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_mlp_encoder_num_layers_ignored_with_a_warning_as_peft():
    with pytest.warns(UserWarning, match="encoder_num_layers=3 is ignored"):
        cfg = pf.PTuningConfig(4, encoder_num_layers=3)
    dims = ModelDims.from_model_config(tiny_llama().config)
    mlp = pf.PromptEncoder.from_config(cfg, dims).mlp_head
    assert [type(m).__name__ for m in mlp] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]


def test_bad_config_lists_every_reason():
    with pytest.raises(ValueError) as err:
        pf.PrefixTuningConfig(0, dropout=2.0, num_tasks=-1)
    assert all(word in str(err.value) for word in ("num_virtual_tokens", "dropout", "num_tasks"))


def test_wrap_rejects_unknown_config_and_backend():
    with pytest.raises(TypeError, match="PrefixTuningConfig"):
        pf.wrap(tiny_llama(), {"num_virtual_tokens": 3})
    with pytest.raises(ValueError, match="backend"):
        pf.wrap(tiny_llama(), pf.PrefixTuningConfig(3), backend="cuda")


def test_peft_config_conversion_round_trip():
    cases = [
        (peft.PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=True,
                                 encoder_hidden_size=64),
         pf.PrefixTuningConfig(5, prefix_projection=True, encoder_hidden_size=64)),
        (peft.PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type="LSTM",
                                  encoder_hidden_size=16, encoder_num_layers=1),
         pf.PTuningConfig(4, encoder_reparameterization_type="lstm", encoder_hidden_size=16,
                          encoder_num_layers=1)),
        (peft.PromptTuningConfig(num_virtual_tokens=7, prompt_tuning_init="SAMPLE_VOCAB"),
         pf.PromptTuningConfig(7, prompt_tuning_init="sample_vocab")),
    ]
    dims = ModelDims.from_model_config(tiny_llama().config)
    for theirs, ours in cases:
        assert from_peft_config(theirs) == ours
        d = to_peft_dict(ours, dims, task_type="CAUSAL_LM", modules_to_save=None,
                         base_model_name_or_path=None,
                         encoder_hidden_size=getattr(ours, "encoder_hidden_size", None))
        # A saved config records the model's sizes and the task: they come back as fields.
        recorded = dataclasses.replace(ours, task_type="CAUSAL_LM", inference_mode=True,
                                       token_dim=d["token_dim"], num_layers=d["num_layers"],
                                       num_attention_heads=d["num_attention_heads"],
                                       num_transformer_submodules=1)
        if ours.method != "prompt_tuning":
            recorded = dataclasses.replace(recorded, encoder_hidden_size=d["encoder_hidden_size"])
        assert from_peft_config(d) == recorded
        # PEFT itself accepts the dict
        peft_cfg = peft.PeftConfig.from_peft_type(**d)
        assert from_peft_config(peft_cfg) == recorded


def test_peft_zero_init_converted_and_dropped_for_loading():
    d = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3, "init_weights": "zero"}
    assert from_peft_config(d) == pf.PrefixTuningConfig(3, init_weights="zero")
    assert from_peft_config(d, for_loading=True) == pf.PrefixTuningConfig(3)


def test_peft_num_transformer_submodules_checked():
    """2 is PEFT's encoder-decoder layout (the model's dims decide the rows); other values are
    not PEFT's."""
    from_peft_config({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3,
                      "num_transformer_submodules": 2})
    with pytest.raises(ValueError, match="num_transformer_submodules.*got 3"):
        from_peft_config({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3,
                          "num_transformer_submodules": 3})


@pytest.mark.parametrize("model_name", list(BUILDERS))
def test_only_prompt_params_trainable(model_name):
    ours, _ = wrapped_and_twin(model_name, METHOD_CONFIGS["prefix"])
    trainable = set(ours.trainable_parameters())
    expected = {"prompt_encoder.embedding.weight"}
    if model_name in ("bert", "roberta"):     # the classification head trains, as in PEFT
        head = ours.base_model.classifier
        expected |= {f"base_model.classifier.{n}" for n, _ in head.named_parameters()}
        assert len(expected) > 2
    assert trainable == expected
