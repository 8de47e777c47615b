"""ptuning_fast: Triton kernels for soft-prompt fine-tuning on frozen transformers models."""
from . import reference
from .config import (PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, PTuningConfig,
                     TaskType)
from .integrations import (PTuningModel, initialize_kv_prefix_from_past_key_values,
                           initialize_kv_prefix_from_text, wrap)
from .integrations.peft_imports import PeftModel, PromptEncoderConfig, get_peft_model
from .ops import prefix_attention, prompt_embedding
from .prompts import PrefixEncoder, PromptEmbedding, PromptEncoder

__version__ = "0.1.0"

__all__ = ["reference", "prefix_attention", "prompt_embedding", "__version__",
           "PromptEmbedding", "PromptEncoder", "PrefixEncoder",
           "PromptTuningConfig", "PTuningConfig", "PrefixTuningConfig", "wrap", "PTuningModel",
           "initialize_kv_prefix_from_text", "initialize_kv_prefix_from_past_key_values",
           # PEFT's import surface (integrations/peft_imports.py)
           "get_peft_model", "PeftModel", "PromptEncoderConfig", "TaskType", "PromptTuningInit"]
