"""A real (fast) tokenizer built offline, saved to a folder: what `tokenizer_name_or_path` and
`AutoTokenizer.from_pretrained` need, without downloads. Ids fit the tiny models' vocabulary."""
from __future__ import annotations

WORDS = ("the quick brown fox jumps over a lazy dog classify this review as positive or "
         "negative answer question summarize text").split()


def tiny_tokenizer(folder, chat_template: bool = False):
    """A word-level tokenizer over WORDS that adds a BOS (<s>, id 1) like Llama's, saved to
    `folder` and loaded back with AutoTokenizer. `chat_template`: give it a minimal one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    if chat_template:
        fast.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} "
                              "{% endfor %}")
    fast.save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))
