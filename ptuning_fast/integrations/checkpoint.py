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
PEFT's CARTRIDGE adapters (a KV prefix stored in prefix tuning's layout) load as prefix tuning
without projection; those with frozen leading tokens for inference only. Saved again, they are
written as PREFIX_TUNING (the same function).

Loading reads the tensors' names, shapes and dtypes first and checks them, the configs and the
heads against the model before it allocates anything or touches the model: only the heads that
the adapter config's `modules_to_save` names and the model's task type allows are loaded.
Saving writes every file into a temporary folder inside the target and renames each into place;
one id (`save_id`, also in the safetensors metadata) ties the files of one save together, so a
directory mixing two saves is refused on loading instead of loaded half old, half new.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import uuid
import warnings

import torch

from ..config import (ModelDims, from_dict, from_peft_config, frozen_tokens_of, to_dict,
                      to_peft_dict)
from . import sharded
from .model import HEADS_BY_TASK, build_prompt_module, check_wrappable
from .peft_surface import BaseModelState
from .support import task_type_of

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OUR_CONFIG = "ptuning_fast.json"
FULL_STATE = "ptuning_fast_state.safetensors"
FORMAT_VERSION = 1
_PICKLED = ("adapter_model.bin", "pytorch_model.bin")
SAVE_ID = "ptuning_fast_save_id"            # safetensors metadata key
# The fields of adapter_config.json that say which adapter a directory holds.
_IDENTITY = ("peft_type", "task_type", "base_model_name_or_path", "num_virtual_tokens",
             "token_dim", "num_layers", "num_attention_heads")
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _name_or_path(model) -> str | None:
    return getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)


# -------------------------------------------------------------------------------------------
# Saving

def save(model, directory, *, full_state: bool = False, overwrite: bool = False,
         is_main_process: bool | None = None) -> None:
    """Writes the adapter into `directory` (created if needed). A directory holding a different
    adapter (another method, base model or size) is refused unless `overwrite`; files of an
    earlier save that this one does not write are removed; other files are left alone.
    Only the main process writes (default: rank 0 under torch.distributed). Parameters sharded
    by FSDP2 are gathered first, a collective: then every rank must call it."""
    from safetensors.torch import save_file
    # Gathered before any check that only the main process makes: a rank that raised here
    # would leave the others waiting in the all-gather.
    tensors, module_state = _whole_tensors(model, full_state)
    if not (sharded.is_main_process() if is_main_process is None else is_main_process):
        return
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"save_pretrained: {directory!r} exists and is not a directory")
    config, module = model.ptuning_config, model.prompt_encoder
    peft_config = to_peft_dict(
        config, model.dims, task_type=model.task_type,
        modules_to_save=model.modules_to_save or None,
        base_model_name_or_path=_name_or_path(model.base_model),
        encoder_hidden_size=getattr(module, "encoder_hidden_size", None))
    if config.num_tasks > 1:
        warnings.warn(
            f"saving a num_tasks={config.num_tasks} adapter: {ADAPTER_WEIGHTS} holds every "
            f"task's prompt ({config.num_tasks} x {config.num_virtual_tokens} rows) and PEFT, "
            "which has no per-task prompts, cannot load it; load it with "
            "ptuning_fast.PTuningModel.from_pretrained", stacklevel=3)
    if config.method == "prefix_tuning" and config.per_layer_shapes \
            and model.dims.layer_kv_shapes is not None:
        warnings.warn(
            f"saving prefixes of each layer's own shape {model.dims.layer_kv_shapes}: PEFT, "
            "which sizes one prefix for all layers, cannot load them; load them with "
            "ptuning_fast.PTuningModel.from_pretrained", stacklevel=3)
    if not overwrite:
        _refuse_other_adapter(directory, peft_config, config.num_tasks)
    save_id = uuid.uuid4().hex
    ours = {"format_version": FORMAT_VERSION, "config": to_dict(config),
            "dims": dataclasses.asdict(model.dims), "full_state": full_state,
            "exported": module.exported, "save_id": save_id}
    os.makedirs(directory, exist_ok=True)
    # Inside the target: same file system, so each rename below is atomic.
    staging = tempfile.mkdtemp(prefix=".ptuning_fast-saving-", dir=directory)
    try:
        metadata = {"format": "pt", SAVE_ID: save_id}
        written = [ADAPTER_WEIGHTS, OUR_CONFIG, ADAPTER_CONFIG]    # the configs last
        save_file(_contiguous_cpu(tensors), os.path.join(staging, ADAPTER_WEIGHTS), metadata)
        if full_state:
            save_file(_contiguous_cpu(module_state), os.path.join(staging, FULL_STATE),
                      metadata)
            written.insert(0, FULL_STATE)
        for name, content in ((ADAPTER_CONFIG, peft_config), (OUR_CONFIG, ours)):
            with open(os.path.join(staging, name), "w") as f:
                json.dump(content, f, indent=2, sort_keys=True)
        for name in written:
            os.replace(os.path.join(staging, name), os.path.join(directory, name))
        for stale in ({FULL_STATE, *_PICKLED} - set(written)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, stale))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _refuse_other_adapter(directory: str, peft_config: dict, num_tasks: int) -> None:
    path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        return
    try:
        existing = _read_json(path)
        ours_path = os.path.join(directory, OUR_CONFIG)
        existing_tasks = _read_json(ours_path).get("config", {}).get("num_tasks", 1) \
            if os.path.isfile(ours_path) else 1
    except ValueError as err:
        raise FileExistsError(f"save_pretrained: {directory!r} holds an unreadable adapter "
                              f"({err}); save elsewhere or pass overwrite=True") from None
    diffs = [f"{k}: {existing.get(k)!r} there, {peft_config.get(k)!r} now" for k in _IDENTITY
             if existing.get(k) != peft_config.get(k)]
    if existing_tasks != num_tasks:
        diffs.append(f"num_tasks: {existing_tasks!r} there, {num_tasks!r} now")
    if diffs:
        raise FileExistsError(f"save_pretrained: {directory!r} holds a different adapter "
                              f"({'; '.join(diffs)}); save elsewhere or pass overwrite=True")


