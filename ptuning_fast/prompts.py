"""The trainable modules of the three soft-prompt methods.

Layer structures and parameter names follow PEFT's (`embedding`, `mlp_head`, `lstm_head`,
`transform`), so a state dict maps one to one onto PEFT's prompt encoder, and the tensor PEFT
saves as "prompt_embeddings" is `output_for_checkpoint()` here. With `num_tasks` = T > 1 the
embedding holds T * P rows (task t owns rows [t * P, (t + 1) * P)) and every output gains a
leading task dim.
On encoder-decoder models PEFT's prompt modules hold S = 2 (`num_transformer_submodules`) sets
of P rows per task and run the encoder over all S * P of them, but feed only the first P (to the
encoder input); the same layout here keeps checkpoints and the encoder's function equal.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import (ModelDims, PrefixTuningConfig, PromptTuningConfig, PTuningConfig,
                     layers_wider_than)


class _TaskPrompts(nn.Module):
    """Shared bits: `embedding` of (T * P) rows; `export()` freezes the encoder's output into it."""

    def __init__(self, num_virtual_tokens: int, num_tasks: int, width: int,
                 num_transformer_submodules: int = 1):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.num_tasks = num_tasks
        self.num_transformer_submodules = num_transformer_submodules
        self.embedding = nn.Embedding(num_tasks * self.rows_per_task, width)
        self.exported = False

    @property
    def rows_per_task(self) -> int:
        """Embedding rows of one task: P, or S * P on encoder-decoder models (PEFT's layout)."""
        return self.num_transformer_submodules * self.num_virtual_tokens

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """(T, P, width) embeddings -> (T, P, out) outputs; identity unless reparameterized."""
        return x

    def _encoder_modules(self) -> list[str]:
        return []

    def raw(self) -> torch.Tensor:
        """(T, S * P, out): the encoder's output for every task (S = 1 but on encoder-decoders)."""
        x = self.embedding.weight.view(self.num_tasks, self.rows_per_task, -1)
        return x if self.exported else self._encode(x)

    def output_for_checkpoint(self) -> torch.Tensor:
        """PEFT's "prompt_embeddings": (S * P, out) for one task, (T * S * P, out) for several."""
        return self.raw().reshape(self.num_tasks * self.rows_per_task, -1)

    def _prompt(self) -> torch.Tensor:
        """(P, out), or (T, P, out) with several tasks: the rows the model's input receives."""
        out = self.raw()
        if self.num_transformer_submodules > 1:
            out = out[:, :self.num_virtual_tokens]      # PEFT feeds only the encoder's rows
        return out[0] if self.num_tasks == 1 else out

    @torch.no_grad()
    def export(self) -> None:
        """Replace the encoder by its output (inference; what PEFT keeps in inference mode)."""
        if self.exported or not self._encoder_modules():
            self.exported = True
            return
        was_training = self.training
        self.eval()
        out = self.output_for_checkpoint().detach().clone()
        self.train(was_training)
        trainable = self.embedding.weight.requires_grad
        for name in self._encoder_modules():
            delattr(self, name)
        self.embedding = nn.Embedding(out.shape[0], out.shape[1], device=out.device,
                                      dtype=out.dtype)
        self.embedding.weight.data.copy_(out)
        self.embedding.weight.requires_grad_(trainable)
        self.exported = True

    def load_checkpoint_output(self, prompt_embeddings: torch.Tensor) -> None:
        """Export (if needed) and load PEFT's "prompt_embeddings" into the embedding."""
        self.export()
        want = tuple(self.embedding.weight.shape)
        if tuple(prompt_embeddings.shape) != want:
            raise ValueError(f"checkpoint tensor 'prompt_embeddings' has shape "
                             f"{tuple(prompt_embeddings.shape)}, this model expects {want}")
        with torch.no_grad():
            self.embedding.weight.copy_(prompt_embeddings)


