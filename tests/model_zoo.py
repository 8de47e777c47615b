"""The model zoo: every model type of the installed transformers that has a causal-LM head,
built tiny from its config class's defaults, wrapped for each method and held to PEFT's
algorithm run without PEFT (tests/test_model_zoo.py).

`python -m tests.model_zoo` prints the outcome of every type and method (slow: minutes).
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


def causal_lm_types() -> list[str]:
    return sorted(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


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


def build(model_type: str, seed: int = 0):
    """A tiny random causal LM of `model_type` (eager attention, eval mode). Raises with the
    reason where the type cannot be built that way."""
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
    cls = getattr(transformers, modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    with torch.device("meta"):
        count = sum(p.numel() for p in cls(config).parameters())
    if count > MAX_PARAMETERS:
        raise MemoryError(f"{count / 1e6:.1f}M parameters after shrinking the config")
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        model(**inputs())           # it runs at all
    return model


def inputs(rows: int = 2, length: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0                                    # left padding in one row
    return {"input_ids": ids, "attention_mask": mask}


CONFIGS = {
    "prompt": lambda: pf.PromptTuningConfig(P),
    "ptuning": lambda: pf.PTuningConfig(P, encoder_hidden_size=16),
    "prefix": lambda: pf.PrefixTuningConfig(P),
}


def _peft_algorithm(ours, batch, labels):
    """PEFT's function without PEFT, on copies: the prompt concatenated in front of the
    embeddings (prompt tuning, P-Tuning) or each layer's prefix in the model's own KV cache
    (prefix tuning), the model's own eager attention computing. Returns (output, parameters)."""
    from models import MaterializedPrompt
    twin = MaterializedPrompt(ours)
    if ours.ptuning_config.method == "prefix_tuning":
        return twin(**batch, labels=labels), twin.trainable_parameters()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    prompt = twin.prompt_encoder()
    embeds = twin.base_model.get_input_embeddings()(ids)
    rows = prompt.to(embeds.dtype).expand(ids.shape[0], *prompt.shape)
    out = twin.base_model(inputs_embeds=torch.cat([rows, embeds], 1),
                          attention_mask=torch.cat([mask.new_ones(ids.shape[0], P), mask], 1),
                          labels=torch.cat([labels.new_full((ids.shape[0], P), -100), labels], 1))
    return out, twin.trainable_parameters()


def check_type(model_type: str) -> dict[str, tuple[str, str]]:
    """{method: (outcome, detail)} for one model type; the base model is built once."""
    try:
        base = build(model_type)
    except Exception as err:  # noqa: BLE001 — any reason a type cannot be built is listed
        reason = f"{type(err).__name__}: {err}".splitlines()[0][:160]
        return {method: ("unbuildable", reason) for method in CONFIGS}
    return {method: check(copy.deepcopy(base), method) for method in CONFIGS}


def check(base, method: str) -> tuple[str, str]:
    """(outcome, detail) of `method` on `base`: "equal" (logits, loss and every trainable
    gradient equal PEFT's algorithm, and the soft prompt changes the output), "refused" (wrap
    raised an error naming the model), "DIFFERS" or "ERROR" (failures)."""
    name = type(base).__name__
    with torch.no_grad():
        plain = base(**inputs()).logits
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
    batch = inputs()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    try:
        theirs, params = _peft_algorithm(ours, batch, labels)
        theirs.loss.backward()
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
    if torch.allclose(logits, plain, atol=1e-4):
        return "DIFFERS", "the soft prompt does not change the output"
    errors = {"logits": (mine.logits - theirs.logits).abs().max().item(),
              "loss": (mine.loss - theirs.loss).abs().item()}
    for n, p in ours.trainable_parameters().items():
        errors[n] = (p.grad - params[n].grad).abs().max().item() / \
            max(params[n].grad.abs().max().item(), 1e-6)
    worst = max(errors, key=errors.get)
    if errors[worst] > 1e-4:
        return "DIFFERS", f"{worst} off by {errors[worst]:.2e}"
    return "equal", f"worst {worst} {errors[worst]:.1e}"


DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "model_zoo.md")
HEADER = f"""# The model zoo: every causal LM of transformers {transformers.__version__}

Generated by `python -m tests.model_zoo --markdown > docs/model_zoo.md`; tests/test_model_zoo.py
runs every row again and fails where this file no longer says what happens. Each model type with a
causal-LM head in that transformers is built tiny from its config class's defaults (hidden size
64, 2 layers, 4 heads), wrapped for each method ({P} virtual tokens) and compared with PEFT's
algorithm run without PEFT (the prompt concatenated in front of the embeddings; each layer's prefix
in the model's own KV cache): logits, loss and every trainable gradient, on a batch with padding.

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

| model type | Prompt Tuning | P-Tuning | Prefix Tuning |
|---|---|---|---|
"""


def _cell(model_type: str, method: str, outcome: str, detail: str) -> str:
    from ptuning_fast.integrations import support
    if outcome == "equal":
        verified = support.PREFIX_ATTENTION_VERIFIED if method == "prefix" \
            else support.SHARED_PROMPT_VERIFIED
        return "same, fast" if model_type in verified else "same, PEFT's way"
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


def documented_rows() -> dict[str, str]:
    with open(DOC) as f:
        return {line.split("`")[1]: line.rstrip("\n") for line in f if line.startswith("| `")}


def main() -> None:
    import sys
    args = sys.argv[1:]
    if args[:1] == ["--markdown"]:
        print(HEADER, end="")
        for model_type in causal_lm_types():
            print(markdown_row(model_type, check_type(model_type)), flush=True)
        return
    for model_type in args or causal_lm_types():
        for method, (outcome, detail) in check_type(model_type).items():
            print(f"{model_type:28} {method:8} {outcome:12} {detail}", flush=True)


if __name__ == "__main__":
    main()
