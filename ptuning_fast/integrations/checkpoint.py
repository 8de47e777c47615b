"""Checkpoints in PEFT's format, safetensors only (nothing is ever unpickled).

A directory holds
- adapter_config.json           PEFT's config (inference_mode true), so PEFT loads it;
- adapter_model.safetensors     "prompt_embeddings" = the encoder's output, (P, width) — or
                                (T * P, width) with T tasks — plus a classification head as
                                "base_model.<module>.<param>" (PEFT's modules_to_save keys);
- ptuning_fast.json             our config (inits, tasks, encoder) so a round trip loses nothing;
- ptuning_fast_state.safetensors (full_state=True) the prompt module's own state dict,
                                encoder included, for resuming training.
A PEFT directory has only the first two; loading it gives the exported (inference) module.
PEFT has no per-task prompts: it loads our checkpoints of one task (num_tasks=1) only.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch

from ..config import ModelDims, from_dict, from_peft_config, to_dict, to_peft_dict

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OUR_CONFIG = "ptuning_fast.json"
FULL_STATE = "ptuning_fast_state.safetensors"
FORMAT_VERSION = 1
_PICKLED = ("adapter_model.bin", "pytorch_model.bin")


def _name_or_path(model) -> str | None:
    return getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)


def save(model, directory, *, full_state: bool = False) -> None:
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    config, module = model.ptuning_config, model.prompt_encoder
    peft_config = to_peft_dict(
        config, model.dims, task_type=model.task_type,
        modules_to_save=model.modules_to_save or None,
        base_model_name_or_path=_name_or_path(model.base_model),
        encoder_hidden_size=getattr(module, "encoder_hidden_size", None))
    with torch.no_grad():
        was_training = module.training
        module.eval()                                  # no prefix dropout in the saved output
        tensors = {"prompt_embeddings": module.output_for_checkpoint().detach()}
        module.train(was_training)
    for name in model.modules_to_save:
        for key, value in model.base_model.get_submodule(name).state_dict().items():
            tensors[f"base_model.{name}.{key}"] = value.detach()
    save_file(_contiguous_cpu(tensors), os.path.join(directory, ADAPTER_WEIGHTS))
    ours = {"format_version": FORMAT_VERSION, "config": to_dict(config),
            "dims": dataclasses.asdict(model.dims), "full_state": full_state,
            "exported": module.exported}
    if full_state:
        save_file(_contiguous_cpu(module.state_dict()), os.path.join(directory, FULL_STATE))
    for name, content in ((ADAPTER_CONFIG, peft_config), (OUR_CONFIG, ours)):
        with open(os.path.join(directory, name), "w") as f:
            json.dump(content, f, indent=2, sort_keys=True)


def _contiguous_cpu(tensors: dict) -> dict:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _check_fits(adapter: dict, config, dims) -> None:
    """A PEFT config's recorded sizes against the model: one error listing every mismatch."""
    is_prefix = config.method == "prefix_tuning"
    expected = {"num_layers": dims.num_layers,
                "token_dim": dims.prefix_token_dim if is_prefix else dims.hidden_size}
    if is_prefix:
        expected["num_attention_heads"] = dims.num_kv_heads if dims.uses_kv_heads \
            else dims.num_heads
    wrong = [f"{k}={adapter[k]} (model has {v})" for k, v in expected.items()
             if adapter.get(k) is not None and adapter[k] != v and (is_prefix or k == "token_dim")]
    if wrong:
        raise ValueError(f"checkpoint does not fit this model: {', '.join(wrong)}; "
                         f"model sizes: {dims}")


def load(cls, base_model, directory, *, backend: str = "auto", is_trainable: bool = False,
         **kwargs):
    from safetensors.torch import load_file
    directory = os.fspath(directory)
    config_path = os.path.join(directory, ADAPTER_CONFIG)
    weights_path = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{directory!r} has no {ADAPTER_CONFIG}: not a PEFT/ptuning_fast "
                                "checkpoint directory")
    if not os.path.isfile(weights_path):
        pickled = [n for n in _PICKLED if os.path.isfile(os.path.join(directory, n))]
        hint = (f" It has {pickled[0]}, a pickle, which ptuning_fast never loads: re-save it "
                "with safetensors (PEFT: save_pretrained(..., safe_serialization=True)).") \
            if pickled else ""
        raise FileNotFoundError(f"{directory!r} has no {ADAPTER_WEIGHTS}.{hint}")
    adapter = _read_json(config_path)
    ours_path = os.path.join(directory, OUR_CONFIG)
    ours = _read_json(ours_path) if os.path.isfile(ours_path) else None
    if ours is not None and ours.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{OUR_CONFIG} has format_version {ours.get('format_version')!r}; this "
                         f"ptuning_fast reads version {FORMAT_VERSION}")
    config = from_dict(ours["config"]) if ours is not None \
        else from_peft_config(adapter, for_loading=True)
    tensors = load_file(weights_path)
    if "prompt_embeddings" not in tensors:
        raise ValueError(f"{weights_path} has no 'prompt_embeddings' tensor (keys: "
                         f"{sorted(tensors)}): not a prompt-learning checkpoint")
    heads = sorted({k.split(".")[1] for k in tensors if k.startswith("base_model.")})
    if config.method == "prompt_tuning" and config.init in ("text", "labels", "sample_vocab"):
        # The checkpoint holds the trained prompt: skip re-initializing from the vocabulary.
        config = dataclasses.replace(config, init="random", init_text=None)
    _check_fits(adapter, config, ModelDims.from_model_config(base_model.config))
    children = dict(base_model.named_children())
    missing = [h for h in heads if h not in children]
    if missing:
        raise ValueError(f"checkpoint has weights for head(s) {missing} that "
                         f"{type(base_model).__name__} does not have (its modules: "
                         f"{sorted(children)})")
    model = cls(base_model, config, backend, modules_to_save=heads, **kwargs)
    device = model.prompt_encoder.embedding.weight.device
    full_path = os.path.join(directory, FULL_STATE)
    module = model.prompt_encoder
    if ours is not None and ours.get("full_state"):
        if not os.path.isfile(full_path):
            raise FileNotFoundError(f"{ours_path} records a full-state checkpoint but "
                                    f"{FULL_STATE} is missing from {directory!r}")
        state = load_file(full_path, device=str(device))
        if ours.get("exported"):
            module.export()
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{full_path} does not fit this model's prompt module "
                             f"({model.dims}): {err}") from None
    else:
        emb = tensors["prompt_embeddings"]
        want = (config.num_tasks * config.num_virtual_tokens,
                module.output_for_checkpoint().shape[-1])
        if tuple(emb.shape) != want:
            raise ValueError(
                f"checkpoint 'prompt_embeddings' has shape {tuple(emb.shape)}; this model needs "
                f"{want} ({config.method}, num_virtual_tokens={config.num_virtual_tokens}, "
                f"num_tasks={config.num_tasks}, {model.dims})")
        module.load_checkpoint_output(emb.to(device=device, dtype=module.embedding.weight.dtype))
    for name in heads:
        prefix = f"base_model.{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        target = base_model.get_submodule(name)
        try:
            target.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"checkpoint head {name!r} does not fit the model: {err}") from None
    if not is_trainable:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    return model