def _vocab_rows(word_embeddings: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return word_embeddings(ids.to(word_embeddings.weight.device)).detach().float()


def _token_ids(text, tokenizer, what: str, special_tokens: bool) -> list[int]:
    """`text` as token ids; `special_tokens`: tokenized as PEFT's TEXT init does (the
    tokenizer's default, BOS/EOS included where it adds them)."""
    if isinstance(text, (list, tuple)) and all(isinstance(i, int) for i in text):
        return list(text)
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string or a list of token ids, got {text!r}")
    if tokenizer is None:
        raise ValueError(f"{what} {text!r} is a string: pass `tokenizer=` to wrap / "
                         "PromptEmbedding.from_config, or set `tokenizer_name_or_path`")
    ids = tokenizer(text)["input_ids"] if special_tokens \
        else tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"{what} {text!r} tokenizes to no tokens")
    return ids


def _load_tokenizer(config: PromptTuningConfig):
    """PEFT's way: AutoTokenizer.from_pretrained(tokenizer_name_or_path, **tokenizer_kwargs),
    never with remote code (PEFT drops trust_remote_code too; here with a warning)."""
    from transformers import AutoTokenizer
    kwargs = dict(config.tokenizer_kwargs or {})
    if kwargs.pop("trust_remote_code", None) is not None:
        warnings.warn("tokenizer_kwargs['trust_remote_code'] is dropped (as PEFT drops it): the "
                      "prompt's tokenizer never runs remote code", stacklevel=4)
    return AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)


class PromptEmbedding(_TaskPrompts):
    """Prompt Tuning. forward() -> (P, d) prompt, or (T, P, d) with several tasks."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, num_tasks: int = 1,
                 num_transformer_submodules: int = 1):
        super().__init__(num_virtual_tokens, num_tasks, token_dim, num_transformer_submodules)

    @classmethod
    def from_config(cls, config: PromptTuningConfig, dims: ModelDims,
                    word_embeddings: nn.Module | None = None, tokenizer=None) -> "PromptEmbedding":
        module = cls(config.num_virtual_tokens, dims.hidden_size, config.num_tasks,
                     dims.num_transformer_submodules)
        init = config.prompt_tuning_init
        if init != "RANDOM" and not config.inference_mode:     # PEFT: inference skips inits
            if word_embeddings is None:
                raise ValueError(f"prompt_tuning_init={init!r} needs the model's word embeddings")
            if tokenizer is None and config.tokenizer_name_or_path:
                tokenizer = _load_tokenizer(config)
            module.init_from_vocab(config, word_embeddings, tokenizer)
        return module

    @torch.no_grad()
    def init_from_vocab(self, config: PromptTuningConfig, word_embeddings: nn.Module,
                        tokenizer=None) -> None:
        P, T = self.rows_per_task, self.num_tasks     # PEFT initializes all S * P rows
        vocab = word_embeddings.weight.shape[0]
        init, text = config.prompt_tuning_init, config.prompt_tuning_init_text
        if init == "SAMPLE_VOCAB":
            rows = _vocab_rows(word_embeddings, torch.randint(0, vocab, (P,)))
        elif init == "TEXT":
            ids = _token_ids(text, tokenizer, "prompt_tuning_init_text", special_tokens=True)
            ids = (ids * math.ceil(P / len(ids)))[:P]    # repeat, then truncate to P tokens
            rows = _vocab_rows(word_embeddings, torch.tensor(ids))
        else:  # "LABELS": Lester et al.'s class-label initialization
            labels = text.split() if isinstance(text, str) else list(text)
            if len(labels) > P:
                raise ValueError(f"{len(labels)} labels for only {P} virtual tokens")
            # Label words without special tokens: a BOS would pull every mean towards it.
            label_rows = [_vocab_rows(word_embeddings, torch.tensor(
                _token_ids(label, tokenizer, "label", special_tokens=False))).mean(0)
                for label in labels]
            rest = _vocab_rows(word_embeddings, torch.randint(0, vocab, (P - len(labels),)))
            rows = torch.cat([torch.stack(label_rows), rest])
        self.embedding.weight.copy_(rows.repeat(T, 1).to(self.embedding.weight))

    def forward(self) -> torch.Tensor:
        return self._prompt()


class PromptEncoder(_TaskPrompts):
    """P-Tuning v1: prompt = MLP(embedding) or MLP(biLSTM(embedding)), PEFT's layer structure.
    forward() -> (P, d) or (T, P, d). `export()` keeps only the output."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, encoder: str = "mlp",
                 encoder_hidden_size: int | None = None, encoder_num_layers: int = 2,
                 encoder_dropout: float = 0.0, num_tasks: int = 1,
                 num_transformer_submodules: int = 1):
        super().__init__(num_virtual_tokens, num_tasks, token_dim, num_transformer_submodules)
        hidden = encoder_hidden_size or token_dim
        encoder = encoder.lower()           # PEFT's "MLP" / "LSTM" or ours
        self.encoder = encoder
        self.encoder_hidden_size = hidden
        if encoder == "lstm":
            self.lstm_head = nn.LSTM(input_size=token_dim, hidden_size=hidden,
                                     num_layers=encoder_num_layers, dropout=encoder_dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(),
                                          nn.Linear(2 * hidden, token_dim))
        elif encoder == "mlp":
            self.mlp_head = nn.Sequential(nn.Linear(token_dim, hidden), nn.ReLU(),
                                          nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, token_dim))
        else:
            raise ValueError(f"`encoder` must be 'mlp' or 'lstm', got {encoder!r}")

    @classmethod
    def from_config(cls, config: PTuningConfig, dims: ModelDims) -> "PromptEncoder":
        return cls(config.num_virtual_tokens, dims.hidden_size,
                   config.encoder_reparameterization_type, config.encoder_hidden_size,
                   config.encoder_num_layers, config.encoder_dropout, config.num_tasks,
                   dims.num_transformer_submodules)

    def _encoder_modules(self) -> list[str]:
        return ["lstm_head", "mlp_head"] if self.encoder == "lstm" else ["mlp_head"]

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.encoder == "lstm":
            x = self.lstm_head(x)[0]          # each task's S * P tokens are one LSTM sequence
        return self.mlp_head(x)

    def forward(self) -> torch.Tensor:
        return self._prompt()