def _whole_tensors(model, full_state: bool) -> tuple[dict, dict | None]:
    """(the adapter file's tensors, the prompt module's state dict if `full_state`), whole even
    where FSDP2 sharded the parameters."""
    module = model.prompt_encoder
    was_training = module.training
    module.eval()                                      # no prefix dropout in the saved output
    try:
        tensors = {"prompt_embeddings": sharded.checkpoint_output(module).detach()}
    finally:
        module.train(was_training)
    for name in model.modules_to_save:
        head = sharded.whole_state_dict(model.base_model.get_submodule(name))
        tensors.update({f"base_model.{name}.{key}": value for key, value in head.items()})
    return tensors, sharded.whole_state_dict(module) if full_state else None


def _contiguous_cpu(tensors: dict) -> dict:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


# -------------------------------------------------------------------------------------------
# Loading: check everything, then build and fill the model

def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            content = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path} must hold a JSON object (a config), got a JSON "
                         f"{type(content).__name__}")
    return content


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
    submodules = adapter.get("num_transformer_submodules")
    if submodules is not None and submodules != dims.num_transformer_submodules:
        wrong.append(f"num_transformer_submodules={submodules} (model has "
                     f"{dims.num_transformer_submodules})")
    if wrong:
        trained_for = adapter.get("base_model_name_or_path")
        raise ValueError(
            "this adapter was trained for a different base model"
            f"{f' ({trained_for!r})' if trained_for else ''}: its checkpoint does not fit this one "
            f"({', '.join(wrong)}); this model's sizes: {dims}")


def _prompt_shape(config, dims: ModelDims) -> tuple[int, int]:
    """Shape of "prompt_embeddings" (the encoder's output) for `config` on a model of `dims`:
    P rows per task (S * P for prompts on encoder-decoders, PEFT's layout)."""
    if config.method == "prefix_tuning":
        return config.num_tasks * config.num_virtual_tokens, \
            dims.prefix_width(config.per_layer_shapes)
    rows = config.num_virtual_tokens * dims.num_transformer_submodules
    return config.num_tasks * rows, dims.hidden_size


class _Listing:
    """Names, shapes and dtypes of a safetensors file, read from its header (no tensor data)."""

    def __init__(self, path: str):
        from safetensors import safe_open
        self.path = path
        try:
            with safe_open(path, framework="pt") as f:
                self.metadata = f.metadata() or {}
                self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                self.dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        except Exception as err:  # noqa: BLE001 — safetensors raises its own error types
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from None

    def load(self, keys, device) -> dict[str, torch.Tensor]:
        from safetensors import safe_open
        with safe_open(self.path, framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in keys}


def _check_float(listing: _Listing, keys) -> None:
    bad = [f"{k!r} ({listing.dtypes[k]})" for k in keys if listing.dtypes[k] not in _FLOAT_DTYPES]
    if bad:
        raise TypeError(f"{listing.path}: tensors {', '.join(bad)} must be floating point "
                        f"({'/'.join(_FLOAT_DTYPES)})")


