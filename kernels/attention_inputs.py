"""An attention launch's inputs as every attention kernel reads them, prepared once in Python.

The forward, decode and backward launchers take the same q, k, v, prefixes, padding mask and
per-task index and hand the kernels the same pointers and strides: last dims contiguous (d
offsets need no stride and the loads vectorize), 4-D prefixes (a shared one as a stride-0 batch
view, never copied), an int8 mask, a dense int64 index.

fp32 inputs: the dots follow torch's CUDA matmul setting (`fp32_matmul_precision`) — tf32
when `torch.backends.cuda.matmul.fp32_precision` (or `torch.backends.fp32_precision`) is
"tf32" or, with neither set, `torch.get_float32_matmul_precision()` is "high" or "medium";
exact fp32 ("ieee") otherwise (torch's default).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention_options import AttentionSpec
from .launch import contiguous_last, dense_index


def input_precision(dtype: torch.dtype) -> str:
    """tf32 for fp32 dots only when torch would use it for fp32 matmuls (see module docstring);
    16-bit dots ignore the setting, so they share the default's compiled kernels."""
    if dtype == torch.float32 and fp32_matmul_precision() == "ieee":
        return "ieee"
    return "tf32"


def fp32_matmul_precision() -> str:
    """"ieee" or "tf32": what torch's CUDA fp32 matmuls use now. The per-backend setting of
    torch >= 2.9 (`torch.backends.cuda.matmul.fp32_precision`, "none" = inherit from
    `torch.backends.fp32_precision`) decides first: once it is set, the legacy getter
    `torch.get_float32_matmul_precision()` raises ("mix of the legacy and new APIs"). The
    legacy setting decides only where neither level is set (a legacy set also writes the
    per-backend one) or on a torch without the new API."""
    for level in (torch.backends.cuda.matmul, torch.backends):
        value = getattr(level, "fp32_precision", "none")
        if value in ("ieee", "tf32"):
            return value
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def mask_as_int8(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, Lk) bool/int -> int8 with 0 = hidden; one kernel signature for every mask dtype."""
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask != 0
    return attention_mask.view(torch.int8)


def prefix_views(prefix_k, prefix_v, k, v):
    """Returns (prefix_k4, prefix_v4, P) with 4-D prefixes; a shared (Hkv, P, D) prefix becomes a
    stride-0 batch view (never copied). P = 0 (or no prefix) points at k/v with no keys to read."""
    if prefix_k is None or prefix_k.shape[-2] == 0:
        return k[:, :, :0], v[:, :, :0], 0
    prefix_k, prefix_v = contiguous_last(prefix_k), contiguous_last(prefix_v)
    if prefix_k.dim() == 3:
        prefix_k, prefix_v = prefix_k.unsqueeze(0), prefix_v.unsqueeze(0)
    return prefix_k, prefix_v, prefix_k.shape[-2]


def prefix_batch_stride(prefix: torch.Tensor, shared: bool) -> int:
    return 0 if shared else prefix.stride(0)


def strides3(t: torch.Tensor) -> tuple[int, int, int]:
    """Strides of the three leading dims of a (B, H, L, D) tensor (D is contiguous)."""
    return t.stride(0), t.stride(1), t.stride(2)


@dataclass
class AttentionInputs:
    """q, k, v, the prefixes, the mask and the index as the kernels read them (see the module
    docstring), and the softmax scale."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    prefix_k: torch.Tensor       # 4-D view; k[:, :, :0] when P = 0
    prefix_v: torch.Tensor
    prefix_len: int
    shared: bool                 # the prefix is one (Hkv, P, D) for every row
    mask: torch.Tensor | None
    index: torch.Tensor | None
    scale: float

    @classmethod
    def prepare(cls, q, k, v, prefix_k, prefix_v, spec: AttentionSpec):
        """The inputs and the spec's attention_mask, prefix_index and scale."""
        q, k, v = contiguous_last(q), contiguous_last(k), contiguous_last(v)
        pk, pv, P = prefix_views(prefix_k, prefix_v, k, v)
        index = dense_index(spec.prefix_index) if P > 0 else None
        return cls(q, k, v, pk, pv, P, prefix_k is not None and prefix_k.dim() == 3,
                   mask_as_int8(spec.attention_mask), index,
                   q.shape[-1] ** -0.5 if spec.scale is None else float(spec.scale))

    def pointers(self) -> tuple:
        """Q, K, V, PrefixK, PrefixV, Mask, PrefixIndex (q stands in for an absent one)."""
        return (self.q, self.k, self.v, self.prefix_k, self.prefix_v, self.mask_pointer(),
                self.q if self.index is None else self.index)

    def mask_pointer(self) -> torch.Tensor:
        return self.q if self.mask is None else self.mask

    def input_strides(self) -> tuple:
        """q, k, v, prefix K, prefix V: (b, h, l) each, the prefixes' b = 0 when shared."""
        return (*strides3(self.q), *strides3(self.k), *strides3(self.v),
                prefix_batch_stride(self.prefix_k, self.shared), *self.prefix_k.stride()[1:3],
                prefix_batch_stride(self.prefix_v, self.shared), *self.prefix_v.stride()[1:3])

    def mask_strides(self) -> tuple[int, int]:
        """(b, l) of the mask; (0, 0) without one (never read)."""
        return (0, 0) if self.mask is None else self.mask.stride()


@dataclass
class ForwardInputs(AttentionInputs):
    """The forward launchers' inputs (prefill and decode kernels take the same pointers and
    strides) with the output, laid out as (B, Lq, Hq, D), and its fp32 LSE allocated."""
    out: torch.Tensor
    lse: torch.Tensor

    @classmethod
    def prepare(cls, q, k, v, prefix_k, prefix_v, spec: AttentionSpec, out=None):
        x = AttentionInputs.prepare(q, k, v, prefix_k, prefix_v, spec)
        B, Hq, Lq, D = x.q.shape
        if out is None:
            out = torch.empty(B, Lq, Hq, D, dtype=x.q.dtype, device=x.q.device).transpose(1, 2)
        return cls(**vars(x), out=out,
                   lse=torch.empty(B, Hq, Lq, dtype=torch.float32, device=x.q.device))

    def strides(self) -> tuple:
        """The forward kernels' strides: inputs (`input_strides`), out (b, h, l), lse (b, h),
        mask (b, l)."""
        return (*self.input_strides(), *strides3(self.out), *self.lse.stride()[:2],
                *self.mask_strides())
