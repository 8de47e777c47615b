"""transformers drop-in: attention/mask registration, the model wrapper, PEFT-format checkpoints."""
from .kv_prefix import initialize_kv_prefix_from_past_key_values, initialize_kv_prefix_from_text
from .model import PTuningModel, wrap

__all__ = ["PTuningModel", "wrap", "initialize_kv_prefix_from_text",
           "initialize_kv_prefix_from_past_key_values"]
