"""Tiny random-weight transformers models for the integration tests (built from configs, no
downloads), helpers to put the same soft-prompt weights into a PEFT model, and the PEFT-free
reference `MaterializedPrompt`."""
from __future__ import annotations

import copy
import inspect

import torch

from ptuning_fast.integrations.support import numbers_positions_from_mask

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


def tiny_gpt2(seed=0, **overrides):
    """GPT-2: a causal LM whose class name (GPT2LMHeadModel) has no "ForCausalLM"."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0,
               attn_pdrop=0.0, attn_implementation="eager")
    cfg.update(overrides)
    return GPT2LMHeadModel(GPT2Config(**cfg)).eval()


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
# Not in BUILDERS (which the PEFT matrices run over): extra architectures for targeted tests.
EXTRA_BUILDERS = {"gpt2": tiny_gpt2}


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
    task = pf_model.task_type
    P = cfg.num_virtual_tokens
    if cfg.method == "prefix_tuning":
        pc = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=P,
                                     prefix_projection=cfg.prefix_projection,
                                     encoder_hidden_size=cfg.encoder_hidden_size)
    elif cfg.method == "p_tuning":
        pc = peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=P,
                                      encoder_reparameterization_type=(
                                          cfg.encoder_reparameterization_type),
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


def peft_name(name: str) -> str:
    """A wrapped model's trainable parameter's name in its PEFT twin."""
    if name.startswith("prompt_encoder."):
        return name.replace("prompt_encoder.", "prompt_encoder.default.", 1)
    _, head, rest = name.split(".", 2)          # base_model.<head>.<param path>
    return f"base_model.{head}.modules_to_save.default.{rest}"


def wrapped_and_twin(model_name, config, backend="reference", seed=0, randomize_head=True):
    """(our wrapped model, PEFT twin) on two identical copies of one tiny base model."""
    import ptuning_fast as pf
    base = {**BUILDERS, **EXTRA_BUILDERS}[model_name](seed)
    base_copy = copy.deepcopy(base)
    ours = pf.wrap(base, config, backend=backend)
    with torch.no_grad():   # random, not zero: a zero prefix or head would hide mistakes
        for name in ours.modules_to_save:
            for p in ours.base_model.get_submodule(name).parameters():
                p.normal_(0, 0.5)
    return ours, peft_twin(ours, base_copy)


def cache_kwarg(model) -> str:
    """The name under which `model`'s backbone takes its KV cache: `cache` from transformers 5.24
    on (which still accepts `past_key_values` as deprecated), `past_key_values` before."""
    params = inspect.signature(model.base_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class MaterializedPrompt(torch.nn.Module):
    """The reference for the transformers integration, without PEFT and without our attention:
    an unwrapped copy of the base model (eager attention) whose KV cache holds the soft prompt
    as P entries in every row, as PEFT's algorithm puts it there. Prefix tuning: each layer's
    prefix K/V; prompt tuning: the prompt run through the model once. Positions then start at P,
    and P ones lead the attention mask. Parameter names equal the wrapped model's."""

    def __init__(self, pf_model):
        super().__init__()
        self.method = pf_model.ptuning_config.method
        self.num_virtual_tokens = pf_model.num_virtual_tokens
        self.prompt_encoder = copy.deepcopy(pf_model.prompt_encoder)
        self.base_model = copy.deepcopy(pf_model.base_model)
        self.base_model.set_attn_implementation("eager")
        for name in pf_model.modules_to_save:
            self.base_model.get_submodule(name).requires_grad_(True)

    def trainable_parameters(self):
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def prompt_cache(self, rows: int):
        """A DynamicCache holding the soft prompt in each of `rows` rows."""
        from transformers import DynamicCache
        cache = DynamicCache(config=self.base_model.config)
        dtype = self.base_model.get_input_embeddings().weight.dtype
        if self.method == "prefix_tuning":
            prefixes = self.prompt_encoder().to(dtype)
            for layer in range(prefixes.num_layers):
                k, v = prefixes.layer(layer)
                cache.update(k.expand(rows, *k.shape), v.expand(rows, *v.shape), layer)
            return cache
        prompt = self.prompt_encoder().to(dtype)
        self.base_model(inputs_embeds=prompt.expand(rows, *prompt.shape), use_cache=True,
                        **{cache_kwarg(self.base_model): cache})
        return cache

    def forward(self, input_ids, attention_mask, labels=None, **kwargs):
        """Prefix tuning's forward (prompt tuning's logits would lack the prompt positions);
        other kwargs (a QA model's start/end positions) go to the base model."""
        if self.method != "prefix_tuning":
            raise NotImplementedError("MaterializedPrompt.forward is for prefix tuning")
        P, batch = self.num_virtual_tokens, input_ids.shape[0]
        mask = torch.cat([attention_mask.new_ones(batch, P), attention_mask], 1)
        if labels is not None:
            kwargs["labels"] = labels
        kwargs[cache_kwarg(self.base_model)] = self.prompt_cache(batch)
        return self.base_model(input_ids=input_ids, attention_mask=mask, use_cache=True, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, **kwargs):
        """transformers' generate() continuing from the cache: the inputs get P placeholder ids in
        front (the cache stands for them, generate() feeds only the real ids); they are cut off
        the result. Positions of the real ids: prefix tuning, generate()'s own numbering shifted
        by P; prompt tuning, those of [prompt; ids] padding included (PEFT drops position_ids),
        or, on models that number tokens from the attention mask (OPT), that numbering of
        [prompt; ids] (pads at -1)."""
        P, (batch, length) = self.num_virtual_tokens, input_ids.shape
        beams = kwargs.get("num_beams", 1)
        rows = batch * (beams if beams > 1 else kwargs.get("num_return_sequences", 1))
        if self.method == "prefix_tuning":
            # generate()'s numbering of the ids, shifted by P as PEFT and ours do. Letting it
            # number [placeholders; ids] would differ after right padding (pads count as 0).
            positions = self.base_model._prepare_position_ids_for_generation(
                input_ids, {"attention_mask": attention_mask})
        else:
            positions = torch.arange(length).expand(batch, -1)
        kwargs["position_ids"] = torch.cat([torch.arange(P).expand(batch, -1), positions + P], 1)
        ids = torch.cat([input_ids.new_full((batch, P), 3), input_ids], 1)
        mask = torch.cat([attention_mask.new_ones(batch, P), attention_mask], 1)
        if self.method != "prefix_tuning" and numbers_positions_from_mask(self.base_model):
            kwargs["position_ids"] = mask.cumsum(1) * mask - 1
        out = self.base_model.generate(input_ids=ids, attention_mask=mask, **kwargs,
                                       **{cache_kwarg(self.base_model): self.prompt_cache(rows)})
        return out[:, P:]


