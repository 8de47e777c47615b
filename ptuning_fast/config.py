"""Configurations of the three soft-prompt methods, and their mapping to and from PEFT's configs.

The model-dependent sizes (layers, heads, head dim) are not part of a config: `ModelDims` reads
them from the transformers model at wrap time, as PEFT's `_prepare_prompt_learning_config` does,
so one config can be applied to any model.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

PROMPT_INITS = ("random", "sample_vocab", "text", "labels")
ENCODERS = ("mlp", "lstm")


def _check_common(r: list[str], num_virtual_tokens, num_tasks) -> None:
    if not _is_int(num_virtual_tokens) or num_virtual_tokens < 1:
        r.append(f"`num_virtual_tokens` must be an int >= 1, got {num_virtual_tokens!r}")
    if not _is_int(num_tasks) or num_tasks < 1:
        r.append(f"`num_tasks` must be an int >= 1, got {num_tasks!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_probability(r: list[str], name: str, value) -> None:
    """A dropout probability: a real number in [0, 1) (float("x") would fail naming nothing)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        r.append(f"`{name}` must be a float in [0, 1), got {type(value).__name__} {value!r}")
    elif not 0.0 <= value < 1.0:              # also refuses NaN
        r.append(f"`{name}` must be in [0, 1), got {value!r}")


def _raise(cls_name: str, reasons: list[str]) -> None:
    if reasons:
        raise ValueError(f"{cls_name}: " + "; ".join(reasons))


@dataclass
class PromptTuningConfig:
    """Prompt Tuning (Lester et al. 2021): P trainable vectors prepended to the input embeddings.

    init: "random" (N(0, 1), as PEFT), "sample_vocab" (rows of the model's vocabulary), "text"
    (`init_text` tokenized and repeated/truncated to P tokens), "labels" (`init_text` is a list of
    class-label words; row i is the mean embedding of label i's tokens, the remaining rows are
    sampled from the vocabulary, as in Lester et al.). `init_text` may also be given as token ids
    (a list of ints for "text", a list of lists of ints for "labels"); strings need a tokenizer
    (passed to `wrap`, or `tokenizer_name_or_path`).
    """
    num_virtual_tokens: int
    init: str = "random"
    init_text: str | Sequence | None = None
    num_tasks: int = 1
    tokenizer_name_or_path: str | None = None

    method = "prompt_tuning"
    peft_type = "PROMPT_TUNING"

    def __post_init__(self):
        r: list[str] = []
        _check_common(r, self.num_virtual_tokens, self.num_tasks)
        if self.init not in PROMPT_INITS:
            r.append(f"`init` must be one of {PROMPT_INITS}, got {self.init!r}")
        elif self.init in ("text", "labels") and not self.init_text:
            r.append(f"`init`={self.init!r} needs `init_text` (a string or token ids"
                     f"{'; for labels a list of label words' if self.init == 'labels' else ''})")
        elif self.init in ("random", "sample_vocab") and self.init_text is not None:
            r.append(f"`init_text` is only used with init='text' or 'labels', got init={self.init!r}")
        if self.init == "labels" and isinstance(self.init_text, (list, tuple)) \
                and len(self.init_text) > self.num_virtual_tokens:
            r.append(f"init='labels' got {len(self.init_text)} labels for only "
                     f"{self.num_virtual_tokens} virtual tokens")
        _raise(type(self).__name__, r)


