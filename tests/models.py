"""Tiny random-weight transformers models for the integration tests (built from configs, no
downloads), and helpers to put the same soft-prompt weights into a PEFT model."""
from __future__ import annotations

import copy

import torch

VOCAB = 97


def tiny_llama(seed=0, **overrides):
    """Llama with grouped-query attention (4 query heads, 2 kv heads) and head_dim 16 != 32/4."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               tie_word_embeddings=False, attn_implementation="eager")
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_qwen2(seed=0, **overrides):
    """Qwen2 (q/k/v biases) with GQA 4:1."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
               attn_implementation="eager")
    cfg.update(overrides)
    return Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()


def tiny_bert(seed=0, num_labels=3, **overrides):
    """BERT for sequence classification (bidirectional attention), dropout off."""
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=128, num_labels=num_labels,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
               attn_implementation="eager")
    cfg.update(overrides)
    return BertForSequenceClassification(BertConfig(**cfg)).eval()


def tiny_roberta(seed=0, num_labels=3, **overrides):
    """RoBERTa for sequence classification: positions numbered from the padding mask."""
    from transformers import RobertaConfig, RobertaForSequenceClassification
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=130, num_labels=num_labels,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
               attn_implementation="eager")
    cfg.update(overrides)
    return RobertaForSequenceClassification(RobertaConfig(**cfg)).eval()


def tiny_causal(arch, seed=0):
    """More causal LMs of the families the integration targets: Mistral (GQA), Gemma (scaled
    embeddings, MQA, head_dim 8), Qwen3 (q/k norms, head_dim 16 != 32 / 4)."""
    import transformers as T
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    config, model = {
        "mistral": (T.MistralConfig(num_key_value_heads=2, sliding_window=None, **common),
                    T.MistralForCausalLM),
        "gemma": (T.GemmaConfig(num_key_value_heads=1, head_dim=8, **common),
                  T.GemmaForCausalLM),
        "qwen3": (T.Qwen3Config(num_key_value_heads=2, head_dim=16, **common),
                  T.Qwen3ForCausalLM),
    }[arch]
    return model(config).eval()


BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "bert": tiny_bert, "roberta": tiny_roberta}


def batch(model_name, batch_size=3, length=7, padding="right", seed=1):
    """input_ids, attention_mask (padding on `padding` side, rows of different lengths), labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, length), generator=g)
    mask = torch.ones(batch_size, length, dtype=torch.long)
    for b in range(1, batch_size):
        pad = min(2 * b, length - 2)
        if padding == "right":
            mask[b, length - pad:] = 0
        elif padding == "left":
            mask[b, :pad] = 0
    ids = ids.masked_fill(mask == 0, 0)
    if model_name in ("bert", "roberta"):
        labels = torch.randint(0, 3, (batch_size,), generator=g)
    else:
        labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def peft_twin(pf_model, base_copy):
    """A PEFT model on `base_copy` (an identical copy of the base) holding the same soft-prompt
    weights and classification head as `pf_model`."""
    import peft
    cfg = pf_model.ptuning_config
    task = {"CAUSAL_LM": "CAUSAL_LM", "SEQ_CLS": "SEQ_CLS"}[pf_model.task_type]
    P = cfg.num_virtual_tokens
    if cfg.method == "prefix_tuning":
        pc = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=P,
                                     prefix_projection=cfg.projection,
                                     encoder_hidden_size=cfg.encoder_hidden_size)
    elif cfg.method == "p_tuning":
        pc = peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=P,
                                      encoder_reparameterization_type=cfg.encoder.upper(),
                                      encoder_hidden_size=pf_model.prompt_encoder.encoder_hidden_size,
                                      encoder_num_layers=cfg.encoder_num_layers,
                                      encoder_dropout=cfg.encoder_dropout)
    else:
        pc = peft.PromptTuningConfig(task_type=task, num_virtual_tokens=P)
    twin = peft.get_peft_model(base_copy, pc)
    encoder = twin.prompt_encoder["default"]
    missing, unexpected = encoder.load_state_dict(
        {k: v for k, v in pf_model.prompt_encoder.state_dict().items()}, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    for name in pf_model.modules_to_save:
        src = pf_model.base_model.get_submodule(name).state_dict()
        twin.base_model.get_submodule(name).modules_to_save["default"].load_state_dict(src)
    return twin


def wrapped_and_twin(model_name, config, backend="reference", seed=0, randomize_head=True):
    """(our wrapped model, PEFT twin) on two identical copies of one tiny base model."""
    import ptuning_fast as pf
    base = BUILDERS[model_name](seed)
    base_copy = copy.deepcopy(base)
    ours = pf.wrap(base, config, backend=backend)
    with torch.no_grad():   # random, not zero: a zero prefix or head would hide mistakes
        for name in ours.modules_to_save:
            for p in ours.base_model.get_submodule(name).parameters():
                p.normal_(0, 0.5)
    return ours, peft_twin(ours, base_copy)


