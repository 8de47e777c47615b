"""The wrapper's modes, one picked per wrapped model at wrap time (PEFT picks a tuner class
per config in the same way): each owns its forward, its generate() and the KV caches it
accepts."""
from .choice import pick_mode

__all__ = ["pick_mode"]
