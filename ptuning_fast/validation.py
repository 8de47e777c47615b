"""Input checks shared by the reference paths and the fused ops.

Each check collects every reason an input is unsupported (xformers' `not_supported_reasons`
idea) and raises one error listing them all, so a user fixes everything in one go. Reasons about
dtypes or devices raise TypeError; reasons about shapes, strides or values raise ValueError.
"""
from __future__ import annotations

import math

import torch


class Reasons:
    """Collects reasons by kind; `raise_if_any()` turns them into one exception: TypeError when
    any is about a dtype or device, else NotImplementedError when any is an unsupported feature,
    else ValueError."""

    def __init__(self, op: str):
        self.op = op
        self.type_errors: list[str] = []
        self.unsupported_features: list[str] = []
        self.value_errors: list[str] = []

    def type(self, message: str) -> None:
        self.type_errors.append(message)

    def unsupported(self, message: str) -> None:
        self.unsupported_features.append(message)

    def value(self, message: str) -> None:
        self.value_errors.append(message)

    def messages(self) -> list[str]:
        return self.type_errors + self.unsupported_features + self.value_errors

    def raise_if_any(self) -> None:
        reasons = self.messages()
        if not reasons:
            return
        kind = (TypeError if self.type_errors else
                NotImplementedError if self.unsupported_features else ValueError)
        raise kind(f"{self.op}: " + "; ".join(reasons))


def describe(t) -> str:
    """'Tensor(shape=(2, 3), dtype=torch.float16, device=cpu)' — for error messages."""
    if not isinstance(t, torch.Tensor):
        return f"{type(t).__name__} {t!r}"
    return f"Tensor(shape={tuple(t.shape)}, dtype={t.dtype}, device={t.device})"


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def require_tensor(r: Reasons, name: str, t, ndims: tuple[int, ...], dtypes) -> bool:
    """Checks type, rank and dtype; returns False when later checks on `t` make no sense."""
    if not isinstance(t, torch.Tensor):
        r.type(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
        return False
    ok = True
    if t.dim() not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        r.value(f"`{name}` must be {want}, got {describe(t)}")
        ok = False
    if t.dtype not in dtypes:
        r.type(f"`{name}` must have dtype in {[str(d) for d in dtypes]}, got {describe(t)}")
        ok = False
    return ok


def require_same_device(r: Reasons, named: dict[str, torch.Tensor | None]) -> None:
    present = {n: t for n, t in named.items() if isinstance(t, torch.Tensor)}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"`{n}` on {t.device}" for n, t in present.items())
        r.type(f"all tensors must be on one device, got {listing}")


def check_index_range(name: str, index: torch.Tensor, upper: int, what: str) -> None:
    """Entries of `index` must lie in [0, upper).

    On CPU, outside torch.compile: checked now, a ValueError naming the first bad value. On a
    GPU, or while torch.compile traces: a device-side assert carrying the same message — no
    host sync (a training step stays sync-free and CUDA-graph capturable), and a bad index
    stops the computation before any kernel reads outside its table, as torch's own embedding
    lookup does on CUDA.
    """
    if index.numel() == 0:
        return
    if index.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = torch.stack(torch.aminmax(index)).tolist()
        if lo < 0 or hi >= upper:
            bad = lo if lo < 0 else hi
            raise ValueError(f"`{name}` has value {bad} outside [0, {upper}) ({what})")
        return
    torch._assert_async(((index >= 0) & (index < upper)).all(),
                        f"`{name}` has values outside [0, {upper}) ({what})")


def option_in_use(value) -> bool:
    """False for the values that switch an optional feature off: None, False, 0 / 0.0 and
    FlashAttention's (-1, -1) window."""
    if value is None:
        return False
    if isinstance(value, (bool, int, float)):
        return bool(value)
    if isinstance(value, (tuple, list)) and all(type(x) is int for x in value):
        return tuple(value) != (-1, -1)
    return True          # a tensor, a tuple of tensors (packed segments), anything else


def refuse_unknown_options(r: Reasons, backend: str, known, options: dict) -> None:
    """A backend never drops an option it does not compute: each one in use is a reason."""
    for name, value in options.items():
        if name not in known and option_in_use(value):
            r.unsupported(f"`{name}`={_short(value)} is not computed by the {backend!r} backend")


