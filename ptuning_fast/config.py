"""Configurations of the three soft-prompt methods, and their mapping to and from PEFT's configs.

Each config has the fields of PEFT's class of the same method, with PEFT's names and defaults
(our older short names are aliases), so a PEFT user's keyword arguments build the same model.
The model-dependent sizes (layers, heads, head dim) are read from the transformers model at wrap
time by `ModelDims`, as PEFT's `_prepare_prompt_learning_config` does when they are None, so one
config can be applied to any model; given, they are checked against it.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

PROMPT_INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT", "LABELS")
ENCODERS = ("MLP", "LSTM")
PREFIX_INITS = (None, "zero")
# PEFT's TaskType values; None: inferred from the model at wrap time.
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS",
              "FEATURE_EXTRACTION")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _enum_value(value):
    """PEFT's str enums (PromptTuningInit.TEXT, TaskType.CAUSAL_LM, ...) as their plain value."""
    return getattr(value, "value", value)


def _upper(value):
    value = _enum_value(value)
    return value.upper() if isinstance(value, str) else value


def _check_probability(r: list[str], name: str, value) -> None:
    """A dropout probability: a real number in [0, 1) (float("x") would fail naming nothing)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        r.append(f"`{name}` must be a float in [0, 1), got {type(value).__name__} {value!r}")
    elif not 0.0 <= value < 1.0:              # also refuses NaN
        r.append(f"`{name}` must be in [0, 1), got {value!r}")


def _check_optional_size(r: list[str], name: str, value, what: str) -> None:
    if value is not None and (not _is_int(value) or value < 1):
        r.append(f"`{name}` must be None ({what}) or an int >= 1, got {value!r}")


def _raise(cls_name: str, reasons: list[str]) -> None:
    if reasons:
        raise ValueError(f"{cls_name}: " + "; ".join(reasons))


@dataclass
class _PromptLearningConfig:
    """The fields of PEFT's `PeftConfig` / `PromptLearningConfig`, same names and defaults.

    The model-dependent sizes (`token_dim`, `num_attention_heads`, `num_layers`) are read from the
    model at wrap time, as PEFT does when they are None; given, they must agree with the model.
    `task_type` None: inferred from the model (PEFT requires it for prompt learning); given, it
    must be the model's. `inference_mode=True` builds the module PEFT builds for inference (the
    encoder's output only) and trains no head; as in PEFT, the prompt itself stays a parameter
    that requires grad (`from_pretrained(is_trainable=False)` freezes everything).
    `modules_to_save`: extra heads to train, on
    top of PEFT's defaults for the task ("classifier" / "score" for classification).
    `num_tasks` (ours): T prompts in one module, chosen per row by `task_ids`.
    """
    num_virtual_tokens: int | None = None
    task_type: str | None = None
    peft_type: str | None = None
    inference_mode: bool = False
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None
    num_tasks: int = 1
    # Bookkeeping that PEFT records and never computes with: kept, not compared.
    auto_mapping: dict | None = field(default=None, compare=False, repr=False)
    peft_version: str | None = field(default=None, compare=False, repr=False)
    base_model_name_or_path: str | None = field(default=None, compare=False, repr=False)
    revision: str | None = field(default=None, compare=False, repr=False)

    method = ""
    PEFT_TYPE = ""
    is_prompt_learning = True      # PEFT's flag, read by code that handles several methods

    def to_dict(self) -> dict:
        """The fields as a dict (PEFT's `PeftConfig.to_dict`)."""
        return dataclasses.asdict(self)

    def _check_base(self) -> list[str]:
        r: list[str] = []
        self.task_type = _upper(self.task_type)
        self.peft_type = _upper(self.peft_type) or self.PEFT_TYPE
        if self.num_virtual_tokens is None:
            r.append("`num_virtual_tokens` is required (an int >= 1)")
        elif not _is_int(self.num_virtual_tokens) or self.num_virtual_tokens < 1:
            r.append(f"`num_virtual_tokens` must be an int >= 1, got {self.num_virtual_tokens!r}")
        if not _is_int(self.num_tasks) or self.num_tasks < 1:
            r.append(f"`num_tasks` must be an int >= 1, got {self.num_tasks!r}")
        if self.peft_type != self.PEFT_TYPE:
            r.append(f"`peft_type` must be {self.PEFT_TYPE!r} for {type(self).__name__}, got "
                     f"{self.peft_type!r}")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            r.append(f"`task_type` must be None (inferred from the model) or one of "
                     f"{TASK_TYPES}, got {self.task_type!r}")
        if not isinstance(self.inference_mode, bool):
            r.append(f"`inference_mode` must be a bool, got {self.inference_mode!r}")
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            _check_optional_size(r, name, getattr(self, name), "read from the model")
        if self.num_transformer_submodules not in (None, 1, 2):
            r.append(f"`num_transformer_submodules` must be None (read from the model), 1 "
                     f"(decoder-only and encoder-only models) or 2 (encoder-decoder models), "
                     f"got {self.num_transformer_submodules!r}")
        if self.modules_to_save is not None and (
                not isinstance(self.modules_to_save, (list, tuple, set))
                or not all(isinstance(n, str) for n in self.modules_to_save)):
            r.append(f"`modules_to_save` must be None or a list of module names, got "
                     f"{self.modules_to_save!r}")
        elif self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        return r

    def check_model(self, dims: "ModelDims", model_task_type: str) -> None:
        """The sizes and task type a config names, against the model it is applied to."""
        is_prefix = self.method == "prefix_tuning"
        accepted = {"num_layers": {dims.num_layers},
                    "token_dim": {dims.hidden_size} | ({dims.prefix_token_dim} if is_prefix
                                                       else set()),
                    "num_attention_heads": {dims.num_heads} | ({dims.num_kv_heads} if is_prefix
                                                               else set())}
        accepted["num_transformer_submodules"] = {dims.num_transformer_submodules}
        wrong = [f"{k}={getattr(self, k)} (the model has {' or '.join(map(str, sorted(v)))})"
                 for k, v in accepted.items() if getattr(self, k) not in (None, *v)]
        if self.task_type is not None and self.task_type != model_task_type:
            wrong.append(f"task_type={self.task_type!r} (the model is a {model_task_type} "
                         "model; ptuning_fast follows the model's head)")
        if wrong:
            raise ValueError(f"{type(self).__name__} does not fit the model: {', '.join(wrong)}; "
                             "leave these None to read them from the model")


def _aliases(**aliases: str):
    """Our short field names (`init`, `encoder`, ...) as aliases of PEFT's: accepted by the
    constructor and readable/settable as attributes. Giving an alias and its PEFT name with
    different values is a ValueError."""
    def decorate(cls):
        generated = cls.__init__

        @functools.wraps(generated)
        def __init__(self, *args, **kwargs):
            for alias, name in aliases.items():
                if alias not in kwargs:
                    continue
                value = kwargs.pop(alias)
                if name in kwargs and _upper(kwargs[name]) != _upper(value):
                    raise ValueError(
                        f"{cls.__name__}: `{alias}`={value!r} and `{name}`={kwargs[name]!r} "
                        f"disagree; `{alias}` is a short alias of PEFT's `{name}`: give one")
                kwargs.setdefault(name, value)
            generated(self, *args, **kwargs)

        cls.__init__ = __init__
        for alias, name in aliases.items():
            setattr(cls, alias, property(
                functools.partial(_read_alias, name=name),
                functools.partial(_write_alias, name=name),
                doc=f"Alias of `{name}` (lower-case where that is a PEFT enum value)."))
        return cls
    return decorate


def _read_alias(self, name):
    value = getattr(self, name)
    return value.lower() if name in _LOWER_ALIASES and isinstance(value, str) else value


def _write_alias(self, value, name):
    setattr(self, name, _upper(value) if name in _LOWER_ALIASES else value)


_LOWER_ALIASES = ("prompt_tuning_init", "encoder_reparameterization_type")


@_aliases(init="prompt_tuning_init", init_text="prompt_tuning_init_text")
@dataclass
class PromptTuningConfig(_PromptLearningConfig):
    """Prompt Tuning (Lester et al. 2021): P trainable vectors prepended to the input embeddings.

    PEFT's fields and defaults (see `_PromptLearningConfig` for the common ones):
    `prompt_tuning_init`: "RANDOM" (N(0, 1), as PEFT), "SAMPLE_VOCAB" (rows of the model's
    vocabulary), "TEXT" (`prompt_tuning_init_text` tokenized as PEFT does, special tokens
    included, repeated/truncated to P tokens), or ours, "LABELS" (`prompt_tuning_init_text` is a
    list of class-label words; row i is the mean embedding of label i's tokens, the remaining
    rows are sampled from the vocabulary, as in Lester et al.). PEFT's enum values and strings
    in any case are accepted. The text may also be token ids (a list of ints for "TEXT", a list of
    lists of ints for "LABELS"); strings need a tokenizer (passed to `wrap`, or
    `tokenizer_name_or_path`, loaded with `tokenizer_kwargs`). Aliases: `init`, `init_text`.
    """
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | Sequence | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    method = "prompt_tuning"
    PEFT_TYPE = "PROMPT_TUNING"

    def __post_init__(self):
        r = self._check_base()
        self.prompt_tuning_init = init = _upper(self.prompt_tuning_init)
        text = self.prompt_tuning_init_text
        if init not in PROMPT_INITS:
            r.append(f"`prompt_tuning_init` must be one of {PROMPT_INITS}, got {init!r}")
        elif init in ("TEXT", "LABELS") and not text:
            r.append(f"`prompt_tuning_init`={init!r} needs `prompt_tuning_init_text` (a string "
                     f"or token ids{'; for LABELS a list of label words' * (init == 'LABELS')})")
        elif init in ("RANDOM", "SAMPLE_VOCAB") and text is not None:
            r.append(f"`prompt_tuning_init_text` is only used with prompt_tuning_init='TEXT' or "
                     f"'LABELS', got prompt_tuning_init={init!r}")
        if init == "LABELS" and isinstance(text, (list, tuple)) and _is_int(
                self.num_virtual_tokens) and len(text) > self.num_virtual_tokens:
            r.append(f"prompt_tuning_init='LABELS' got {len(text)} labels for only "
                     f"{self.num_virtual_tokens} virtual tokens")
        if self.tokenizer_kwargs is not None and not isinstance(self.tokenizer_kwargs, dict):
            r.append(f"`tokenizer_kwargs` must be None or a dict, got {self.tokenizer_kwargs!r}")
        elif self.tokenizer_kwargs and init not in ("TEXT", "LABELS"):
            r.append("`tokenizer_kwargs` is only used with prompt_tuning_init='TEXT' or "
                     f"'LABELS' (as in PEFT), got prompt_tuning_init={init!r}")
        _raise(type(self).__name__, r)


@_aliases(encoder="encoder_reparameterization_type")
@dataclass
class PTuningConfig(_PromptLearningConfig):
    """P-Tuning v1 (Liu et al. 2021), PEFT's `PromptEncoderConfig`: the prompt is the output of a
    trainable encoder over P embeddings. `encoder_reparameterization_type` "MLP":
    Linear-ReLU-Linear-ReLU-Linear (PEFT's fixed 3-layer structure: `encoder_num_layers` is
    ignored with a warning, as PEFT does); "LSTM": a bidirectional LSTM of `encoder_num_layers`
    layers (dropout `encoder_dropout` between them) followed by Linear-ReLU-Linear.
    `encoder_hidden_size` None: the model's hidden size (PEFT's default). Alias: `encoder`."""
    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    method = "p_tuning"
    PEFT_TYPE = "P_TUNING"

    def __post_init__(self):
        r = self._check_base()
        self.encoder_reparameterization_type = encoder = \
            _upper(self.encoder_reparameterization_type)
        if encoder not in ENCODERS:
            r.append(f"`encoder_reparameterization_type` must be one of {ENCODERS}, got "
                     f"{encoder!r}")
        _check_optional_size(r, "encoder_hidden_size", self.encoder_hidden_size,
                             "the model's hidden size")
        if not _is_int(self.encoder_num_layers) or self.encoder_num_layers < 1:
            r.append(f"`encoder_num_layers` must be an int >= 1, got {self.encoder_num_layers!r}")
        elif encoder == "MLP" and self.encoder_num_layers != 2:
            warnings.warn(f"PTuningConfig: the MLP encoder has PEFT's fixed structure (3 linear "
                          f"layers); encoder_num_layers={self.encoder_num_layers} is ignored, as "
                          "PEFT ignores it", stacklevel=4)
        _check_probability(r, "encoder_dropout", self.encoder_dropout)
        _raise(type(self).__name__, r)


@_aliases(projection="prefix_projection")
@dataclass
class PrefixTuningConfig(_PromptLearningConfig):
    """Prefix Tuning (Li & Liang 2021) / P-Tuning v2 (Liu et al. 2022): P key/value vectors per
    layer. PEFT's fields: with `prefix_projection`, they are an MLP (Linear-Tanh-Linear, hidden
    `encoder_hidden_size`; None: the model's prefix width, PEFT's default) of P embeddings;
    `init_weights="zero"` starts the prefix at zero (the projection's last layer, or the
    prefix itself), as PEFT. Ours: `dropout` applies to the prefix in training (P-Tuning v2's
    prefix dropout). On models whose layers differ in kv heads or head dim (Gemma 4), PEFT sizes
    one prefix for the layer with the widest heads and gives every layer the slice of it that
    fits; ours does the same (PEFT loads the checkpoint), and `per_layer_shapes=True` instead
    gives each layer a prefix of its own shape (PEFT cannot load that checkpoint). Alias:
    `projection`."""
    init_weights: str | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    dropout: float = 0.0
    per_layer_shapes: bool = False

    method = "prefix_tuning"
    PEFT_TYPE = "PREFIX_TUNING"

    def __post_init__(self):
        r = self._check_base()
        for name in ("prefix_projection", "per_layer_shapes"):
            if not isinstance(getattr(self, name), bool):
                r.append(f"`{name}` must be a bool, got {getattr(self, name)!r}")
        if self.init_weights not in PREFIX_INITS:
            r.append(f"`init_weights` must be None (random) or 'zero', got {self.init_weights!r}")
        _check_optional_size(r, "encoder_hidden_size", self.encoder_hidden_size,
                             "the model's prefix width, as PEFT")
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
    # None: every layer has (num_kv_heads, head_dim). Where they differ, (num_kv_heads,
    # head_dim) are PEFT's prefix shape: the layer with the widest head dim's.
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
            kv_heads, head_dim = _peft_prefix_shape(config)
        else:
            try:
                kv_heads = getattr(config, "num_key_value_heads", None)
                head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
            except RuntimeError as err:   # transformers: a per-layer size read globally
                raise ValueError(f"model config {type(config).__name__}: its layers' sizes "
                                 f"cannot be read as one ({err}); ptuning_fast sizes prompts "
                                 "and prefixes from them") from None
        return cls(num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                   num_heads=heads, num_kv_heads=kv_heads or heads, head_dim=head_dim,
                   uses_kv_heads=kv_heads is not None, num_transformer_submodules=submodules,
                   layer_kv_shapes=layer_shapes)

    def prefix_width(self, per_layer_shapes: bool = False) -> int:
        """Columns of the prefix encoder's output: 2 * Hkv * D summed over the layers, each
        layer's own (Hkv, D) with `per_layer_shapes`, else PEFT's one shape."""
        if self.layer_kv_shapes is None or not per_layer_shapes:
            return self.num_layers * 2 * self.num_kv_heads * self.head_dim
        return sum(2 * heads * dim for heads, dim in self.layer_kv_shapes)


    @property
    def prefix_token_dim(self) -> int:
        """PEFT's `token_dim` for prefix tuning: kv heads x head dim on models that declare
        num_key_value_heads (PEFT #1901), else the hidden size."""
        return self.num_kv_heads * self.head_dim if self.uses_kv_heads else self.hidden_size


def layers_wider_than(layer_shapes, heads: int, dim: int) -> list[int]:
    """Layers of `layer_shapes` ((kv heads, head dim) each) with more than `heads` kv heads or
    heads wider than `dim`: PEFT's one prefix shape cannot be sliced for them."""
    return [i for i, (h, d) in enumerate(layer_shapes or ()) if h > heads or d > dim]


def _peft_prefix_shape(config) -> tuple[int, int]:
    """(kv heads, head dim) PEFT 0.21 sizes one prefix by on a model whose layers differ:
    the config's own, replaced by each per-layer override (in the config's order) whose head dim
    is wider than the one held, with that layer's kv heads (its base's if not overridden).
    transformers refuses to read the global sizes there, so they come from the config's dict,
    as PEFT reads them."""
    fields = config.to_dict()
    heads = fields["num_key_value_heads"]
    dim = fields.get("head_dim") or fields["hidden_size"] // fields["num_attention_heads"]
    for override in (fields.get("per_layer_config") or {}).values():
        if override.get("head_dim", dim) > dim:
            dim = override["head_dim"]
            heads = override.get("num_key_value_heads", fields["num_key_value_heads"])
    return int(heads), int(dim)


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


# PEFT's peft types -> ours. A CARTRIDGE (PEFT's KV-cache adapter, Eyuboglu et al. 2025) is a
# prefix without projection, stored in prefix tuning's layout, with its first
# `num_frozen_tokens` rows frozen.
_PEFT_TYPES = {"PROMPT_TUNING": "prompt_tuning", "P_TUNING": "p_tuning",
               "PREFIX_TUNING": "prefix_tuning", "CARTRIDGE": "prefix_tuning"}
# Options that only shape the initial weights, and the sizes PEFT records after adjusting them to
# the model (checked against the model by the checkpoint loader): not used when loading weights.
_INIT_FIELDS = ("prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                "tokenizer_kwargs", "init_weights")
_RECORDED_FIELDS = ("token_dim", "num_attention_heads", "num_layers", "inference_mode",
                    "modules_to_save")


def _fields_of(peft_config) -> dict:
    if isinstance(peft_config, dict):
        return dict(peft_config)
    if dataclasses.is_dataclass(peft_config):
        return {f.name: getattr(peft_config, f.name) for f in dataclasses.fields(peft_config)}
    raise TypeError(f"expected a PEFT config (object or dict), got {type(peft_config).__name__}")


def from_peft_config(peft_config, *, for_loading: bool = False
                     ) -> PromptTuningConfig | PTuningConfig | PrefixTuningConfig:
    """Our config from PEFT's PromptTuningConfig / PromptEncoderConfig / PrefixTuningConfig /
    CartridgeConfig (objects or their dict form, e.g. a loaded adapter_config.json): the same
    fields, so the same model. A field we do not know is an error, never dropped.
    `for_loading`: the weights come from a checkpoint, so initialization options do not matter
    and the recorded sizes are checked by the loader; a CARTRIDGE's frozen tokens are then the
    caller's to honour (`frozen_tokens_of`)."""
    d = {k: _enum_value(v) for k, v in _fields_of(peft_config).items()}
    peft_type = _upper(d.pop("peft_type", None))
    if peft_type not in _PEFT_TYPES:
        raise ValueError(f"unsupported PEFT config type {peft_type!r}; expected one of "
                         f"{sorted(_PEFT_TYPES)}")
    cls = _BY_METHOD[_PEFT_TYPES[peft_type]]
    if peft_type == "CARTRIDGE":
        frozen = d.pop("num_frozen_tokens", 1)
        if frozen and not for_loading:
            raise NotImplementedError(
                f"CartridgeConfig(num_frozen_tokens={frozen}): frozen leading tokens are not "
                "supported for training; use num_frozen_tokens=0, or PrefixTuningConfig")
    if for_loading:
        for name in _INIT_FIELDS + _RECORDED_FIELDS:
            d.pop(name, None)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"PEFT {peft_type} config fields {unknown} are not supported by "
                         f"ptuning_fast's {cls.__name__} (it would not honour them)")
    return cls(**d)


def frozen_tokens_of(adapter_config: dict) -> int:
    """Leading prefix rows a PEFT adapter config keeps frozen (a CARTRIDGE's), else 0."""
    if _upper(adapter_config.get("peft_type")) != "CARTRIDGE":
        return 0
    frozen = adapter_config.get("num_frozen_tokens", 1)
    if not _is_int(frozen) or frozen < 0:
        raise ValueError(f"CARTRIDGE `num_frozen_tokens` must be an int >= 0, got {frozen!r}")
    return frozen


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
        "base_model_name_or_path": base_model_name_or_path, "revision": config.revision,
        "inference_mode": True, "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": token_dim, "num_transformer_submodules": dims.num_transformer_submodules,
        "num_attention_heads": heads,
        "num_layers": dims.num_layers, "modules_to_save": modules_to_save or None,
    }
    if config.method == "prompt_tuning":
        # PEFT knows RANDOM / SAMPLE_VOCAB / TEXT (text with a tokenizer path); anything else
        # (LABELS, token ids) is recorded as RANDOM: the checkpoint holds the trained prompt.
        text = config.prompt_tuning_init == "TEXT" and isinstance(
            config.prompt_tuning_init_text, str) and bool(config.tokenizer_name_or_path)
        init = config.prompt_tuning_init if config.prompt_tuning_init in (
            "RANDOM", "SAMPLE_VOCAB") or text else "RANDOM"
        out.update(prompt_tuning_init=init,
                   prompt_tuning_init_text=config.prompt_tuning_init_text if text else None,
                   tokenizer_name_or_path=config.tokenizer_name_or_path if text else None,
                   tokenizer_kwargs=config.tokenizer_kwargs if text else None)
    elif config.method == "p_tuning":
        out.update(encoder_reparameterization_type=config.encoder_reparameterization_type,
                   encoder_hidden_size=encoder_hidden_size,
                   encoder_num_layers=config.encoder_num_layers,
                   encoder_dropout=config.encoder_dropout)
    else:
        out.update(encoder_hidden_size=encoder_hidden_size,
                   prefix_projection=config.prefix_projection, init_weights=config.init_weights)
    return out


def to_dict(config) -> dict:
    """Our own JSON form (kept beside PEFT's, so a round trip loses nothing)."""
    d = dataclasses.asdict(config)
    text = d.get("prompt_tuning_init_text")
    if text is not None and not isinstance(text, str):
        d["prompt_tuning_init_text"] = [list(x) if isinstance(x, (list, tuple)) else x
                                        for x in text]
    return {"method": config.method, **d}


def from_dict(d: dict):
    d = dict(d)
    method = d.pop("method", None)
    if method not in _BY_METHOD:
        raise ValueError(f"unknown ptuning_fast method {method!r}; expected one of "
                         f"{sorted(_BY_METHOD)}")
    return _BY_METHOD[method](**d)     # older files' short names are aliases
