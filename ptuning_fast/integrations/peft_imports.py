"""PEFT's import surface: the names a PEFT prompt-learning script imports from `peft`, so that
changing `from peft import ...` to `from ptuning_fast import ...` is the only edit it needs.

`get_peft_model` wraps as `wrap` does; `PeftModel` is `PTuningModel` (its `from_pretrained`
loads PEFT's and our checkpoints); the configs, `TaskType` and `PromptTuningInit` are
`ptuning_fast.config`'s (`PromptEncoderConfig` is P-Tuning's, `PTuningConfig`).
"""
from __future__ import annotations

from ..config import PTuningConfig
from .model import PTuningModel, wrap

PeftModel = PTuningModel
PromptEncoderConfig = PTuningConfig

# PEFT's one adapter per model is named "default"; a wrapped model holds one prompt module.
_ADAPTER = "default"


def get_peft_model(model, peft_config, adapter_name: str = _ADAPTER, mixed: bool = False,
                   **kwargs) -> PTuningModel:
    """PEFT's `get_peft_model` for prompt learning: `wrap(model, peft_config, **kwargs)`
    (`peft_config` ours or PEFT's; `kwargs` are `wrap`'s: backend, tokenizer, ...)."""
    if adapter_name != _ADAPTER:
        raise ValueError(f"`adapter_name` must be {_ADAPTER!r} (ptuning_fast wraps a model with "
                         f"one prompt module; num_tasks=T gives T prompts), got {adapter_name!r}")
    if mixed:
        raise ValueError("`mixed=True` (PEFT's mixed adapter types) is not supported: "
                         "ptuning_fast wraps a model with one prompt-learning method")
    return wrap(model, peft_config, **kwargs)