def _short(value) -> str:
    """A value for an error message: tensors by shape and dtype, never their contents."""
    if isinstance(value, torch.Tensor):
        return describe(value)
    if isinstance(value, (tuple, list)) and any(isinstance(x, torch.Tensor) for x in value):
        return "(" + ", ".join(_short(x) for x in value) + ")"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_prompt_embedding(input_ids, weight, prompt, prompt_index) -> None:
    r = Reasons("prompt_embedding")
    ids_ok = require_tensor(r, "input_ids", input_ids, (2,), INDEX_DTYPES)
    w_ok = require_tensor(r, "weight", weight, (2,), FLOAT_DTYPES)
    p_ok = require_tensor(r, "prompt", prompt, (2, 3), FLOAT_DTYPES)
    if prompt_index is not None:
        require_tensor(r, "prompt_index", prompt_index, (1,), INDEX_DTYPES)
    require_same_device(r, {"input_ids": input_ids, "weight": weight, "prompt": prompt,
                            "prompt_index": prompt_index})
    if w_ok and p_ok and prompt.shape[-1] != weight.shape[1]:
        r.value(f"`prompt` last dim must equal the embedding width {weight.shape[1]} of `weight`, "
                f"got {describe(prompt)}")
    if p_ok and prompt.dim() == 3 and prompt_index is None:
        r.value(f"`prompt` of shape (T, P, d) = {tuple(prompt.shape)} needs `prompt_index` (B,)")
    if p_ok and prompt.dim() == 2 and prompt_index is not None:
        r.value(f"`prompt_index` given but `prompt` is shared (P, d) = {tuple(prompt.shape)}; "
                "expected a (T, P, d) prompt")
    if ids_ok and isinstance(prompt_index, torch.Tensor) and prompt_index.dim() == 1 \
            and prompt_index.shape[0] != input_ids.shape[0]:
        r.value(f"`prompt_index` must have shape (B,) = ({input_ids.shape[0]},), "
                f"got {describe(prompt_index)}")
    r.raise_if_any()


def check_prompt_embedding_values(input_ids, weight, prompt, prompt_index) -> None:
    check_index_range("input_ids", input_ids, weight.shape[0], "vocabulary size of `weight`")
    if prompt_index is not None:
        check_index_range("prompt_index", prompt_index, prompt.shape[0], "number of task prompts")


def prefix_length(prefix_k) -> int:
    return 0 if prefix_k is None else prefix_k.shape[-2]


