"""`AttentionSpec`: one prefix-attention call's options, built and validated once by
`ptuning_fast.ops` and handed unchanged to the backend that runs it (the reference, the torch
path, or the custom op in front of the Triton launchers).

Plain data, no Triton: importing this module decorates no kernel. The custom op
`ptuning_fast::prefix_attention` takes no dataclass and no tuple of optional tensors, so each
field declares its flat schema parameters (`schema`); `SCHEMA` is generated from them and
`flat` / `from_flat` convert. Tensors (mask, index, seed, bias, sinks, segments) stay tensor
arguments of the op, so autograd, fake tensors and opcheck see them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


def _option(default, *schema: str):
    """A spec field with its custom-op parameters ("type name", in order): one per value, or
    one per element for a pair."""
    return field(default=default, metadata={"schema": schema})


@dataclass(frozen=True, eq=False)
class AttentionSpec:
    """Options of `ptuning_fast.prefix_attention` (meanings there). Field order is the custom
    op's parameter order after q, k, v, prefix_k, prefix_v."""
    attention_mask: torch.Tensor | None = _option(None, "Tensor? attention_mask")   # (B, Lk)
    prefix_index: torch.Tensor | None = _option(None, "Tensor? prefix_index")       # (B,)
    causal: bool = _option(True, "bool causal")
    scale: float | None = _option(None, "float? scale")           # None: D ** -0.5
    dropout_p: float = _option(0.0, "float dropout_p")
    # 0-d int64 on q's device when dropout_p > 0 (drawn on the device: no host sync).
    dropout_seed: torch.Tensor | None = _option(None, "Tensor? dropout_seed")
    bias: torch.Tensor | None = _option(None, "Tensor? bias")     # broadcast (B, Hq, Lq, P + Lk)
    sinks: torch.Tensor | None = _option(None, "Tensor? sinks")   # (Hq,)
    # Packed sequences: `ptuning_fast.packing.packed_segments`' (start, end), int32 (B, L).
    segments: tuple | None = _option(None, "Tensor? seg_start", "Tensor? seg_end")
    window_size: tuple[int, int] = _option((-1, -1), "int window_left", "int window_right")
    prefix_in_window: bool = _option(True, "bool prefix_in_window")
    softcap: float = _option(0.0, "float softcap")

    @property
    def has_window(self) -> bool:
        """A side of `window_size` is bounded (>= 0); (-1, -1) is full attention."""
        return self.window_size[0] >= 0 or self.window_size[1] >= 0

    def terms_in_use(self) -> dict:
        """The attention terms this spec turns on, field -> value (empty: plain attention with
        padding mask, prefix index, causality and scale). `prefix_in_window` counts only
        through the window it qualifies."""
        on = dict(bias=self.bias is not None, sinks=self.sinks is not None,
                  segments=self.segments is not None, window_size=self.has_window,
                  softcap=self.softcap > 0)
        return {name: getattr(self, name) for name, used in on.items() if used}

    def options(self) -> dict:
        """Field name -> value, what the backends' `not_supported_reasons` read."""
        return {name: getattr(self, name) for name in ATTENTION_OPTIONS}

    def flat(self) -> tuple:
        """The custom op's arguments for this spec, in `SCHEMA` order."""
        values = []
        for f in fields(self):
            value = getattr(self, f.name)
            if len(f.metadata["schema"]) == 1:
                values.append(value)
            else:
                values.extend((None,) * len(f.metadata["schema"]) if value is None else value)
        return tuple(values)

    @classmethod
    def from_flat(cls, values) -> "AttentionSpec":
        """Inverse of `flat`: a pair whose parts are all None is None (absent segments).
        Missing trailing values take their defaults (the dispatcher leaves out trailing
        arguments equal to their schema defaults)."""
        values, kwargs = list(values), {}
        values += [_flat_default(p) for p in FLAT_PARAMS[len(values):]]
        for f in fields(cls):
            n = len(f.metadata["schema"])
            part, values = values[:n], values[n:]
            if n == 1:
                kwargs[f.name] = part[0]
            else:
                kwargs[f.name] = None if all(p is None for p in part) else tuple(part)
        return cls(**kwargs)


def _flat_defaults() -> dict:
    """Flat parameter ("type name") -> its default: the field's, element-wise for a pair."""
    defaults = {}
    for f in fields(AttentionSpec):
        names = f.metadata["schema"]
        values = (f.default,) if len(names) == 1 else (
            (None,) * len(names) if f.default is None else f.default)
        defaults.update(zip(names, values))
    return defaults


def _flat_default(param: str):
    return _FLAT_DEFAULTS[param]


# The one list of prefix attention's options: a backend refuses any other option in use. Every
# backend computes all of them today; one that cannot compute a field added here must leave
# it out of the list its not_supported_reasons checks, so that it refuses it, never drops it.
ATTENTION_OPTIONS = tuple(f.name for f in fields(AttentionSpec))
_FLAT_DEFAULTS = _flat_defaults()
# Every flat parameter ("type name"), in order.
FLAT_PARAMS = tuple(_FLAT_DEFAULTS)
# The spec's part of the custom ops' schemas, e.g. "Tensor? attention_mask=None, ...".
SCHEMA = ", ".join(f"{p}={'None' if d is None else repr(d)}" for p, d in _FLAT_DEFAULTS.items())
