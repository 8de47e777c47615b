"""The model zoo: every model type of the installed transformers that has a causal-LM,
sequence-classification, token-classification or seq2seq-LM head, built tiny from its config
class's defaults, wrapped for each method and held to PEFT's algorithm run without PEFT
(tests/test_model_zoo.py).

`python -m tests.model_zoo [--head HEAD] [TYPE ...]` prints the outcome of every type and method
(slow: minutes per head); `--markdown` writes docs/model_zoo.md.
"""
from __future__ import annotations

import contextlib
import copy
import os
import warnings

import torch
import transformers
from transformers.models.auto import configuration_auto, modeling_auto

import ptuning_fast as pf

P = 3
VOCAB = 128
# Config fields shrunk to a tiny model, by the names transformers' config classes use.
SIZES = {
    "hidden_size": 64, "d_model": 64, "n_embd": 64, "n_embed": 64, "embed_dim": 64,
    "word_embed_proj_dim": 64, "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2,
    "num_layers": 2, "num_attention_heads": 4, "n_head": 4, "n_heads": 4,
    "num_key_value_heads": 2, "intermediate_size": 96, "ffn_dim": 96, "d_ff": 96, "n_inner": 96,
    "vocab_size": VOCAB, "max_position_embeddings": 128, "n_positions": 128,
    "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "encoder_ffn_dim": 96, "decoder_ffn_dim": 96,
    "rotary_dim": 8, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "kv_lora_rank": 16, "q_lora_rank": 16,
    "num_local_experts": 2, "num_experts": 2, "n_routed_experts": 2,
    "moe_intermediate_size": 32, "num_experts_per_tok": 1, "num_shared_experts": 1,
}
TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
MAX_PARAMETERS = 12_000_000


# head (PEFT's task type) -> (transformers' auto mapping of model type to class, title)
HEADS = {
    "CAUSAL_LM": (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "causal LM"),
    "SEQ_CLS": (modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
                "sequence classification"),
    "TOKEN_CLS": (modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
                  "token classification"),
    "SEQ_2_SEQ_LM": (modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, "seq2seq LM"),
}
LABELS = 3          # classes of the classification heads


def model_types(head: str = "CAUSAL_LM") -> list[str]:
    return sorted(HEADS[head][0])


def _shrink(config) -> None:
    for name, value in {**SIZES, **TOKENS}.items():
        current = getattr(config, name, None)
        if isinstance(current, int) and not isinstance(current, bool):
            with contextlib.suppress(Exception):
                setattr(config, name, value)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        with contextlib.suppress(Exception):
            config.layer_types = list(layer_types)[:2]
    for sub in ("text_config",):
        inner = getattr(config, sub, None)
        if isinstance(inner, transformers.PretrainedConfig):
            _shrink(inner)


def build(model_type: str, head: str = "CAUSAL_LM", seed: int = 0):
    """A tiny random model of `model_type` with `head` (eager attention, eval mode). Raises
    with the reason where the type cannot be built that way."""
    config_class = configuration_auto.CONFIG_MAPPING[model_type]
    defaults = config_class().to_dict()
    # Through the constructor first, so fields derived from the sizes follow them.
    sizes = {k: v for k, v in {**SIZES, **TOKENS}.items()
             if isinstance(defaults.get(k), int) and not isinstance(defaults.get(k), bool)}
    if isinstance(defaults.get("layer_types"), list):
        sizes["layer_types"] = defaults["layer_types"][:SIZES["num_hidden_layers"]]
    try:
        config = config_class(**sizes)
    except Exception:  # noqa: BLE001 — some configs reject a combination; shrink in place
        config = config_class()
    _shrink(config)
    config._attn_implementation = "eager"
    if head in ("SEQ_CLS", "TOKEN_CLS"):
        config.num_labels = LABELS
    if head == "SEQ_CLS" and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = TOKENS["pad_token_id"]     # it finds each row's last token by it
    if getattr(config, "is_encoder_decoder", False) \
            and getattr(config, "decoder_start_token_id", None) is None:
        config.decoder_start_token_id = TOKENS["pad_token_id"]     # T5's convention
    cls = getattr(transformers, HEADS[head][0][model_type])
    with torch.device("meta"):
        count = sum(p.numel() for p in cls(config).parameters())
    if count > MAX_PARAMETERS:
        raise MemoryError(f"{count / 1e6:.1f}M parameters after shrinking the config")
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        model(**inputs(head))           # it runs at all
    return model