def peft_generation_broken(twin) -> str:
    """Why a PEFT model's generate() cannot be compared with: its tokens differ from those of
    `MaterializedPrompt` (PEFT's algorithm done outside PEFT, which equals PEFT's generate()
    wherever PEFT still gets its prompt into the model)."""
    import peft
    import transformers
    why = (f"peft {peft.__version__} with transformers {transformers.__version__}: PEFT's "
           "generate() gives other tokens than the unwrapped model with the soft prompt "
           "materialized in its KV cache (the matching `reference` test holds ours to that)")
    if cache_kwarg(twin.get_base_model()) == "cache":
        why += ("; transformers renamed the cache argument past_key_values -> cache, and PEFT "
                "still looks for and injects it as past_key_values during generate()")
    return why


_PEFT_PREFIX_REFUSAL = "Model does not support past key values which are required for prefix"


def peft_refuses(error: Exception) -> bool:
    """Whether `error` is PEFT refusing prefix tuning for the model (not a failure of ours)."""
    return isinstance(error, ValueError) and _PEFT_PREFIX_REFUSAL in str(error)


def peft_refusal_reason(twin, error: Exception) -> str:
    import peft
    import transformers
    base = twin.get_base_model()
    why = (f"peft {peft.__version__} refuses prefix tuning for {type(base).__name__} with "
           f"transformers {transformers.__version__}: {error} "
           "(test_forward_backward_and_step_match_materialized_prefix holds ours to PEFT's "
           "algorithm without PEFT)")
    if cache_kwarg(base) == "cache":
        why += ("; PEFT looks for `past_key_values` in the backbone's forward signature, which "
                "transformers renamed to `cache`")
    return why


def _unwrapped_eager(pf_model):
    """A copy of the wrapped model's base model with transformers' eager attention (not ours)."""
    base = copy.deepcopy(pf_model.base_model)
    base.set_attn_implementation("eager")
    return base


