"""`pick_mode`: the mode of a wrapped model, decided once at wrap time."""
from __future__ import annotations

from ..seq2seq import prefix_layers
from ..shared_prompt import has_dropout
from ..support import prefix_in_cache, supports_shared_prompt
from .base import Mode
from .concatenation import ConcatenationMode
from .prefix_attention import PrefixAttentionMode
from .prefix_in_cache import PrefixInCacheMode
from .seq2seq import Seq2SeqMode
from .shared_prompt import SharedPromptMode


def pick_mode(base_model, method: str, task_type: str, num_layers: int,
              shared_prompt: bool | str) -> Mode:
    """The mode of `method` on `base_model` (touches nothing; raises where the model's layout
    is refused). `shared_prompt`: the wrapper's argument (True, False or "auto")."""
    if task_type == "SEQ_2_SEQ_LM":
        return Seq2SeqMode(prefix_layers(base_model, num_layers)
                           if method == "prefix_tuning" else None)
    if method == "prefix_tuning":
        return PrefixInCacheMode() if prefix_in_cache(base_model) else PrefixAttentionMode()
    if shared_prompt is not False and supports_shared_prompt(base_model, task_type):
        return SharedPromptMode(generate_on_cpu=shared_prompt is True,
                                base_has_dropout=has_dropout(base_model))
    return ConcatenationMode()
