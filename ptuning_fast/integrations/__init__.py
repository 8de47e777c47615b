"""transformers drop-in: attention/mask registration, the model wrapper, PEFT-format checkpoints."""
from .model import PTuningModel, wrap

__all__ = ["PTuningModel", "wrap"]