def _check_shapes(what: str, where: str, got: dict, want: dict) -> None:
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = [f"{k}: {got[k]} (expected {want[k]})" for k in sorted(set(got) & set(want))
             if tuple(got[k]) != tuple(want[k])]
    if missing or unexpected or wrong:
        parts = ([f"missing {missing}"] if missing else []) + \
            ([f"unexpected {unexpected}"] if unexpected else []) + \
            ([f"wrong shapes {'; '.join(wrong)}"] if wrong else [])
        raise ValueError(f"{what} does not fit: {', '.join(parts)} (in {where})")


def _checked_heads(listing: _Listing, adapter: dict, base_model, task_type: str) -> list[str]:
    """The heads to load: named by a "base_model.<head>." key, by the adapter config's
    modules_to_save and allowed for the task type; their tensors must match the module's."""
    heads = sorted({k.split(".")[1] for k in listing.shapes if k.startswith("base_model.")})
    others = sorted(k for k in listing.shapes
                    if k != "prompt_embeddings" and not k.startswith("base_model."))
    if others:
        raise ValueError(f"{listing.path} has tensors that are neither 'prompt_embeddings' nor a "
                         f"head (base_model.<head>.*): {others}")
    named = adapter.get("modules_to_save") or []
    if not isinstance(named, list) or not all(isinstance(n, str) for n in named):
        raise ValueError(f"{ADAPTER_CONFIG}: `modules_to_save` must be a list of module names "
                         f"or null, got {named!r}")
    allowed = HEADS_BY_TASK.get(task_type, ())
    refused = [h for h in heads if h not in named or h not in allowed]
    if refused:
        raise ValueError(
            f"{listing.path} has weights for {refused}, which this checkpoint may not load: a "
            f"head must be named in the adapter config's modules_to_save ({named}) and be one "
            f"that a {task_type} model trains ({list(allowed)}); the base model "
            f"{type(base_model).__name__} is never overwritten")
    children = dict(base_model.named_children())
    missing = [h for h in heads if h not in children]
    if missing:
        raise ValueError(f"checkpoint has weights for head(s) {missing} that "
                         f"{type(base_model).__name__} does not have (its modules: "
                         f"{sorted(children)})")
    for head in heads:
        prefix = f"base_model.{head}."
        got = {k[len(prefix):]: s for k, s in listing.shapes.items() if k.startswith(prefix)}
        want = {k: tuple(v.shape) for k, v in children[head].state_dict().items()}
        _check_shapes(f"checkpoint head {head!r}", listing.path, got, want)
    _check_float(listing, [k for k in listing.shapes if k.startswith("base_model.")])
    return heads


def _expected_full_state(config, dims, ours: dict) -> dict:
    """Shapes of the prompt module's state dict, from a module built on the meta device (no
    memory: the sizes come from the config, which the file must agree with)."""
    if ours.get("exported"):
        return {"embedding.weight": _prompt_shape(config, dims)}
    with torch.device("meta"):
        module = build_prompt_module(config, dims)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def load(cls, base_model, directory, *, backend: str = "auto", is_trainable: bool = False,
         **kwargs):
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
    check_wrappable(base_model)
    adapter = _read_json(config_path)
    ours_path = os.path.join(directory, OUR_CONFIG)
    ours = _read_json(ours_path) if os.path.isfile(ours_path) else None
    if ours is not None and ours.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{OUR_CONFIG} has format_version {ours.get('format_version')!r}; this "
                         f"ptuning_fast reads version {FORMAT_VERSION}")
    listing = _Listing(weights_path)
    _check_same_save(ours, listing, ours_path)
    config = _loading_config(_config_from(ours, adapter, ours_path, config_path))
    frozen = frozen_tokens_of(adapter)
    if frozen and is_trainable:
        raise NotImplementedError(
            f"{config_path}: a CARTRIDGE with num_frozen_tokens={frozen} loads for inference "
            "only (is_trainable=False); training it would move its frozen tokens")
    dims = ModelDims.from_model_config(base_model.config)
    _check_fits(adapter, config, dims)
    if "prompt_embeddings" not in listing.shapes:
        raise ValueError(f"{weights_path} has no 'prompt_embeddings' tensor (keys: "
                         f"{sorted(listing.shapes)}): not a prompt-learning checkpoint")
    _check_float(listing, ["prompt_embeddings"])
    want = _prompt_shape(config, dims)
    if listing.shapes["prompt_embeddings"] != want:
        raise ValueError(
            f"checkpoint 'prompt_embeddings' has shape {listing.shapes['prompt_embeddings']}; "
            f"this model needs {want} ({config.method}, num_virtual_tokens="
            f"{config.num_virtual_tokens}, num_tasks={config.num_tasks}, {dims})")
    heads = _checked_heads(listing, adapter, base_model, task_type_of(base_model))
    full = None
    if ours is not None and ours.get("full_state"):
        full_path = os.path.join(directory, FULL_STATE)
        if not os.path.isfile(full_path):
            raise FileNotFoundError(f"{ours_path} records a full-state checkpoint but "
                                    f"{FULL_STATE} is missing from {directory!r}")
        full = _Listing(full_path)
        if full.metadata.get(SAVE_ID) != ours.get("save_id"):
            raise ValueError(f"{full_path} comes from another save than {ours_path}; save again")
        _check_float(full, full.shapes)
        _check_shapes(f"the prompt module's state ({config.method}, {dims})", full_path,
                      full.shapes, _expected_full_state(config, dims, ours))

    # Everything fits: from here on the model is built and filled.
    before = BaseModelState(base_model)
    try:
        model = cls(base_model, config, backend, modules_to_save=heads, **kwargs)
        _fill(model, listing, full, ours, heads)
    except BaseException:
        before.restore()
        raise
    if not is_trainable:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    elif full is None:
        _warn_encoder_lost(model, config, dims, weights_path)
    return model