def inputs(head: str = "CAUSAL_LM", rows: int = 2, length: int = 6, seed: int = 1):
    """Ids with left padding in one row (pad id 0 there); a sequence classifier's rows end in
    EOS (encoder-decoder classifiers pool there); a seq2seq model also gets its decoder's
    targets, which it needs to run."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, length), generator=g)
    if head == "SEQ_CLS":
        ids[:, -1] = TOKENS["eos_token_id"]
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    batch = {"input_ids": ids.masked_fill(mask == 0, TOKENS["pad_token_id"]),
             "attention_mask": mask}
    if head == "SEQ_2_SEQ_LM":
        batch["labels"] = torch.randint(3, VOCAB, (rows, 4), generator=g)
    return batch


def targets(head: str, batch: dict):
    """The labels a training step of `head` takes."""
    g = torch.Generator().manual_seed(2)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if head == "SEQ_CLS":
        return torch.randint(0, LABELS, (ids.shape[0],), generator=g)
    if head == "TOKEN_CLS":
        return torch.randint(0, LABELS, ids.shape, generator=g).masked_fill(mask == 0, -100)
    if head == "SEQ_2_SEQ_LM":
        return batch["labels"]
    return ids.masked_fill(mask == 0, -100)


CONFIGS = {
    "prompt": lambda: pf.PromptTuningConfig(P),
    "ptuning": lambda: pf.PTuningConfig(P, encoder_hidden_size=16),
    "prefix": lambda: pf.PrefixTuningConfig(P),
}


def _peft_algorithm(ours, head, batch, labels):
    """PEFT's function without PEFT, on copies: the prompt concatenated in front of the
    (encoder's) embeddings (prompt tuning, P-Tuning), or each layer's prefix in the model's own
    KV cache (prefix tuning; an encoder-decoder's in its decoder's self-attention cache, as
    PEFT's get_prompt lays it out), the model's own eager attention computing. Returns
    (logits, loss, parameters)."""
    from models import MaterializedPrompt, cache_kwarg, seq2seq_prefix_cache, token_cls_loss
    twin = MaterializedPrompt(ours)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if ours.ptuning_config.method == "prefix_tuning":
        if head == "SEQ_2_SEQ_LM":
            cache = seq2seq_prefix_cache(twin, twin.base_model, ids.shape[0])
            out = twin.base_model(input_ids=ids, attention_mask=mask, labels=labels,
                                  use_cache=True, **{cache_kwarg(twin.base_model): cache})
        else:
            out = twin(input_ids=ids, attention_mask=mask, labels=labels)
        return out.logits, out.loss, twin.trainable_parameters()
    prompt = twin.prompt_encoder()
    embeds = twin.base_model.get_input_embeddings()(ids)
    rows = prompt.to(embeds.dtype).expand(ids.shape[0], *prompt.shape)
    given = {"inputs_embeds": torch.cat([rows, embeds], 1),
             "attention_mask": torch.cat([mask.new_ones(ids.shape[0], P), mask], 1)}
    if head == "CAUSAL_LM":
        given["labels"] = torch.cat([labels.new_full((ids.shape[0], P), -100), labels], 1)
    elif head != "TOKEN_CLS":
        given["labels"] = labels
    out = twin.base_model(**given)
    loss = token_cls_loss(out.logits, labels) if head == "TOKEN_CLS" else out.loss
    return out.logits, loss, twin.trainable_parameters()


def check_type(model_type: str, head: str = "CAUSAL_LM") -> dict[str, tuple[str, str]]:
    """{method: (outcome, detail)} for one model type and head; the base model is built once."""
    try:
        base = build(model_type, head)
    except Exception as err:  # noqa: BLE001 — any reason a type cannot be built is listed
        reason = f"{type(err).__name__}: {err}".splitlines()[0][:160]
        return {method: ("unbuildable", reason) for method in CONFIGS}
    return {method: check(copy.deepcopy(base), method, head) for method in CONFIGS}


def check(base, method: str, head: str = "CAUSAL_LM") -> tuple[str, str]:
    """(outcome, detail) of `method` on `base`: "equal" (logits, loss and every trainable
    gradient equal PEFT's algorithm, and the soft prompt changes the output; the detail starts
    with the path taken), "refused" (wrap
    raised an error naming the model), "DIFFERS" or "ERROR" (failures)."""
    name = type(base).__name__
    with torch.no_grad():
        plain = base(**inputs(head)).logits
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = pf.wrap(base, CONFIGS[method]())
    except Exception as err:  # noqa: BLE001 — a refusal must be one of these, by name
        if isinstance(err, (NotImplementedError, ValueError, TypeError)) and name in str(err):
            return "refused", f"{type(err).__name__}: {err}"[:300]
        return "ERROR", f"wrap failed without naming {name}: {type(err).__name__}: {err}"[:300]
    with torch.no_grad():
        for p in ours.prompt_encoder.parameters():
            p.normal_(0, 0.5)
    batch = inputs(head)
    labels = targets(head, batch)
    batch.pop("labels", None)
    try:
        their_logits, their_loss, params = _peft_algorithm(ours, head, batch, labels)
        their_loss.backward()
    except Exception as err:  # noqa: BLE001 — no PEFT function to be equal to
        peft_error = f"{type(err).__name__}: {err}".splitlines()[0][:160]
    else:
        peft_error = None
    try:
        mine = ours(**batch, labels=labels)
        mine.loss.backward()
    except Exception as err:  # noqa: BLE001 — reported, the test fails on it
        if isinstance(err, (NotImplementedError, ValueError, TypeError)) and name in str(err):
            return "refused", f"{type(err).__name__} at the first forward: {err}"[:300]
        if peft_error is not None:
            return "no function", f"PEFT's algorithm fails too: {peft_error}"
        return "ERROR", f"{type(err).__name__}: {err}"[:300]
    if peft_error is not None:
        return "ERROR", f"ours runs where PEFT's algorithm fails: {peft_error}"
    logits = mine.logits[:, -plain.shape[1]:]
    if logits.shape == plain.shape and torch.allclose(logits, plain, atol=1e-4):
        return "DIFFERS", "the soft prompt does not change the output"
    if mine.logits.shape != their_logits.shape:
        return "DIFFERS", f"logits of shape {tuple(mine.logits.shape)}, PEFT's " \
                          f"{tuple(their_logits.shape)}"
    errors = {"logits": (mine.logits - their_logits).abs().max().item(),
              "loss": (mine.loss - their_loss).abs().item()}
    for n, p in ours.trainable_parameters().items():
        errors[n] = (p.grad - params[n].grad).abs().max().item() / \
            max(params[n].grad.abs().max().item(), 1e-6)
    worst = max(errors, key=errors.get)
    if errors[worst] > 1e-4:
        return "DIFFERS", f"{worst} off by {errors[worst]:.2e}"
    return "equal", f"{path_taken(ours)}; worst {worst} {errors[worst]:.1e}"


def path_taken(ours) -> str:
    """"fast" where the wrapped model takes ptuning_fast's fast path (the prefix handed to its
    attention kernels; the prompt computed once per task), else "PEFT's way"."""
    return "fast" if ours.uses_own_attention else "PEFT's way"


DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "model_zoo.md")
HEADER = f"""# The model zoo: every causal LM, classifier and seq2seq LM of transformers {transformers.__version__}

Generated by `python -m tests.model_zoo --markdown > docs/model_zoo.md`; tests/test_model_zoo.py
runs every row again and fails where this file no longer says what happens. Each model type with
a causal-LM, sequence-classification, token-classification or seq2seq-LM head in that
transformers is built tiny from its config class's defaults (hidden size 64, 2 layers, 4 heads, 3
labels), wrapped for each method ({P} virtual tokens) and compared with PEFT's algorithm run
without PEFT (the prompt concatenated in front of the (encoder's) embeddings; each layer's prefix
in the model's own KV cache, an encoder-decoder's in its decoder's self-attention cache as PEFT
lays it out): logits, loss and every trainable gradient, on a batch with padding. A token
classifier's loss is taken over the real tokens on both sides (PEFT does not pad its labels for a
prompt).