@dataclass
class LayerPrefixes:
    """The output of `PrefixEncoder`: K/V prefixes of every layer, views of one tensor.

    `kv` is (num_layers, 2, Hkv, P, D), or (num_layers, 2, T, Hkv, P, D) with several tasks;
    `layer(i)` gives layer i's (key, value), each (Hkv, P, D) or (T, Hkv, P, D): shared by every
    batch row, never expanded per row. Models whose layers differ in KV heads or head dim
    (Gemma 4) have `per_layer` instead: layer i's (2, [T,] Hkv_i, P, D_i), and `kv` is None.
    """
    kv: torch.Tensor | None
    num_tasks: int
    per_layer: tuple[torch.Tensor, ...] | None = None
    # Every layer's (key, value) views, split on the first `layer()` call: one unbind per
    # forward instead of three indexing ops in each layer's attention call (the layer's prefix
    # is a measured share of a decoding call: bench/NOTES.md, "Per-call cost in generation").
    _layers: list | None = field(default=None, init=False, repr=False, compare=False)

    def _any(self) -> torch.Tensor:
        return self.kv if self.per_layer is None else self.per_layer[0]

    @property
    def num_virtual_tokens(self) -> int:
        return self._any().shape[-2]

    @property
    def num_layers(self) -> int:
        return self.kv.shape[0] if self.per_layer is None else len(self.per_layer)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._layers is None:
            stacked = self.kv.unbind(0) if self.per_layer is None else self.per_layer
            self._layers = [tuple(kv.unbind(0)) for kv in stacked]
        return self._layers[index]

    def to(self, dtype: torch.dtype) -> "LayerPrefixes":
        if self.per_layer is None:
            return LayerPrefixes(self.kv.to(dtype), self.num_tasks)
        return LayerPrefixes(None, self.num_tasks, tuple(t.to(dtype) for t in self.per_layer))


