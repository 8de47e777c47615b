"""What PEFT's example notebooks download, made here instead: a tiny model from a config, saved
to a folder (the examples then load it with `from_pretrained(path)` as they load a Hub name),
a word-level tokenizer over a few words, and small made-up datasets of the notebooks' shape.

No download and no GPU needed: each example runs in seconds on a CPU. The numbers they print
say only that training runs and the loss moves, nothing about the methods' quality.
"""
from __future__ import annotations

import random
import tempfile

WORDS = ("my order never arrived and nobody answers the phone thanks for the quick help "
         "great service love it still waiting on a refund terrible support bad "
         "shares rise fall profit loss market stocks report quarter company "
         "Tweet text Label : Classify if tweet is complaint or not no Bearish Bullish Neutral"
         ).split()
SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")


def tokenizer_folder(padding_side: str = "right") -> str:
    """A saved fast word-level tokenizer over WORDS (pad 0, bos 1 added in front, eos 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {token: i for i, token in enumerate(SPECIAL)}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                        special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>",
                                        padding_side=padding_side)
    folder = tempfile.mkdtemp(prefix="tiny-tokenizer-")
    tokenizer.save_pretrained(folder)
    return folder


def model_folder(kind: str) -> str:
    """A tiny randomly initialised model saved to a new folder, with the tokenizer beside it:
    "causal_lm" (Llama), "seq_cls" (RoBERTa, 2 labels) or "seq2seq" (T5). Seeded: the same
    weights every call.

    T5's dropout is off: with prefix tuning its attention runs ptuning_fast's function, whose
    attention dropout draws its keep-mask from its own counter-based generator (keyed by row,
    head, query and key), not from torch's generator as T5's eager attention under PEFT does.
    Both drop with the same probability, but other elements: the loss curves then agree only in
    expectation, and the examples' test compares them step by step."""
    import torch
    import transformers as T
    vocab = len(SPECIAL) + len(set(WORDS))
    torch.manual_seed(0)
    if kind == "causal_lm":
        model = T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            pad_token_id=0, bos_token_id=1, eos_token_id=2))
    elif kind == "seq_cls":
        model = T.RobertaForSequenceClassification(T.RobertaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=160, pad_token_id=0, num_labels=2))
    elif kind == "seq2seq":
        model = T.T5ForConditionalGeneration(T.T5Config(
            vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            pad_token_id=0, eos_token_id=2, decoder_start_token_id=0, dropout_rate=0.0))
    else:
        raise ValueError(f"`kind` must be 'causal_lm', 'seq_cls' or 'seq2seq', got {kind!r}")
    folder = tempfile.mkdtemp(prefix=f"tiny-{kind}-")
    model.save_pretrained(folder)
    T.AutoTokenizer.from_pretrained(tokenizer_folder()).save_pretrained(folder)
    return folder


def complaints(rows: int = 32, seed: int = 0) -> dict:
    """RAFT's twitter_complaints shape: "Tweet text", "Label" (0 no complaint, 1 complaint)."""
    rng = random.Random(seed)
    complaint = "my order never arrived and nobody answers the phone still waiting on a refund"
    praise = "thanks for the quick help great service love it"
    texts, labels = [], []
    for _ in range(rows):
        label = rng.randrange(2)
        words = (complaint if label else praise).split()
        texts.append(" ".join(rng.sample(words, k=rng.randint(3, len(words)))))
        labels.append(label)
    return {"Tweet text": texts, "Label": labels}


def sentence_pairs(rows: int = 32, seed: int = 0) -> dict:
    """GLUE MRPC's shape: "sentence1", "sentence2", "label" (1: the pair says the same)."""
    rng = random.Random(seed)
    first, second, labels = [], [], []
    for _ in range(rows):
        a = rng.sample(WORDS, k=rng.randint(3, 8))
        same = rng.randrange(2)
        b = rng.sample(a, k=len(a)) if same else rng.sample(WORDS, k=rng.randint(3, 8))
        first.append(" ".join(a))
        second.append(" ".join(b))
        labels.append(same)
    return {"sentence1": first, "sentence2": second, "label": labels}


def financial_news(rows: int = 32, seed: int = 0) -> dict:
    """twitter-financial-news-sentiment's shape: "text", "label" (0 bearish, 1 bullish,
    2 neutral)."""
    rng = random.Random(seed)
    cues = {0: "shares fall loss", 1: "shares rise profit", 2: "company report quarter"}
    texts, labels = [], []
    for _ in range(rows):
        label = rng.randrange(3)
        words = cues[label].split() + rng.sample(["market", "stocks", "the", "a"], k=2)
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return {"text": texts, "label": labels}
