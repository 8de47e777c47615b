"""PEFT-format checkpoints: PEFT loads ours, we load PEFT's, full-state round trips, and clear
errors for checkpoints that do not fit."""
import json
import os

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
    "prefix_proj": pf.PrefixTuningConfig(3, projection=True, encoder_hidden_size=16),
    "prompt": pf.PromptTuningConfig(3),
    "ptuning_lstm": pf.PTuningConfig(3, encoder="lstm", encoder_hidden_size=8),
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
    cfg = pf.PromptTuningConfig(3, init="text", init_text=[5, 6], num_tasks=2)
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