def seq2seq_prefix_cache(pf_model, base, rows: int, task_ids=None):
    """PEFT's cache for a prefix-tuned encoder-decoder, `rows` rows (PEFT builds it for
    generate()'s expanded batch): decoder layer i's self-attention holds the prefix of layer
    (2 i) mod L (PeftModel.get_prompt doubles its (2L)-row cache and splits it into groups of
    four: self K, self V, cross K, cross V), the cross-attention cache is empty. With several
    tasks (ours only; PEFT's prefix tuning has one), `task_ids` (B,) picks each row's prefix,
    and generate()'s rows_per = rows / B consecutive copies of a row keep its task."""
    from transformers import DynamicCache, EncoderDecoderCache
    prefixes = pf_model.prompt_encoder().to(base.get_input_embeddings().weight.dtype)
    L = prefixes.num_layers
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    for i in range(L):
        k, v = prefixes.layer((2 * i) % L)
        if prefixes.num_tasks == 1:
            k, v = k.expand(rows, *k.shape), v.expand(rows, *v.shape)
        else:
            rows_of = task_ids.repeat_interleave(rows // task_ids.shape[0])
            k, v = k[rows_of], v[rows_of]
        cache.self_attention_cache.update(k, v, i)
    return cache


@torch.no_grad()
def materialized_seq2seq_greedy(pf_model, input_ids, attention_mask, max_new_tokens):
    """Greedy decoding of a prefix-tuned encoder-decoder as PEFT's algorithm defines it, without
    PEFT, without our attention and without generate(): at every step a full pass of the
    unwrapped model (eager attention) given PEFT's prefix cache (`seq2seq_prefix_cache`). Rows
    that emit EOS get pads after. It checks `materialized_seq2seq_generate` in turn."""
    base = _unwrapped_eager(pf_model)
    config = base.generation_config
    rows = input_ids.shape[0]
    tokens = torch.full((rows, 1), config.decoder_start_token_id, dtype=torch.long)
    done = torch.zeros(rows, dtype=torch.bool)
    for _ in range(max_new_tokens):
        cache = seq2seq_prefix_cache(pf_model, base, rows)
        logits = base(input_ids=input_ids, attention_mask=attention_mask,
                      decoder_input_ids=tokens, use_cache=True,
                      **{cache_kwarg(base): cache}).logits[:, -1]
        step = logits.argmax(-1).masked_fill(done, config.pad_token_id)
        tokens = torch.cat([tokens, step[:, None]], 1)
        done |= step == config.eos_token_id
        if done.all():
            break
    return tokens


@torch.no_grad()
def materialized_seq2seq_generate(pf_model, input_ids, attention_mask, task_ids=None, **kwargs):
    """transformers' generate() (greedy, beam search, sampling: whatever `kwargs` ask) of the
    unwrapped model (eager attention) continuing from PEFT's prefix cache
    (`seq2seq_prefix_cache`), which generate() then reorders between beams itself: PEFT's
    algorithm for a prefix-tuned encoder-decoder, run without PEFT (PEFT's own generate() drops
    its prefix with transformers 5.24, README note [e]). The decoder's inputs get P placeholder
    ids (the decoder start id, so generate() prepends none) in front of the start id, and an
    all-ones decoder mask of that length (the decoder's mask without one): a mask as long as
    the ids tells generate() the cache stands for the first P, so its first step feeds the start
    id alone, at position P (BART's learned positions, T5's relative bias over the P + 1 keys),
    as after PEFT's prefix. Returns the decoder's tokens without the placeholders, as PEFT's
    generate() does."""
    base = _unwrapped_eager(pf_model)
    P, batch = pf_model.num_virtual_tokens, input_ids.shape[0]
    beams = kwargs.get("num_beams", 1)
    rows = batch * (beams if beams > 1 else kwargs.get("num_return_sequences", 1))
    decoder_ids = torch.full((batch, P + 1), base.generation_config.decoder_start_token_id,
                             dtype=torch.long)
    out = base.generate(input_ids=input_ids, attention_mask=attention_mask,
                        decoder_input_ids=decoder_ids,
                        decoder_attention_mask=torch.ones_like(decoder_ids), **kwargs,
                        **{cache_kwarg(base): seq2seq_prefix_cache(pf_model, base, rows,
                                                                   task_ids)})
    return out[:, P:]


def token_cls_loss(logits, labels):
    """Cross-entropy of a token classifier over the real tokens (the last L of P + L logits):
    PEFT does not pad token-classification labels for a prompt, so its base model cannot take
    them; tests compute that loss on both sides."""
    logits = logits[:, -labels.shape[1]:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             labels.reshape(-1))