class PrefixEncoder(_TaskPrompts):
    """Prefix Tuning / P-Tuning v2: per-layer key/value prefixes, computed once per step.

    Without projection, `embedding` holds PEFT's flat layout (T * P, num_layers * 2 * Hkv * D),
    where column ((layer * 2 + kv) * Hkv + head) * D + d is one element; with projection,
    `embedding` (T * P, token_dim) feeds `transform` = Linear-Tanh-Linear. forward() ->
    LayerPrefixes. Works for grouped-query models (Hkv < Hq) and any head_dim.
    `layer_shapes` ((Hkv_i, D_i) per layer, for models whose layers differ): layer i reads the
    first Hkv_i heads and D_i dims of its (Hkv, D) prefix, PEFT's layout and slicing; with
    `per_layer_shapes`, each layer has a prefix of its own shape instead: layer i's
    2 * Hkv_i * D_i columns follow layer i - 1's, laid out as above within the layer.
    """

    def __init__(self, num_virtual_tokens: int, num_layers: int, num_kv_heads: int,
                 head_dim: int, token_dim: int | None = None, projection: bool = False,
                 encoder_hidden_size: int | None = None, dropout: float = 0.0,
                 num_tasks: int = 1, init_weights: str | None = None,
                 layer_shapes: tuple | None = None, per_layer_shapes: bool = False):
        if layer_shapes is not None and len(layer_shapes) != num_layers:
            raise ValueError(f"`layer_shapes` must give (kv heads, head dim) for each of the "
                             f"{num_layers} layers, got {len(layer_shapes)}")
        if not per_layer_shapes:
            wider = layers_wider_than(layer_shapes, num_kv_heads, head_dim)
            if wider:
                raise ValueError(f"layers {wider} have more kv heads or wider heads than the "
                                 f"prefix ({num_kv_heads} heads of {head_dim}): it cannot be "
                                 "sliced for them; use per_layer_shapes=True")
        self.per_layer_shapes = per_layer_shapes and layer_shapes is not None
        flat = sum(2 * h * d for h, d in layer_shapes) if self.per_layer_shapes \
            else num_layers * 2 * num_kv_heads * head_dim
        token_dim = token_dim or num_kv_heads * head_dim
        super().__init__(num_virtual_tokens, num_tasks, token_dim if projection else flat)
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.layer_shapes = None if layer_shapes is None else tuple(map(tuple, layer_shapes))
        self.projection = projection
        encoder_hidden_size = encoder_hidden_size or token_dim     # PEFT's default
        self.encoder_hidden_size = encoder_hidden_size
        if projection:
            self.transform = nn.Sequential(nn.Linear(token_dim, encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(encoder_hidden_size, flat))
        if init_weights == "zero":       # PEFT's: the prefix starts at zero
            with torch.no_grad():
                for p in (self.transform[-1].parameters() if projection
                          else self.embedding.parameters()):
                    p.zero_()
        elif init_weights is not None:
            raise ValueError(f"`init_weights` must be None or 'zero', got {init_weights!r}")
        self.dropout = nn.Dropout(dropout)

    @classmethod
    def from_config(cls, config: PrefixTuningConfig, dims: ModelDims) -> "PrefixEncoder":
        return cls(config.num_virtual_tokens, dims.num_layers, dims.num_kv_heads, dims.head_dim,
                   dims.prefix_token_dim, config.prefix_projection,
                   config.encoder_hidden_size, config.dropout, config.num_tasks,
                   config.init_weights, dims.layer_kv_shapes, config.per_layer_shapes)

    def _encoder_modules(self) -> list[str]:
        return ["transform"] if self.projection else []

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform(x) if self.projection else x

    def forward(self) -> LayerPrefixes:
        flat = self.dropout(self.raw())                      # (T, P, sum of 2 * Hkv * D)
        T, P = self.num_tasks, self.num_virtual_tokens
        if not self.per_layer_shapes:
            kv = flat.view(T, P, self.num_layers, 2, self.num_kv_heads, self.head_dim)
            kv = kv.permute(2, 3, 0, 4, 1, 5)                # (L, 2, T, Hkv, P, D), a view
            kv = kv[:, :, 0] if T == 1 else kv
            if self.layer_shapes is None:
                return LayerPrefixes(kv, T)
            return LayerPrefixes(None, T, tuple(layer[..., :heads, :, :dim]   # PEFT's slices
                                                for layer, (heads, dim) in
                                                zip(kv.unbind(0), self.layer_shapes)))
        layers, start = [], 0
        for heads, dim in self.layer_shapes:
            width = 2 * heads * dim
            kv = flat[..., start:start + width].view(T, P, 2, heads, dim)
            kv = kv.permute(2, 0, 3, 1, 4)                   # (2, T, Hkv_i, P, D_i), a view
            layers.append(kv[:, 0] if T == 1 else kv)
            start += width
        return LayerPrefixes(None, T, tuple(layers))
