"""The model matrix: family x method x task, each cell either tested to be the same function as
PEFT (tests/test_model_matrix.py) or a clear error whose type and message are declared here and
checked by the same tests. The README's table is generated from this data:

    python -m tests.model_matrix --markdown      # from the repo root

and tests/test_model_matrix.py checks that the README holds exactly that table, so neither can
drift. Tiny random configs (1-2 layers, hidden 32), no downloads.
"""
from __future__ import annotations

import argparse
import re
import textwrap
from dataclasses import dataclass, field

import transformers

VOCAB = 97

METHODS = {"prompt": "Prompt Tuning", "ptuning_mlp": "P-Tuning (MLP)",
           "ptuning_lstm": "P-Tuning (LSTM)", "prefix": "Prefix Tuning / P-Tuning v2"}
TASKS = {"CAUSAL_LM": "causal LM", "SEQ_CLS": "sequence classification",
         "TOKEN_CLS": "token classification", "QUESTION_ANS": "question answering",
         "SEQ_2_SEQ_LM": "seq2seq LM"}
HEAD_SUFFIX = {"CAUSAL_LM": "ForCausalLM", "SEQ_CLS": "ForSequenceClassification",
               "TOKEN_CLS": "ForTokenClassification", "QUESTION_ANS": "ForQuestionAnswering",
               "SEQ_2_SEQ_LM": "ForConditionalGeneration"}


@dataclass(frozen=True)
class Refusal:
    """A cell that raises: `error` (exception class name) with `message` (a substring of the
    message, checked by the tests), at `when` ("wrap" or "forward")."""
    error: str
    message: str
    when: str
    why: str = ""           # the README note's explanation, when the message needs one


@dataclass(frozen=True)
class Family:
    name: str                      # the table's row label
    prefix: str                    # transformers class-name prefix ("Llama" -> LlamaForCausalLM)
    config: str                    # transformers config class
    config_kwargs: dict
    tasks: tuple
    # method -> Refusal (every task of the family)
    refusals: dict = field(default_factory=dict)
    # task -> class name, where transformers' naming differs (GPT2LMHeadModel)
    classes: dict = field(default_factory=dict)

    def build(self, task: str, seed: int = 0):
        """A tiny random model of this family with the head of `task`, in eval mode."""
        import torch
        torch.manual_seed(seed)
        kwargs = dict(self.config_kwargs)
        if task in ("SEQ_CLS", "TOKEN_CLS"):
            kwargs["num_labels"] = 3
        elif task == "QUESTION_ANS":
            kwargs["num_labels"] = 2
        config = getattr(transformers, self.config)(**kwargs)
        cls = getattr(transformers, self.classes.get(task, self.prefix + HEAD_SUFFIX[task]))
        return cls(config).eval()


_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=128, pad_token_id=0,
                bos_token_id=1, eos_token_id=2, attn_implementation="eager",
                tie_word_embeddings=False)
_ENCODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=130, pad_token_id=0,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                attn_implementation="eager")
_LM = ("CAUSAL_LM", "SEQ_CLS")
_ENCODER_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")

# Falcon computes attention itself: its prefix goes through the KV cache (README note [f]).
_FALCON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, hidden_dropout=0.0,
               attention_dropout=0.0, attn_implementation="eager")
_FALCON_MULTI_QUERY = Refusal(
    "NotImplementedError", "prefix tuning on Falcon with multi-query attention", "wrap",
    "PEFT sizes the prefix for every query head while these layers have one key head, and its "
    "forward fails (\"RuntimeError: Sizes of tensors must match except in dimension 2\"; "
    "tested): there is no PEFT function to match.")
_DEBERTA_PREFIX = Refusal(
    "NotImplementedError", "prefix tuning on DeBERTa is not supported", "wrap",
    "DeBERTa's attention is computed in its own code (not through AttentionInterface) and "
    "takes no KV cache, so a prefix has no way in without patching the model. PEFT 0.21 "
    "refuses it too: \"ValueError: Model does not support past key values which are required "
    "for prefix tuning.\" (tested). P-Tuning v2's own code edits DeBERTa's attention module "
    "instead (prefix keys and values without relative-position bias).")
# transformers >= 5.25 reports multi-query Falcon's one key head: PEFT sizes the prefix to it.
_MULTI_QUERY_FALCON_HAS_ONE_KV_HEAD = getattr(transformers.FalconConfig(multi_query=True),
                                              "num_key_value_heads", None) == 1
# Families whose prefix reaches the model's own attention through its KV cache.
OWN_ATTENTION_PREFIX = ("Falcon", "StableLm", "Nemotron")