def check_prefix_attention(q, k, v, prefix_k, prefix_v, attention_mask, scale,
                           prefix_index, dropout_p=0.0, dropout_seed=None, causal=True) -> None:
    r = Reasons("prefix_attention")
    check_dropout(r, dropout_p, dropout_seed)
    if not isinstance(causal, bool):
        # Used by truthiness, causal="no" or a 1-element tensor would silently mean True.
        r.type(f"`causal` must be a bool, got {type(causal).__name__} {causal!r}")
    qkv_ok = all([require_tensor(r, n, t, (4,), FLOAT_DTYPES) for n, t in
                  (("q", q), ("k", k), ("v", v))])
    has_prefix = prefix_k is not None or prefix_v is not None
    if has_prefix and (prefix_k is None or prefix_v is None):
        r.value("`prefix_k` and `prefix_v` must be given together "
                f"(got prefix_k={describe(prefix_k)}, prefix_v={describe(prefix_v)})")
        has_prefix = False
    pre_ok = has_prefix and all([require_tensor(r, n, t, (3, 4), FLOAT_DTYPES) for n, t in
                                 (("prefix_k", prefix_k), ("prefix_v", prefix_v))])
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            r.type(f"`attention_mask` must be a torch.Tensor, got {type(attention_mask).__name__}")
            attention_mask = None
        elif attention_mask.dim() != 2:
            r.value(f"`attention_mask` must be 2-D (B, Lk) with true/1 = attend, "
                    f"got {describe(attention_mask)}")
        elif attention_mask.is_floating_point() or attention_mask.is_complex():
            r.type(f"`attention_mask` must be bool or integer (true/1 = attend), "
                   f"got {describe(attention_mask)}")
    if prefix_index is not None:
        require_tensor(r, "prefix_index", prefix_index, (1,), INDEX_DTYPES)
    require_same_device(r, {"q": q, "k": k, "v": v, "prefix_k": prefix_k, "prefix_v": prefix_v,
                            "attention_mask": attention_mask, "prefix_index": prefix_index})
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        r.type(f"`scale` must be a float or None, got {type(scale).__name__} {scale!r}")
    elif scale is not None and not math.isfinite(scale):
        r.value(f"`scale` must be a finite float (or None: D ** -0.5), got {scale!r}")
    if not qkv_ok:
        r.raise_if_any()
        return
    B, Hq, Lq, D = q.shape
    if k.shape != v.shape:
        r.value(f"`k` and `v` must have the same shape, got {describe(k)} and {describe(v)}")
    Bk, Hkv, Lk, Dk = k.shape
    if Bk != B:
        r.value(f"`k` batch {Bk} must equal `q` batch {B}")
    if Dk != D:
        r.value(f"`k` head dim {Dk} must equal `q` head dim {D}")
    if D == 0:
        r.value(f"head dim D must be >= 1, got `q` {describe(q)} (the default scale is "
                "D ** -0.5)")
    if Hkv == 0 or Hq % Hkv != 0:
        r.value(f"query heads Hq={Hq} must be a multiple of key/value heads Hkv={Hkv}")
    if len({q.dtype, k.dtype, v.dtype}) > 1:
        r.type(f"`q`, `k`, `v` must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if Lk == 0 and not has_prefix:
        r.value("no keys at all: `k` has Lk=0 and there is no prefix")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 \
            and tuple(attention_mask.shape) != (B, Lk):
        r.value(f"`attention_mask` must have shape (B, Lk) = ({B}, {Lk}), "
                f"got {describe(attention_mask)}")
    if pre_ok:
        if prefix_k.shape != prefix_v.shape:
            r.value(f"`prefix_k` and `prefix_v` must have the same shape, got "
                    f"{describe(prefix_k)} and {describe(prefix_v)}")
        if prefix_k.dtype != q.dtype or prefix_v.dtype != q.dtype:
            r.type(f"`prefix_k`/`prefix_v` must have q's dtype {q.dtype}, got "
                   f"{prefix_k.dtype}/{prefix_v.dtype}")
        if prefix_k.shape[-3] != Hkv or prefix_k.shape[-1] != D:
            r.value(f"`prefix_k` must be (Hkv, P, D), (B, Hkv, P, D) or (T, Hkv, P, D) with "
                    f"Hkv={Hkv}, D={D}; got {describe(prefix_k)}")
        if prefix_k.dim() == 4 and prefix_index is None and prefix_k.shape[0] != B:
            r.value(f"a 4-D `prefix_k` without `prefix_index` is per-row and needs first dim "
                    f"B={B}; got {describe(prefix_k)} (pass `prefix_index` for per-task prefixes)")
        if prefix_index is not None and prefix_k.dim() != 4:
            r.value(f"`prefix_index` needs per-task prefixes (T, Hkv, P, D), got "
                    f"{describe(prefix_k)}")
    elif prefix_index is not None:
        r.value("`prefix_index` given without `prefix_k`/`prefix_v`")
    if isinstance(prefix_index, torch.Tensor) and prefix_index.dim() == 1 \
            and prefix_index.shape[0] != B:
        r.value(f"`prefix_index` must have shape (B,) = ({B},), got {describe(prefix_index)}")
    r.raise_if_any()


INT64_RANGE = (-2 ** 63, 2 ** 63)


def check_dropout(r: Reasons, dropout_p, dropout_seed) -> None:
    """dropout_p: a real number in [0, 1); dropout_seed: None or an int in int64's range."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        r.type(f"`dropout_p` must be a float in [0, 1), got {type(dropout_p).__name__} "
               f"{dropout_p!r}")
    elif not 0.0 <= dropout_p < 1.0:          # also refuses NaN
        r.value(f"`dropout_p` must be in [0, 1) (the probability of dropping an attention "
                f"probability), got {dropout_p!r}")
    if dropout_seed is None:
        return
    if isinstance(dropout_seed, bool) or not isinstance(dropout_seed, int):
        r.type(f"`dropout_seed` must be an int or None, got {type(dropout_seed).__name__}")
    elif not INT64_RANGE[0] <= dropout_seed < INT64_RANGE[1]:
        r.value(f"`dropout_seed` must fit in int64, got {dropout_seed}")


def check_prefix_attention_values(prefix_k, prefix_index) -> None:
    if prefix_index is not None:
        check_index_range("prefix_index", prefix_index, prefix_k.shape[0], "number of task prefixes")


def check_dropout_mask(mask, shape, device) -> None:
    """The reference's dropout keep-mask: bool, the probabilities' shape, the inputs' device."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"prefix_attention: dropout_p > 0 needs `dropout_mask`, a bool keep-mask "
                         f"of shape (B, Hq, Lq, P + Lk) = {shape}, got {type(mask).__name__}")
    if mask.dtype != torch.bool or tuple(mask.shape) != shape or mask.device != device:
        raise ValueError(f"prefix_attention: `dropout_mask` must be a bool tensor of shape "
                         f"(B, Hq, Lq, P + Lk) = {shape} on {device}, got {describe(mask)}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_attention_terms(q, k, prefix_k, *, bias=None, window_size=(-1, -1),
                          prefix_in_window=True, softcap=0.0, sinks=None, position_ids=None,
                          cu_seqlens=None) -> None:
    """The attention terms beside the prefix (q and k already checked): additive `bias`,
    sliding `window_size`, logit `softcap`, per-head `sinks`, packed sequences."""
    r = Reasons("prefix_attention")
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    P = prefix_length(prefix_k)
    if bias is not None and require_tensor(r, "bias", bias, (4,), FLOAT_DTYPES):
        want = (B, Hq, Lq, P + Lk)
        if any(g not in (1, w) for g, w in zip(bias.shape[:2], want[:2])) \
                or tuple(bias.shape[2:]) != want[2:]:
            r.value(f"`bias` must broadcast to (B, Hq, Lq, P + Lk) = {want} (first two dims may "
                    f"be 1; it covers the prefix columns first), got {describe(bias)}")
        if bias.requires_grad and torch.is_grad_enabled():
            r.value(f"`bias` requires grad, but prefix_attention computes no gradient for it "
                    f"(biases come from frozen weights); pass bias.detach(), got "
                    f"{describe(bias)}")
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2
            and all(_is_int(w) and w >= -1 for w in window_size)):
        r.value(f"`window_size` must be a pair (left, right) of ints >= -1 (-1: unbounded), "
                f"got {window_size!r}")
    if not isinstance(prefix_in_window, bool):
        r.type(f"`prefix_in_window` must be a bool, got {type(prefix_in_window).__name__} "
               f"{prefix_in_window!r}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        r.type(f"`softcap` must be a float (0: off), got {type(softcap).__name__} {softcap!r}")
    elif not (math.isfinite(softcap) and softcap >= 0):
        r.value(f"`softcap` must be a finite float >= 0 (0: off), got {softcap!r}")
    if sinks is not None and require_tensor(r, "sinks", sinks, (1,), FLOAT_DTYPES):
        if sinks.shape[0] != Hq:
            r.value(f"`sinks` must have shape (Hq,) = ({Hq},), got {describe(sinks)}")
        if sinks.requires_grad and torch.is_grad_enabled():
            r.value(f"`sinks` requires grad, but prefix_attention computes no gradient for it "
                    f"(sink logits come from frozen weights); pass sinks.detach(), got "
                    f"{describe(sinks)}")
    packed = position_ids is not None or cu_seqlens is not None
    if position_ids is not None and cu_seqlens is not None:
        r.value("give packed sequences as `position_ids` or as `cu_seqlens`, not both")
    elif position_ids is not None:
        if require_tensor(r, "position_ids", position_ids, (2,), INDEX_DTYPES) \
                and tuple(position_ids.shape) != (B, Lk):
            r.value(f"`position_ids` must have shape (B, Lk) = ({B}, {Lk}), "
                    f"got {describe(position_ids)}")
    elif cu_seqlens is not None:
        require_tensor(r, "cu_seqlens", cu_seqlens, (1,), INDEX_DTYPES)
    if packed and Lq != Lk:
        r.value(f"packed sequences need Lq == Lk (a training or prefill step, no cache), got "
                f"Lq={Lq}, Lk={Lk}")
    require_same_device(r, {"q": q, "bias": bias, "sinks": sinks, "position_ids": position_ids,
                            "cu_seqlens": cu_seqlens})
    r.raise_if_any()


def check_cu_seqlens_values(cu_seqlens, batch: int, length: int) -> None:
    """Cumulative lengths start at 0, never decrease and end at B * L (checked on CPU only:
    elsewhere it would cost a host sync per call; the model wrapper builds them itself)."""
    if cu_seqlens is None or cu_seqlens.device.type != "cpu" or torch.compiler.is_compiling():
        return
    values = cu_seqlens.tolist()
    if not values or values[0] != 0 or values[-1] != batch * length \
            or any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"prefix_attention: `cu_seqlens` must start at 0, never decrease and end "
                         f"at B * L = {batch * length}, got {values[:8]}"
                         f"{' ...' if len(values) > 8 else ''}")


def check_segments(segments, q, k) -> None:
    """`segments` as `ptuning_fast.packing.packed_segments` makes them: (start, end) int32
    (B, Lq) on q's device, and Lq == Lk."""
    B, _, Lq, _ = q.shape
    ok = k.shape[2] == Lq and isinstance(segments, tuple) and len(segments) == 2 and all(
        isinstance(s, torch.Tensor) and s.dtype == torch.int32 and tuple(s.shape) == (B, Lq)
        and s.device == q.device for s in segments)
    if not ok:
        raise ValueError(f"prefix_attention: `segments` must be ptuning_fast.packing."
                         f"packed_segments(...)'s (start, end), int32 (B, Lq) = ({B}, {Lq}) on "
                         f"{q.device}; got {segments!r}"[:400])