- **same, fast**: equal to PEFT's function through ptuning_fast's fast path (the prefix handed to
  its attention kernels; the prompt computed once per task), a model type verified here or in the
  model matrix of README.md.
- **same, PEFT's way**: equal to PEFT's function by taking PEFT's own way (the prefix through the
  model's KV cache and its own attention; the prompt concatenated): `wrap` warns that the type's
  fast path is not verified.
- **refused**: `wrap` (or, where marked, the first forward) raises an error naming the model class
  and the reason.
- **no function**: PEFT's algorithm itself fails on this model (the error is given), and so does
  `wrap`'s model: there is no function to compute.
- **not built here**: the sweep could not build a tiny model of this type from its config's
  defaults (the reason is given); nothing is claimed for it.
"""
TABLE = """
| model type | Prompt Tuning | P-Tuning | Prefix Tuning |
|---|---|---|---|
"""


def _cell(model_type: str, method: str, outcome: str, detail: str) -> str:
    if outcome == "equal":
        return "same, " + detail.split(";")[0]
    if outcome == "refused":
        return f"refused ({detail.split(':')[0]})"
    if outcome == "no function":
        return "no function: " + detail.replace("|", "/")
    if outcome == "unbuildable":
        return "not built here: " + detail.replace("|", "/")
    return f"{outcome}: {detail}".replace("|", "/")


def markdown_row(model_type: str, outcomes: dict) -> str:
    cells = [_cell(model_type, m, *outcomes[m]) for m in CONFIGS]
    if len(set(cells)) == 1 and cells[0].startswith("not built here"):
        cells = [cells[0], "", ""]
    return f"| `{model_type}` | " + " | ".join(cells) + " |"


def documented_rows() -> dict[tuple[str, str], str]:
    """{(head, model type): its row} of docs/model_zoo.md."""
    titles = {f"## {title} ({head})": head for head, (_, title) in HEADS.items()}
    rows, head = {}, None
    with open(DOC) as f:
        for line in f:
            head = titles.get(line.strip(), head)
            if line.startswith("| `"):
                rows[head, line.split("`")[1]] = line.rstrip("\n")
    return rows


OUTCOMES = ("same, fast", "same, PEFT's way", "refused", "no function")


def summary(rows: dict[tuple[str, str], str]) -> str:
    """The README's table: per head, the model types and how many cells (type x method) of the
    built ones end in each outcome, counted from docs/model_zoo.md's rows."""
    lines = ["| head | model types | built | " + " | ".join(OUTCOMES) + " |",
             "|---|---|---|" + "---|" * len(OUTCOMES)]
    for head, (_, title) in HEADS.items():
        mine = [row for (h, _), row in sorted(rows.items()) if h == head]
        built = [row for row in mine if "not built here" not in row]
        cells = [c.strip() for row in built for c in row.split(" | ")[1:]]
        counts = [sum(c.strip(" |").startswith(o) for c in cells) for o in OUTCOMES]
        lines.append(f"| {title} | {len(mine)} | {len(built)} | "
                     + " | ".join(map(str, counts)) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m tests.model_zoo")
    parser.add_argument("--markdown", action="store_true", help="write docs/model_zoo.md's text")
    parser.add_argument("--summary", action="store_true",
                        help="print the README's table, counted from docs/model_zoo.md")
    parser.add_argument("--head", choices=list(HEADS), action="append",
                        help="only this head (repeatable; default: every head)")
    parser.add_argument("types", nargs="*", help="only these model types")
    args = parser.parse_args()
    heads = args.head or list(HEADS)
    if args.summary:
        print(summary(documented_rows()), end="")
        return
    if args.markdown:
        print(HEADER, end="")
    for head in heads:
        if args.markdown:
            print(f"\n## {HEADS[head][1]} ({head})\n{TABLE}", end="")
        for model_type in args.types or model_types(head):
            outcomes = check_type(model_type, head)
            if args.markdown:
                print(markdown_row(model_type, outcomes), flush=True)
                continue
            for method, (outcome, detail) in outcomes.items():
                print(f"{head:12} {model_type:28} {method:8} {outcome:12} {detail}", flush=True)


if __name__ == "__main__":
    main()