@dataclass
class PTuningConfig:
    """P-Tuning v1 (Liu et al. 2021): the prompt is the output of a trainable encoder over P
    embeddings. encoder "mlp": Linear-ReLU-Linear-ReLU-Linear (PEFT's fixed 3-layer structure, so
    `encoder_num_layers` must stay 2); "lstm": a bidirectional LSTM of `encoder_num_layers` layers
    followed by Linear-ReLU-Linear. `encoder_hidden_size` defaults to the model's hidden size."""
    num_virtual_tokens: int
    encoder: str = "mlp"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    num_tasks: int = 1

    method = "p_tuning"
    peft_type = "P_TUNING"

    def __post_init__(self):
        r: list[str] = []
        _check_common(r, self.num_virtual_tokens, self.num_tasks)
        if self.encoder not in ENCODERS:
            r.append(f"`encoder` must be one of {ENCODERS}, got {self.encoder!r}")
        if self.encoder_hidden_size is not None and (
                not _is_int(self.encoder_hidden_size) or self.encoder_hidden_size < 1):
            r.append(f"`encoder_hidden_size` must be None or an int >= 1, "
                     f"got {self.encoder_hidden_size!r}")
        if not _is_int(self.encoder_num_layers) or self.encoder_num_layers < 1:
            r.append(f"`encoder_num_layers` must be an int >= 1, got {self.encoder_num_layers!r}")
        elif self.encoder == "mlp" and self.encoder_num_layers != 2:
            r.append(f"encoder='mlp' has PEFT's fixed structure (3 linear layers); "
                     f"`encoder_num_layers` must be 2, got {self.encoder_num_layers}")
        _check_probability(r, "encoder_dropout", self.encoder_dropout)
        _raise(type(self).__name__, r)


@dataclass
class PrefixTuningConfig:
    """Prefix Tuning (Li & Liang 2021) / P-Tuning v2 (Liu et al. 2022): P key/value vectors per
    layer. With `projection`, they are an MLP (Linear-Tanh-Linear, hidden `encoder_hidden_size`;
    None: the model's prefix width, PEFT's default) of P embeddings; `dropout` applies to the
    prefix in training (P-Tuning v2's prefix dropout)."""
    num_virtual_tokens: int
    projection: bool = False
    encoder_hidden_size: int | None = 512
    dropout: float = 0.0
    num_tasks: int = 1

    method = "prefix_tuning"
    peft_type = "PREFIX_TUNING"

    def __post_init__(self):
        r: list[str] = []
        _check_common(r, self.num_virtual_tokens, self.num_tasks)
        if not isinstance(self.projection, bool):
            r.append(f"`projection` must be a bool, got {self.projection!r}")
        if self.encoder_hidden_size is not None and (
                not _is_int(self.encoder_hidden_size) or self.encoder_hidden_size < 1):
            r.append(f"`encoder_hidden_size` must be an int >= 1 (or None: the model's "
                     f"prefix width, as PEFT), got {self.encoder_hidden_size!r}")
        _check_probability(r, "dropout", self.dropout)
        _raise(type(self).__name__, r)


CONFIG_TYPES = (PromptTuningConfig, PTuningConfig, PrefixTuningConfig)
_BY_METHOD = {c.method: c for c in CONFIG_TYPES}


@dataclass(frozen=True)
class ModelDims:
    """Sizes of a transformers model that the prompt modules depend on."""
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    uses_kv_heads: bool  # config has num_key_value_heads: PEFT then sizes prefixes by kv heads
    # PEFT's num_transformer_submodules: 2 on encoder-decoder models (prompt modules hold two
    # sets of rows, the encoder input's first), else 1.
    num_transformer_submodules: int = 1
    # (kv heads, head dim) of each layer when layers differ (Gemma 4's per_layer_config), else
    # None: every layer has (num_kv_heads, head_dim).
    layer_kv_shapes: tuple | None = None

    @classmethod
    def from_model_config(cls, config) -> "ModelDims":
        submodules = 2 if getattr(config, "is_encoder_decoder", False) else 1
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        layer_shapes = _layer_kv_shapes(config)
        missing = [n for n in ("num_hidden_layers", "hidden_size", "num_attention_heads")
                   if getattr(config, n, None) is None]
        if missing:
            raise ValueError(f"model config {type(config).__name__} lacks {missing}; "
                             "ptuning_fast needs them to size prompts and prefixes")
        heads = config.num_attention_heads
        if layer_shapes is not None:
            # The global kv heads / head dim are ambiguous there (transformers refuses to read
            # them): layer 0's stand for them (the projection's input width).
            kv_heads, head_dim = layer_shapes[0]
        else:
            kv_heads = getattr(config, "num_key_value_heads", None)
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                   num_heads=heads, num_kv_heads=kv_heads or heads, head_dim=head_dim,
                   uses_kv_heads=kv_heads is not None, num_transformer_submodules=submodules,
                   layer_kv_shapes=layer_shapes)

    @property
    def prefix_width(self) -> int:
        """Columns of the prefix encoder's output: 2 * Hkv * D summed over the layers."""
        if self.layer_kv_shapes is None:
            return self.num_layers * 2 * self.num_kv_heads * self.head_dim
        return sum(2 * heads * dim for heads, dim in self.layer_kv_shapes)

    @property
    def prefix_token_dim(self) -> int:
        """PEFT's `token_dim` for prefix tuning: kv heads x head dim on models that declare
        num_key_value_heads (PEFT #1901), else the hidden size."""
        return self.num_kv_heads * self.head_dim if self.uses_kv_heads else self.hidden_size