FAMILIES = [
    Family("Llama", "Llama", "LlamaConfig",
           dict(_DECODER, num_key_value_heads=2, head_dim=16), _LM),
    Family("Mistral", "Mistral", "MistralConfig",
           dict(_DECODER, num_key_value_heads=2, sliding_window=None), _LM),
    Family("Mistral, sliding window 6", "Mistral", "MistralConfig",
           dict(_DECODER, num_key_value_heads=2, sliding_window=6), _LM),
    Family("Qwen2", "Qwen2", "Qwen2Config", dict(_DECODER, num_key_value_heads=1), _LM),
    Family("Qwen3", "Qwen3", "Qwen3Config",
           dict(_DECODER, num_key_value_heads=2, head_dim=16), _LM),
    Family("Gemma", "Gemma", "GemmaConfig", dict(_DECODER, num_key_value_heads=1, head_dim=8),
           _LM),
    Family("Gemma 2", "Gemma2", "Gemma2Config",
           dict(_DECODER, num_key_value_heads=2, head_dim=8), _LM),
    Family("Gemma 3", "Gemma3", "Gemma3TextConfig",
           dict(_DECODER, num_key_value_heads=2, head_dim=8, sliding_window=64), ("CAUSAL_LM",)),
    Family("Gemma 3 (text classifier)", "Gemma3Text", "Gemma3TextConfig",
           dict(_DECODER, num_key_value_heads=2, head_dim=8, sliding_window=64), ("SEQ_CLS",)),
    Family("Phi-3", "Phi3", "Phi3Config", dict(_DECODER, num_key_value_heads=2), _LM),
    Family("GPT-NeoX", "GPTNeoX", "GPTNeoXConfig",
           dict(_DECODER, hidden_dropout=0.0, attention_dropout=0.0), _LM),
    Family("GPT-2", "GPT2", "GPT2Config",
           dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, resid_pdrop=0.0,
                embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager"), _LM,
           classes={"CAUSAL_LM": "GPT2LMHeadModel"}),
    Family("OPT", "OPT", "OPTConfig",
           dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=128,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, dropout=0.0,
                attention_dropout=0.0, attn_implementation="eager"), _LM),
    Family("Falcon (multi-query, as Falcon-7B)", "Falcon", "FalconConfig", _FALCON, _LM,
           {} if _MULTI_QUERY_FALCON_HAS_ONE_KV_HEAD else {"prefix": _FALCON_MULTI_QUERY}),
    Family("Falcon, new decoder architecture", "Falcon", "FalconConfig",
           dict(_FALCON, new_decoder_architecture=True, num_kv_heads=2), _LM),
    Family("Falcon-RW (ALiBi)", "Falcon", "FalconConfig",
           dict(_FALCON, alibi=True, multi_query=False, parallel_attn=False, bias=True), _LM),
    Family("StableLM", "StableLm", "StableLmConfig", dict(_DECODER, num_key_value_heads=2), _LM),
    Family("Nemotron", "Nemotron", "NemotronConfig", dict(_DECODER, num_key_value_heads=2), _LM),
    Family("GPT-OSS", "GptOss", "GptOssConfig",
           dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                num_experts_per_tok=1, max_position_embeddings=64,
                layer_types=["full_attention"], pad_token_id=0, bos_token_id=1,
                eos_token_id=2, attn_implementation="eager"), _LM),
    Family("BERT", "Bert", "BertConfig", dict(_ENCODER, max_position_embeddings=128),
           _ENCODER_TASKS),
    Family("RoBERTa", "Roberta", "RobertaConfig", _ENCODER, _ENCODER_TASKS),
    Family("DeBERTa-v2", "DebertaV2", "DebertaV2Config", dict(_ENCODER), _ENCODER_TASKS,
           {"prefix": _DEBERTA_PREFIX}),
    Family("T5 / Flan-T5", "T5", "T5Config",
           dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=32, num_layers=2,
                num_decoder_layers=2, num_heads=4, pad_token_id=0, eos_token_id=2,
                decoder_start_token_id=0, dropout_rate=0.0, feed_forward_proj="gated-gelu"),
           ("SEQ_2_SEQ_LM",)),
    Family("BART", "Bart", "BartConfig",
           dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=32,
                decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
                dropout=0.0, attention_dropout=0.0, init_std=0.2, attn_implementation="eager"),
           ("SEQ_2_SEQ_LM",)),
]
FAMILY = {f.name: f for f in FAMILIES}

# Where PEFT cannot serve as the reference, the tests compare with PEFT's algorithm run without
# PEFT (tests/models.py MaterializedPrompt: the unwrapped model with the prefix in its KV cache)
# and check that PEFT indeed refuses.
PEFT_REFUSES_PREFIX = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")


def cells():
    """(family, task, method, refusal or None) for every cell of the matrix."""
    return [(f, task, method, f.refusals.get(method))
            for f in FAMILIES for task in f.tasks for method in METHODS]


def cell_id(family: Family, task: str, method: str) -> str:
    return f"{re.sub(r'[^a-z0-9]+', '_', family.name.lower()).strip('_')}-{task}-{method}"


# ------------------------------------------------------------------------------------------
# The README table

