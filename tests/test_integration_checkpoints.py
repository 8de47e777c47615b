"""PEFT-format checkpoints: PEFT loads ours, we load PEFT's, full-state round trips, and clear
errors for checkpoints that do not fit."""
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForSequenceClassification

import ptuning_fast as pf
from conftest import assert_close
from models import BUILDERS, batch, peft_refuses, tiny_llama, wrapped_and_twin

peft = pytest.importorskip("peft")

CONFIGS = {
    "prefix": pf.PrefixTuningConfig(3),
    "prefix_proj": pf.PrefixTuningConfig(3, prefix_projection=True, encoder_hidden_size=16),
    "prompt": pf.PromptTuningConfig(3),
    "ptuning_lstm": pf.PTuningConfig(3, encoder_reparameterization_type="lstm",
                                     encoder_hidden_size=8),
}


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch):
    """Loading a checkpoint must never unpickle: any torch.load call fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called while loading a checkpoint")
    monkeypatch.setattr(torch, "load", refuse)


def logits(model, model_name):
    ids, mask, _ = batch(model_name, padding="left")
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def cases():
    out = [pytest.param(m, k, "reference", id=f"{m}-{k}-reference")
           for m in ("llama", "qwen2", "bert", "roberta") for k in CONFIGS]
    out.append(pytest.param("llama", "prefix", "triton",
                            id="llama-prefix-triton"))
    out.append(pytest.param("llama", "prompt", "triton", id="llama-prompt-triton"))
    return out


@pytest.mark.parametrize("model_name, method, backend", cases())
def test_round_trips_with_peft(model_name, method, backend, tmp_path):
    ours, twin = wrapped_and_twin(model_name, CONFIGS[method], backend=backend)
    expected = logits(ours, model_name)

    ours.save_pretrained(tmp_path / "ours")
    files = set(os.listdir(tmp_path / "ours"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not any(f.endswith(".bin") for f in files)
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert_close(saved["prompt_embeddings"], ours.prompt_encoder.output_for_checkpoint(),
                 torch.float32, name="prompt_embeddings")
    peft_loaded = peft.PeftModel.from_pretrained(BUILDERS[model_name](0), tmp_path / "ours")
    try:
        assert_close(logits(peft_loaded, model_name), expected, torch.float32,
                     name="PEFT loads ours")
    except ValueError as error:
        if not peft_refuses(error):
            raise
        # This PEFT loads the checkpoint but will not run it: check what it would run on (an
        # inference-mode load runs on the embedding itself, the encoder dropped).
        assert_close(peft_loaded.prompt_encoder["default"].embedding.weight,
                     saved["prompt_embeddings"], torch.float32, name="PEFT loads ours")
        for name in ours.modules_to_save:
            head = peft_loaded.base_model.get_submodule(name).modules_to_save["default"]
            for key, value in ours.base_model.get_submodule(name).state_dict().items():
                assert torch.equal(head.state_dict()[key], value), f"PEFT loads {name}.{key}"

    twin.save_pretrained(tmp_path / "peft")
    ours_loaded = pf.PTuningModel.from_pretrained(BUILDERS[model_name](0), tmp_path / "peft",
                                                  backend=backend)
    assert ours_loaded.ptuning_config.method == CONFIGS[method].method
    assert_close(logits(ours_loaded, model_name), expected, torch.float32, name="we load PEFT's")
    assert not ours_loaded.trainable_parameters()          # inference load: frozen, eval
    assert not ours_loaded.training


@pytest.mark.parametrize("method", ["prefix_proj", "ptuning_lstm"])
def test_full_state_keeps_encoder_for_resuming(method, tmp_path):
    ours, _ = wrapped_and_twin("llama", CONFIGS[method])
    ours.save_pretrained(tmp_path, full_state=True)
    loaded = pf.PTuningModel.from_pretrained(tiny_llama(0), tmp_path, is_trainable=True)
    assert set(loaded.prompt_encoder.state_dict()) == set(ours.prompt_encoder.state_dict())
    ids, mask, labels = batch("llama")
    ours.train(), loaded.train()
    for m in (ours, loaded):
        m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    mine = ours.trainable_parameters()
    for name, p in loaded.trainable_parameters().items():
        assert_close(p.grad, mine[name].grad, torch.float32, "grad", name=name)


def test_full_state_file_missing_raises(tmp_path):
    ours, _ = wrapped_and_twin("llama", CONFIGS["prefix_proj"])
    ours.save_pretrained(tmp_path, full_state=True)
    os.remove(tmp_path / "ptuning_fast_state.safetensors")
    with pytest.raises(FileNotFoundError, match="ptuning_fast_state.safetensors is missing"):
        pf.PTuningModel.from_pretrained(tiny_llama(0), tmp_path)


def test_multi_task_and_our_config_round_trip(tmp_path):
    cfg = pf.PromptTuningConfig(3, prompt_tuning_init="text", prompt_tuning_init_text=[5, 6],
                                num_tasks=2)
    model = pf.wrap(tiny_llama(0), cfg)
    with torch.no_grad():
        model.prompt_encoder.embedding.weight.normal_()
    model.save_pretrained(tmp_path)
    loaded = pf.PTuningModel.from_pretrained(tiny_llama(0), tmp_path)
    assert loaded.ptuning_config.num_tasks == 2
    ids, mask, _ = batch("llama")
    tasks = torch.tensor([1, 0, 1])
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, task_ids=tasks).logits
        b = loaded(input_ids=ids, attention_mask=mask, task_ids=tasks).logits
    assert_close(b, a, torch.float32, name="multi-task logits")


def test_mismatched_layers_and_heads_raise(tmp_path):
    pf.wrap(tiny_llama(0), CONFIGS["prefix"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_layers=2 \\(model has 3\\)"):
        pf.PTuningModel.from_pretrained(tiny_llama(0, num_hidden_layers=3), tmp_path)
    with pytest.raises(ValueError, match="num_attention_heads=2 \\(model has 4\\)"):
        pf.PTuningModel.from_pretrained(tiny_llama(0, num_key_value_heads=4), tmp_path)
    with pytest.raises(ValueError, match="token_dim"):
        pf.PTuningModel.from_pretrained(tiny_llama(0, head_dim=8), tmp_path)


def test_adapter_of_another_base_model_says_so(tmp_path):
    _, twin = wrapped_and_twin("llama", CONFIGS["prompt"])
    twin.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="trained for a different base model.*token_dim=32 "
                                         "\\(model has 48\\)"):
        pf.PTuningModel.from_pretrained(tiny_llama(0, hidden_size=48), tmp_path)


@pytest.mark.parametrize("method", ["prefix_proj", "ptuning_lstm"])
def test_trainable_load_of_encoder_output_warns(method, tmp_path):
    """PEFT saves only the encoder's output: training it further is another parameterisation
    than PEFT's, said at load with both parameter counts; a full-state save keeps the encoder
    and loads without the warning."""
    ours, twin = wrapped_and_twin("llama", CONFIGS[method])
    twin.save_pretrained(tmp_path / "peft")
    with pytest.warns(UserWarning, match="only the prompt encoder's output") as record:
        loaded = pf.PTuningModel.from_pretrained(tiny_llama(0), tmp_path / "peft",
                                                 is_trainable=True)
    trainable = sum(p.numel() for p in loaded.trainable_parameters().values())
    encoder = sum(p.numel() for p in ours.prompt_encoder.parameters())
    message = str(record[0].message)
    assert f"({trainable:,} trainable parameters)" in message
    assert f"({encoder:,} parameters)" in message and encoder > trainable
    ours.save_pretrained(tmp_path / "full", full_state=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pf.PTuningModel.from_pretrained(tiny_llama(0), tmp_path / "full", is_trainable=True)


def test_mismatched_tensor_shape_raises(tmp_path):
    pf.wrap(tiny_llama(0), CONFIGS["prompt"]).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({"prompt_embeddings": tensors["prompt_embeddings"][:2].contiguous()}, path)
    with pytest.raises(ValueError, match="prompt_embeddings.*shape \\(2, 32\\).*\\(3, 32\\)"):
        pf.PTuningModel.from_pretrained(tiny_llama(0), tmp_path)


def test_bert_head_mismatch_raises(tmp_path):
    ours, _ = wrapped_and_twin("bert", CONFIGS["prefix"])
    ours.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="head 'classifier' does not fit"):
        pf.PTuningModel.from_pretrained(BUILDERS["bert"](0, num_labels=5), tmp_path)


def test_head_for_another_model_raises(tmp_path):
    ours, _ = wrapped_and_twin("bert", CONFIGS["prompt"])
    ours.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"head\(s\) \['classifier'\]"):
        pf.PTuningModel.from_pretrained(LlamaForSequenceClassification(tiny_llama(0).config),
                                        tmp_path)


def test_pickled_or_foreign_checkpoints_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        pf.PTuningModel.from_pretrained(tiny_llama(0), tmp_path)
    pf.wrap(tiny_llama(0), CONFIGS["prefix"]).save_pretrained(tmp_path)
    os.rename(tmp_path / "adapter_model.safetensors", tmp_path / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle"):
        pf.PTuningModel.from_pretrained(tiny_llama(0), tmp_path)
    os.remove(tmp_path / "adapter_model.bin")
    save_file({"base_model.model.q_proj.lora_A.weight": torch.zeros(2, 2)},
              tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="no 'prompt_embeddings'"):
        pf.PTuningModel.from_pretrained(tiny_llama(0), tmp_path)
    with open(tmp_path / "adapter_config.json", "w") as f:
        json.dump({"peft_type": "LORA", "r": 8}, f)
    os.remove(tmp_path / "ptuning_fast.json")
    with pytest.raises(ValueError, match="unsupported PEFT config type 'LORA'"):
        pf.PTuningModel.from_pretrained(tiny_llama(0), tmp_path)


def _snapshot(model):
    return ([p.requires_grad for p in model.parameters()], model.config._attn_implementation,
            {k: v.clone() for k, v in model.state_dict().items()})


def _assert_unchanged(model, before):
    grads, attn, state = _snapshot(model)
    assert (grads, attn) == before[:2]
    for k, v in state.items():
        assert torch.equal(v, before[2][k]), f"base parameter {k} changed"


def _edit_weights(directory, **changes):
    """Rewrites adapter_model.safetensors with `changes` (None drops a key), keeping the save id
    so that only the edited content is judged."""
    from safetensors import safe_open
    path = directory / "adapter_model.safetensors"
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    for key, value in changes.items():
        if value is None:
            tensors.pop(key)
        else:
            tensors[key] = value
    save_file(tensors, path, metadata)


def _edit_json(path, **changes):
    content = json.loads(path.read_text())
    content.update(changes)
    path.write_text(json.dumps(content))


@pytest.mark.parametrize("key", ["base_model.model.embed_tokens.weight",
                                 "base_model.lm_head.weight"])
def test_checkpoint_cannot_overwrite_the_base_model(tmp_path, key):
    pf.wrap(tiny_llama(0), CONFIGS["prompt"]).save_pretrained(tmp_path)
    base = tiny_llama(0)
    _edit_weights(tmp_path, **{key: torch.zeros_like(base.state_dict()[key[len("base_model."):]])})
    _edit_json(tmp_path / "adapter_config.json", modules_to_save=[key.split(".")[1]])
    before = _snapshot(base)
    with pytest.raises(ValueError, match=f"weights for \\['{key.split('.')[1]}'\\].*never"):
        pf.PTuningModel.from_pretrained(base, tmp_path)
    _assert_unchanged(base, before)


def test_head_loads_only_when_modules_to_save_names_it(tmp_path):
    ours, _ = wrapped_and_twin("bert", CONFIGS["prompt"])
    ours.save_pretrained(tmp_path)
    _edit_json(tmp_path / "adapter_config.json", modules_to_save=None)
    base = BUILDERS["bert"](0)
    before = _snapshot(base)
    with pytest.raises(ValueError, match="classifier.*modules_to_save"):
        pf.PTuningModel.from_pretrained(base, tmp_path)
    _assert_unchanged(base, before)


def test_unknown_tensors_are_refused(tmp_path):
    pf.wrap(tiny_llama(0), CONFIGS["prompt"]).save_pretrained(tmp_path)
    _edit_weights(tmp_path, extra=torch.zeros(2))
    with pytest.raises(ValueError, match="neither 'prompt_embeddings' nor a head.*'extra'"):
        pf.PTuningModel.from_pretrained(tiny_llama(0), tmp_path)


@pytest.mark.parametrize("model_name, make_base", [
    ("bert", lambda: BUILDERS["bert"](0, num_labels=5)),
    ("llama", lambda: tiny_llama(0, num_hidden_layers=3)),
], ids=["head-mismatch", "layers-mismatch"])
def test_a_failed_load_leaves_the_model_as_it_was(tmp_path, model_name, make_base):
    ours, _ = wrapped_and_twin(model_name, CONFIGS["prefix"])
    ours.save_pretrained(tmp_path)
    base = make_base()
    before = _snapshot(base)
    with pytest.raises(ValueError, match="does not fit"):
        pf.PTuningModel.from_pretrained(base, tmp_path)
    _assert_unchanged(base, before)


def test_sizes_are_checked_before_any_allocation(tmp_path, monkeypatch):
    pf.wrap(tiny_llama(0), CONFIGS["prompt"]).save_pretrained(tmp_path)
    os.remove(tmp_path / "ptuning_fast.json")
    _edit_json(tmp_path / "adapter_config.json", num_virtual_tokens=10 ** 9)   # ~128 GB
    real = torch.nn.Embedding.__init__

    def guarded(self, num, dim, *args, **kwargs):
        assert num * dim < 10 ** 8, f"allocating an embedding of {num} x {dim} rows"
        real(self, num, dim, *args, **kwargs)
    monkeypatch.setattr(torch.nn.Embedding, "__init__", guarded)
    with pytest.raises(ValueError, match=r"prompt_embeddings' has shape \(3, 32\).*1000000000"):
        pf.PTuningModel.from_pretrained(tiny_llama(0), tmp_path)


def test_integer_prompt_embeddings_are_refused(tmp_path):
    pf.wrap(tiny_llama(0), CONFIGS["prompt"]).save_pretrained(tmp_path)
    _edit_weights(tmp_path, prompt_embeddings=torch.ones(3, 32, dtype=torch.int64))
    with pytest.raises(TypeError, match="'prompt_embeddings' \\(I64\\).*floating point"):
        pf.PTuningModel.from_pretrained(tiny_llama(0), tmp_path)


@pytest.mark.parametrize("content", ["[1, 2]", "{not json"])
def test_adapter_config_that_is_not_an_object(tmp_path, content):
    pf.wrap(tiny_llama(0), CONFIGS["prompt"]).save_pretrained(tmp_path)
    os.remove(tmp_path / "ptuning_fast.json")
    (tmp_path / "adapter_config.json").write_text(content)
    with pytest.raises(ValueError, match="adapter_config.json.*(JSON object|not valid JSON)"):
        pf.PTuningModel.from_pretrained(tiny_llama(0), tmp_path)


def _prompt_of(directory):
    return pf.PTuningModel.from_pretrained(tiny_llama(0), directory).prompt_encoder.raw()


def test_save_is_atomic(tmp_path, monkeypatch):
    model = pf.wrap(tiny_llama(0), CONFIGS["prompt"])
    model.save_pretrained(tmp_path)
    first = _prompt_of(tmp_path)
    with torch.no_grad():
        model.prompt_encoder.embedding.weight.add_(1.0)
    real_dump = json.dump

    def failing(content, f, **kwargs):
        if "format_version" in content:            # our config: the last file written
            raise OSError("disk full")
        real_dump(content, f, **kwargs)
    monkeypatch.setattr(json, "dump", failing)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    monkeypatch.setattr(json, "dump", real_dump)
    assert torch.equal(_prompt_of(tmp_path), first)        # the earlier save, whole
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors",
                                            "ptuning_fast.json"]    # no temporary left


def test_no_stale_files_of_an_earlier_save(tmp_path):
    model, _ = wrapped_and_twin("llama", CONFIGS["prefix_proj"])
    model.save_pretrained(tmp_path, full_state=True)
    assert (tmp_path / "ptuning_fast_state.safetensors").exists()
    (tmp_path / "README.md").write_text("mine")             # not ours: left alone
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json",
                                            "adapter_model.safetensors", "ptuning_fast.json"]


def test_a_directory_holding_another_adapter_is_refused(tmp_path):
    pf.wrap(tiny_llama(0), CONFIGS["prefix"]).save_pretrained(tmp_path)
    pf.wrap(tiny_llama(0), CONFIGS["prefix"]).save_pretrained(tmp_path)    # the same adapter
    other = pf.wrap(tiny_llama(0), CONFIGS["prompt"])
    with pytest.raises(FileExistsError, match="different adapter.*PREFIX_TUNING.*PROMPT_TUNING"):
        other.save_pretrained(tmp_path)
    assert pf.PTuningModel.from_pretrained(tiny_llama(0), tmp_path).is_prefix
    other.save_pretrained(tmp_path, overwrite=True)
    assert not pf.PTuningModel.from_pretrained(tiny_llama(0), tmp_path).is_prefix


def test_files_of_two_saves_are_refused(tmp_path):
    pf.wrap(tiny_llama(0), CONFIGS["prompt"]).save_pretrained(tmp_path / "a")
    pf.wrap(tiny_llama(1), CONFIGS["prompt"]).save_pretrained(tmp_path / "b")
    os.replace(tmp_path / "b" / "ptuning_fast.json", tmp_path / "a" / "ptuning_fast.json")
    with pytest.raises(ValueError, match="different saves"):
        pf.PTuningModel.from_pretrained(tiny_llama(0), tmp_path / "a")


def test_multi_task_save_says_peft_cannot_load_it(tmp_path):
    model = pf.wrap(tiny_llama(0), pf.PromptTuningConfig(3, num_tasks=2))
    with pytest.warns(UserWarning, match="num_tasks=2.*PEFT.*cannot load it"):
        model.save_pretrained(tmp_path)