def _layer_kv_shapes(config) -> tuple | None:
    """Per-layer (kv heads, head dim) from a config with `per_layer_config` (transformers'
    heterogeneous-layer configs, e.g. Gemma 4), or None when every layer has the same."""
    per_layer = getattr(config, "per_layer_config", None)
    if per_layer is None:
        return None
    shapes = []
    for i in range(config.num_hidden_layers):
        # transformers gives every config a per-layer view; those without per-layer kv
        # attributes (BART's) raise AttributeError for them
        heads = getattr(per_layer[i], "num_key_value_heads", None)
        dim = getattr(per_layer[i], "head_dim", None)
        if heads is None or dim is None:
            return None
        shapes.append((int(heads), int(dim)))
    return None if len(set(shapes)) == 1 else tuple(shapes)


def _get(peft_config, name, default=None):
    value = getattr(peft_config, name, default)
    return getattr(value, "value", value)  # PEFT's str enums


def from_peft_config(peft_config, *, for_loading: bool = False
                     ) -> PromptTuningConfig | PTuningConfig | PrefixTuningConfig:
    """Our config from PEFT's PromptTuningConfig / PromptEncoderConfig / PrefixTuningConfig
    (objects or their dict form, e.g. a loaded adapter_config.json). `for_loading`: the weights
    come from a checkpoint, so initialization options do not matter."""
    get = (lambda n, d=None: peft_config.get(n, d)) if isinstance(peft_config, dict) \
        else (lambda n, d=None: _get(peft_config, n, d))
    peft_type = get("peft_type")
    peft_type = getattr(peft_type, "value", peft_type)
    submodules = get("num_transformer_submodules")
    if submodules not in (None, 1, 2):
        raise ValueError(f"PEFT config with num_transformer_submodules={submodules} is not "
                         "supported; expected 1 (decoder-only or encoder-only models) or 2 "
                         "(encoder-decoder models)")
    P = get("num_virtual_tokens")
    if peft_type == "PROMPT_TUNING":
        init = str(get("prompt_tuning_init", "RANDOM")).lower()
        if init == "text" and not get("inference_mode", False):
            return PromptTuningConfig(P, init="text", init_text=get("prompt_tuning_init_text"),
                                      tokenizer_name_or_path=get("tokenizer_name_or_path"))
        return PromptTuningConfig(P, init="sample_vocab" if init == "sample_vocab" else "random")
    if peft_type == "P_TUNING":
        encoder = str(get("encoder_reparameterization_type", "MLP")).lower()
        layers = get("encoder_num_layers", 2)
        if encoder == "mlp" and layers != 2:
            warnings.warn(f"PEFT ignores encoder_num_layers={layers} for the MLP encoder "
                          "(always 3 linear layers); using 2", stacklevel=2)
            layers = 2
        return PTuningConfig(P, encoder=encoder, encoder_hidden_size=get("encoder_hidden_size"),
                             encoder_num_layers=layers,
                             encoder_dropout=get("encoder_dropout", 0.0))
    if peft_type == "PREFIX_TUNING":
        if get("init_weights") is not None and not for_loading:
            raise ValueError(f"PEFT PrefixTuningConfig init_weights={get('init_weights')!r} is "
                             "not supported (prefixes start from PEFT's default random init)")
        # PEFT's encoder_hidden_size defaults to the model's token_dim: None here means that.
        hidden = get("encoder_hidden_size")
        return PrefixTuningConfig(P, projection=bool(get("prefix_projection", False)),
                                  encoder_hidden_size=hidden or None)
    raise ValueError(f"unsupported PEFT config type {peft_type!r}; expected PROMPT_TUNING, "
                     "P_TUNING or PREFIX_TUNING")


