"""What wrapping checks and builds before it touches the caller's model: the wrappable-model
check, the heads a task trains (and a checkpoint may hold) and the prompt module of a config.
Shared by the wrapper (`model.py`) and the checkpoint loader (`checkpoint.py`), which checks a
directory against them before building the wrapper.
"""
from __future__ import annotations

from torch import nn

from ..config import ModelDims
from ..prompts import PrefixEncoder, PromptEmbedding, PromptEncoder

_HEAD_NAMES = ("classifier", "score")   # PEFT's default modules_to_save for classification


# The heads a task type may train and a checkpoint may hold (PEFT's modules_to_save defaults):
# never the transformer itself, its embeddings or a causal LM's output projection.
HEADS_BY_TASK = {"SEQ_CLS": _HEAD_NAMES, "TOKEN_CLS": _HEAD_NAMES, "QUESTION_ANS": ("qa_outputs",)}


def heads_to_train(config, given, base_model, task_type: str) -> list[str]:
    """`given` (wrap's modules_to_save) or the task's default heads, plus the config's
    `modules_to_save` as PEFT adds them; PEFT's default names ("classifier", "score") that the
    model lacks are skipped, as PEFT skips them."""
    children = [n for n, _ in base_model.named_children()]
    names = list(given) if given is not None \
        else [n for n in children if n in HEADS_BY_TASK.get(task_type, ())]
    return names + [n for n in (config.modules_to_save or []) if n not in names
                    and (n in children or n not in _HEAD_NAMES)]


def check_wrappable(base_model, wrapper_type: type) -> None:
    """What `wrapper_type` (PTuningModel) refuses before touching anything: a model that is
    already wrapped, and objects that are not transformers models."""
    if isinstance(base_model, wrapper_type):
        raise TypeError(
            "wrap() got a PTuningModel: wrapping a wrapped model would silently drop the outer "
            "prompt/prefix. Wrap the base model once (model.base_model is the unwrapped one)")
    if any(c.__name__ == "PeftModel" for c in type(base_model).__mro__):
        raise TypeError(f"wrap() got a PEFT model ({type(base_model).__name__}); expected a "
                        "plain transformers model (PeftModel.get_base_model() gives it)")
    if not isinstance(base_model, nn.Module) or not hasattr(base_model, "config"):
        raise TypeError(f"wrap() expects a transformers model (an nn.Module with a `config`), "
                        f"got {type(base_model).__name__}")


def build_prompt_module(config, dims: ModelDims, word_embeddings=None, tokenizer=None):
    if config.method == "prefix_tuning":
        return PrefixEncoder.from_config(config, dims)
    if config.method == "p_tuning":
        return PromptEncoder.from_config(config, dims)
    return PromptEmbedding.from_config(config, dims, word_embeddings, tokenizer)
