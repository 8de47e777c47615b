"""ptuning_fast: Triton kernels for soft-prompt fine-tuning on frozen transformers models."""
from . import reference
from .ops import prefix_attention, prompt_embedding

__version__ = "0.1.0"

__all__ = ["reference", "prefix_attention", "prompt_embedding", "__version__"]