def resolve_config(config):
    """Our config as is; a PEFT config converted; anything else a TypeError."""
    if isinstance(config, CONFIG_TYPES):
        return config
    if hasattr(config, "peft_type"):
        return from_peft_config(config)
    raise TypeError(f"expected a ptuning_fast PromptTuningConfig / PTuningConfig / "
                    f"PrefixTuningConfig or the matching PEFT config, got {type(config).__name__}")


def to_peft_dict(config, dims: ModelDims, *, task_type: str, modules_to_save: list[str] | None,
                 base_model_name_or_path: str | None, encoder_hidden_size: int | None) -> dict:
    """PEFT's adapter_config.json content for `config` applied to a model with `dims`
    (inference_mode true: the checkpoint holds the encoder's output)."""
    token_dim = dims.prefix_token_dim if config.method == "prefix_tuning" else dims.hidden_size
    heads = dims.num_kv_heads if config.method == "prefix_tuning" and dims.uses_kv_heads \
        else dims.num_heads
    out: dict[str, Any] = {
        "peft_type": config.peft_type, "task_type": task_type, "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path, "revision": None,
        "inference_mode": True, "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": token_dim, "num_transformer_submodules": dims.num_transformer_submodules,
        "num_attention_heads": heads,
        "num_layers": dims.num_layers, "modules_to_save": modules_to_save or None,
    }
    if config.method == "prompt_tuning":
        text = config.init == "text" and isinstance(config.init_text, str)
        out.update(prompt_tuning_init="TEXT" if text else
                   ("SAMPLE_VOCAB" if config.init == "sample_vocab" else "RANDOM"),
                   prompt_tuning_init_text=config.init_text if text else None,
                   tokenizer_name_or_path=config.tokenizer_name_or_path if text else None,
                   tokenizer_kwargs=None)
        if text and not config.tokenizer_name_or_path:
            out["prompt_tuning_init"] = "RANDOM"   # PEFT rejects TEXT without a tokenizer path
            out["prompt_tuning_init_text"] = None
    elif config.method == "p_tuning":
        out.update(encoder_reparameterization_type=config.encoder.upper(),
                   encoder_hidden_size=encoder_hidden_size,
                   encoder_num_layers=config.encoder_num_layers,
                   encoder_dropout=config.encoder_dropout)
    else:
        out.update(encoder_hidden_size=encoder_hidden_size,
                   prefix_projection=config.projection, init_weights=None)
    return out


def to_dict(config) -> dict:
    """Our own JSON form (kept beside PEFT's, so a round trip loses nothing)."""
    d = dataclasses.asdict(config)
    if d.get("init_text") is not None and not isinstance(d["init_text"], str):
        d["init_text"] = [list(x) if isinstance(x, (list, tuple)) else x for x in d["init_text"]]
    return {"method": config.method, **d}


def from_dict(d: dict):
    d = dict(d)
    method = d.pop("method", None)
    if method not in _BY_METHOD:
        raise ValueError(f"unknown ptuning_fast method {method!r}; expected one of "
                         f"{sorted(_BY_METHOD)}")
    return _BY_METHOD[method](**d)