def _warn_encoder_lost(model, config, dims, weights_path: str) -> None:
    """PEFT saves a P-Tuning (or projected prefix) adapter as its encoder's output only. Trained
    further, that is another parameterisation than the one PEFT trains, so losses part from the
    first step: say so, with both parameter counts."""
    with torch.device("meta"):
        fresh = build_prompt_module(config, dims)
    if not fresh._encoder_modules():
        return
    with_encoder = sum(p.numel() for p in fresh.parameters())
    loaded = sum(p.numel() for p in model.prompt_encoder.parameters() if p.requires_grad)
    warnings.warn(
        f"{weights_path} holds only the prompt encoder's output, not the encoder: training "
        f"goes on from those vectors directly ({loaded:,} trainable parameters), not through "
        f"the {config.method} encoder ({with_encoder:,} parameters), so it is not the "
        "training PEFT's is_trainable=True does and the losses differ from the first step. "
        "To resume through the encoder, load a directory saved by ptuning_fast with "
        "save_pretrained(..., full_state=True), which keeps the encoder's weights.",
        UserWarning, stacklevel=4)


def _check_same_save(ours, listing: _Listing, ours_path: str) -> None:
    """Our files of two different saves (an interrupted save) are refused; weights written by
    another tool after ours (PEFT saving into the directory, a user's edit) keep our config,
    with a warning, and must still pass every check."""
    ours_id, weights_id = (ours or {}).get("save_id"), listing.metadata.get(SAVE_ID)
    if ours_id is None:
        return
    if weights_id is not None and weights_id != ours_id:
        raise ValueError(
            f"{ours_path} and {listing.path} come from different saves (an interrupted save?); "
            "save the adapter again")
    if weights_id is None:
        warnings.warn(f"{listing.path} was written by another tool after ptuning_fast saved "
                      f"{ours_path}; loading it with {os.path.basename(ours_path)}'s config",
                      stacklevel=4)


def _loading_config(config):
    """The weights come from the checkpoint and the loader decides what trains: no
    initialization from the vocabulary or to zero, no inference-mode flag, and only the heads
    the checkpoint holds."""
    changes = {"inference_mode": False, "modules_to_save": None}
    if config.method == "prompt_tuning":
        changes.update(prompt_tuning_init="RANDOM", prompt_tuning_init_text=None,
                       tokenizer_kwargs=None)
    elif config.method == "prefix_tuning":
        changes.update(init_weights=None)
    return dataclasses.replace(config, **changes)


def _config_from(ours, adapter, ours_path: str, config_path: str):
    try:
        return from_dict(ours["config"]) if ours is not None \
            else from_peft_config(adapter, for_loading=True)
    except (TypeError, ValueError, KeyError) as err:
        where = ours_path if ours is not None else config_path
        raise ValueError(f"{where}: {type(err).__name__}: {err}") from None


def _fill(model, listing: _Listing, full, ours, heads) -> None:
    module = model.prompt_encoder
    device = module.embedding.weight.device
    with torch.no_grad():
        if full is not None:
            if ours.get("exported"):
                module.export()
            module.load_state_dict(full.load(full.shapes, device), strict=True)
        else:
            emb = listing.load(["prompt_embeddings"], device)["prompt_embeddings"]
            module.load_checkpoint_output(emb.to(dtype=module.embedding.weight.dtype))
        for name in heads:
            prefix = f"base_model.{name}."
            keys = [k for k in listing.shapes if k.startswith(prefix)]
            target = model.base_model.get_submodule(name)
            tensors = listing.load(keys, next(iter(target.state_dict().values())).device)
            target.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()}, strict=True)