_NOTES = {
    "materialized": "PEFT 0.21 refuses prefix tuning on these heads with transformers 5 (\"Model "
                    "does not support past key values\"); compared with PEFT's algorithm run "
                    "without PEFT: the unwrapped model with the prefix in its KV cache.",
    "token_labels": "PEFT raises on `labels` here (it does not pad them for the prompt "
                    "positions); logits and gradients compared with PEFT's, the loss with "
                    "cross-entropy over the real tokens, which is what ours returns.",
    "qa_positions": "As in PEFT, `start_positions` / `end_positions` index the P + L outputs "
                    "(the prompt's P positions first); the logits are (B, P + L).",
    "generation": "Causal LM generation (greedy, beam) is compared with PEFT's algorithm run "
                  "without PEFT, and with PEFT's own generate() wherever that agrees with it "
                  "(PEFT's prefix generation does not with transformers 5.24: it injects its "
                  "cache under the old argument name `past_key_values`; on OPT with a prompt, "
                  "PEFT's generate() raises a size mismatch in OPT's position embeddings, and on "
                  "Falcon-RW one between its ALiBi bias and the causal mask).",
    "seq2seq_prefix": "BART's and T5's prefixes are placed as PEFT places them: the decoder's "
                      "self-attention only (decoder layer i gets layer (2 i) mod L's prefix, "
                      "so with an even L the odd layers' prefixes are never read), decoder "
                      "positions from P (BART's learned positions; T5's relative position bias "
                      "over the prefix). Generation (greedy, beam search, sampling with a fixed "
                      "seed; mixed tasks, each row with its task's prefix) compared with PEFT's "
                      "algorithm run without PEFT: transformers' generate() of the unwrapped "
                      "model from PEFT's prefix cache, which beam search reorders. PEFT's own "
                      "generate() drops the prefix with transformers 5.24 (it passes its cache "
                      "as `past_key_values` beside generate()'s `cache`, which the model uses): "
                      "its tokens are the base model's without prefix.",
    "own_attention": "Falcon's, StableLM's and Nemotron's layers do not hand the forward's "
                     "keyword arguments to their attention (Falcon before transformers 5.25 "
                     "computed it in its own code): the prefix reaches it through the KV "
                     "cache it is "
                     "given (PEFT's way), so the model's own eager or SDPA attention computes "
                     "and ptuning_fast's kernels and `backend=` are not used there. The cache "
                     "stores no prefix (gradient checkpointing works; generate() keeps real "
                     "tokens only). tests/test_falcon_prefix.py adds rotary Falcon with "
                     "multi_query=False, SDPA attention and token classification; the QA head "
                     "takes no cache and is refused.",
}


def _cell_text(family, task, method, refusal, errors: dict) -> str:
    if refusal is not None:
        key = (refusal.error, refusal.message, refusal.when, refusal.why)
        errors.setdefault(key, f"E{len(errors) + 1}")
        return f"{refusal.error} ({errors[key]})"
    if method == "prefix" and family.prefix in OWN_ATTENTION_PREFIX:
        return _supported_text(family, task, method) + " [f]"
    return _supported_text(family, task, method)


def _supported_text(family, task, method) -> str:
    if method == "prefix" and task in PEFT_REFUSES_PREFIX:
        return "same as PEFT's algorithm [a]"
    if method != "prefix" and task == "TOKEN_CLS":
        return "same as PEFT [b]"
    if method != "prefix" and task == "QUESTION_ANS":
        return "same as PEFT [c]"
    if task == "CAUSAL_LM":
        return "same as PEFT [d]"
    if task == "SEQ_2_SEQ_LM" and method == "prefix":
        return "same as PEFT [e]"
    return "same as PEFT"


def markdown() -> str:
    """The README table: one row per family and task, one column per method."""
    errors: dict = {}
    lines = ["| family | task | " + " | ".join(METHODS.values()) + " |",
             "|---|---|" + "---|" * len(METHODS)]
    for family in FAMILIES:
        for task in family.tasks:
            row = [_cell_text(family, task, m, family.refusals.get(m), errors) for m in METHODS]
            lines.append(f"| {family.name} | {TASKS[task]} | " + " | ".join(row) + " |")
    notes = [f"[{key}] {_NOTES[name]}" for key, name in (
        ("a", "materialized"), ("b", "token_labels"), ("c", "qa_positions"), ("d", "generation"),
        ("e", "seq2seq_prefix"), ("f", "own_attention"))]
    notes += [f"{key}: `{error}` at {when} time, its message containing \"{message}\""
              + (f". {why}" if why else "") for (error, message, when, why), key in errors.items()]
    lines.append("")
    lines += [textwrap.fill(note, 100, initial_indent="- ", subsequent_indent="  ")
              for note in notes]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print the README table")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown(), end="")
    else:
        for family, task, method, refusal in cells():
            print(cell_id(family, task, method), "refused" if refusal else "same as PEFT")


if __name__ == "__main__":
    main()
