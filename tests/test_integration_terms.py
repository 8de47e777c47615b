"""Attention terms beside the prefix, in models: sliding windows (Mistral, Gemma 2/3, GPT-OSS),
logit soft-capping (Gemma 2), attention sinks (GPT-OSS) and T5's relative position bias. Each
model gives PEFT's logits, loss, gradients, optimizer step and greedy tokens with the same
weights, and those of the unwrapped model with the prefix materialized in its KV cache.
(Packed sequences: tests/test_integration_packing.py.)"""
import copy

import pytest
import torch
import transformers as T

import ptuning_fast as pf
from conftest import assert_close
from models import (VOCAB, MaterializedPrompt, batch, peft_generation_broken, peft_refusal_reason,
                    peft_refuses, peft_twin)
from ptuning_fast import reference
from ptuning_fast.integrations import attention, generations
from test_integration_peft import assert_same_training_step, peft_name

pytest.importorskip("peft")

# Shorter than P + L (3 + 7) and longer than every padding run of `batch()` (at most 4), so the
# window changes the result and no query is left without a visible key (there PEFT's eager
# attention averages every key uniformly, ours gives zeros: see the README).
WINDOW = 5
ARCHS = ("mistral", "gemma2", "gemma3", "gpt_oss")
CONFIGS = {
    "prefix": lambda: pf.PrefixTuningConfig(3),
    "prefix_proj": lambda: pf.PrefixTuningConfig(4, prefix_projection=True, encoder_hidden_size=24),
    "prompt": lambda: pf.PromptTuningConfig(3),
    "ptuning": lambda: pf.PTuningConfig(3, encoder_hidden_size=20),
}


def tiny_terms(arch, seed=0, **overrides):
    """Tiny models whose attention has the terms under test: Mistral (every layer windowed),
    Gemma 2 (soft-capping; sliding and full layers), Gemma 3 (sliding and full, q/k norms),
    GPT-OSS (sinks; sliding and full; MoE)."""
    torch.manual_seed(seed)
    layers = ["sliding_attention", "full_attention"]
    config, model, extra = {
        "mistral": (T.MistralConfig, T.MistralForCausalLM, dict(sliding_window=WINDOW)),
        "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM,
                   dict(head_dim=8, sliding_window=WINDOW, layer_types=layers,
                        attn_logit_softcapping=1.0, final_logit_softcapping=None,
                        initializer_range=0.2)),      # logits large enough to be capped
        "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM,
                   dict(head_dim=8, sliding_window=WINDOW, layer_types=layers)),
        "gpt_oss": (T.GptOssConfig, T.GptOssForCausalLM,
                    dict(head_dim=8, sliding_window=WINDOW, layer_types=layers,
                         num_local_experts=2, num_experts_per_tok=1, intermediate_size=32)),
    }[arch]
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    return model(config(**{**common, **extra, **overrides})).eval()


def ours_and_twin(arch, method, backend="reference", **overrides):
    base = tiny_terms(arch, **overrides)
    ours = pf.wrap(copy.deepcopy(base), CONFIGS[method](), backend=backend)
    return ours, peft_twin(ours, base)


def cases():
    out = [pytest.param(a, m, p, "reference", id=f"{a}-{m}-{p}") for a in ARCHS
           for m in ("prefix", "prompt") for p in ("left", "right")]
    out += [pytest.param(a, m, "left", "reference", id=f"{a}-{m}-left")
            for a in ("mistral", "gpt_oss") for m in ("prefix_proj", "ptuning")]
    # The Triton kernels (the interpreter on CPU): window, soft-capping + window, sinks + window.
    out += [pytest.param(a, "prefix", "left", "triton", id=f"{a}-prefix-left-triton")
            for a in ("mistral", "gemma2", "gpt_oss")]
    return out


@pytest.mark.parametrize("arch, method, padding, backend", cases())
def test_training_step_matches_peft(arch, method, padding, backend):
    """Logits, loss, every trainable gradient and one AdamW step equal PEFT's."""
    ours, twin = ours_and_twin(arch, method, backend)
    try:
        assert_same_training_step(ours, twin, "llama", padding, peft_name)
    except ValueError as error:
        if not peft_refuses(error):
            raise
        pytest.skip(peft_refusal_reason(twin, error))


@pytest.mark.parametrize("arch", ARCHS)
def test_training_step_matches_materialized_prefix(arch):
    """The same step as the unwrapped model with the prefix in its KV cache (PEFT's algorithm
    without PEFT): holds where PEFT might refuse or change."""
    ours, _ = ours_and_twin(arch, "prefix")
    assert_same_training_step(ours, MaterializedPrompt(ours), "llama", "left")


@pytest.mark.parametrize("arch, term, off", [
    ("mistral", "window", dict(sliding_window=None)),
    ("gemma3", "window", dict(sliding_window=64)),
    ("gemma2", "softcap", dict(attn_logit_softcapping=None)),
    ("gpt_oss", "window", dict(sliding_window=64)),
])
def test_the_term_changes_the_output(arch, term, off):
    """Guards the equivalence tests: each term under test changes the logits."""
    ours, _ = ours_and_twin(arch, "prefix")
    other = pf.wrap(tiny_terms(arch, **off), CONFIGS["prefix"]())
    other.prompt_encoder.load_state_dict(ours.prompt_encoder.state_dict())
    ids, mask, _ = batch("llama", padding="left")
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask).logits
        b = other(input_ids=ids, attention_mask=mask).logits
    assert (a - b).abs().max() > 1e-4, f"{term} did not change {arch}'s logits"


def test_gpt_oss_sinks_change_the_output_and_match_peft():
    ours, twin = ours_and_twin("gpt_oss", "prefix")
    ids, mask, _ = batch("llama", padding="left")
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask).logits
        for model in (ours.base_model, twin.get_base_model()):
            for layer in model.model.layers:
                layer.self_attn.sinks.add_(1.5)
        b = ours(input_ids=ids, attention_mask=mask).logits
        c = twin(input_ids=ids, attention_mask=mask).logits
    assert (a - b).abs().max() > 1e-4
    assert_close(b, c, torch.float32, name="logits with other sinks")


def test_gpt_oss_sinks_that_require_grad_are_a_clear_error():
    ours, _ = ours_and_twin("gpt_oss", "prefix")
    ours.base_model.model.layers[0].self_attn.sinks.requires_grad_(True)
    ids, mask, _ = batch("llama")
    with pytest.raises(NotImplementedError, match="GptOssForCausalLM.*`s_aux`.*require grad"):
        ours(input_ids=ids, attention_mask=mask)
    with torch.no_grad():       # no gradient asked for: fine
        ours(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("arch, method, backend, against",
                         [(a, m, "reference", x) for a in ARCHS for m in ("prefix", "prompt")
                          for x in ("reference", "peft")]
                         + [(a, "prefix", "triton", "reference") for a in ("mistral", "gpt_oss")])
def test_greedy_tokens_past_the_window(arch, method, backend, against):
    """Generation runs past the window (7 + 12 tokens, window 5), through transformers'
    sliding-window cache layers (which keep only the last W - 1 keys: the mask function cuts
    the padding mask to them): the tokens of the materialized prefix, and PEFT's."""
    ours, twin = ours_and_twin(arch, method, backend)
    ids, mask, _ = batch("llama", padding="left")
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
              pad_token_id=0)
    tokens = ours.generate(**kw)
    assert tokens.shape == (ids.shape[0], ids.shape[1] + 12)
    reference_tokens = MaterializedPrompt(ours).generate(**kw)
    if against == "reference":
        assert torch.equal(tokens, reference_tokens), f"{tokens}\n{reference_tokens}"
        return
    theirs = twin.generate(**kw)
    if not torch.equal(tokens, theirs) and not torch.equal(theirs, reference_tokens):
        pytest.skip(peft_generation_broken(twin))
    assert torch.equal(tokens, theirs)


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_cached_decoding_past_the_window_equals_a_full_pass(arch):
    """Logits of decoding one token at a time with the sliding-window cache equal a full
    forward: bottom-right window alignment and the cut padding mask agree."""
    ours, _ = ours_and_twin(arch, "prefix")
    ids, mask, _ = batch("llama", padding="left", length=11)
    with torch.no_grad():
        full = ours(input_ids=ids, attention_mask=mask).logits
        out = ours(input_ids=ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for t in range(4, ids.shape[1]):
            out = ours(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1],
                       past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    assert_close(torch.cat(steps, 1), full, torch.float32, name="cached decoding logits")


# ------------------------------------------------------------------------------------------
# The attention function alone.
class _Attention(torch.nn.Module):
    layer_idx, is_causal = 0, True


def _qkv(L=6, Hq=4, Hkv=2, D=8):
    return (torch.randn(2, Hq, L, D), torch.randn(2, Hkv, L, D), torch.randn(2, Hkv, L, D))


def _binding(P=3, Hkv=2, D=8):
    from ptuning_fast.prompts import LayerPrefixes
    return attention.PrefixBinding(LayerPrefixes(torch.randn(1, 2, Hkv, P, D), 1), None,
                                   "reference", "TinyModel")


@pytest.mark.parametrize("window", [1, 2, 4, 8, 9, 20])
def test_sliding_window_is_w_minus_1_keys_back_prefix_included(window):
    """transformers' sliding_window=W: W keys up to the query's own (left = W - 1), counted over
    [prefix; sequence] as in PEFT's cache; a window covering every key is no window."""
    q, k, v = _qkv()
    binding = _binding()
    pk, pv = binding.prefixes.layer(0)
    out, _ = attention.prefix_attention_forward(_Attention(), q, k, v, None, sliding_window=window,
                                                ptuning_prefix=binding)
    want = reference.prefix_attention(q, k, v, pk, pv, window_size=(window - 1, -1))
    assert_close(out, want.transpose(1, 2), torch.float32)
    # The same as a dense mask over the concatenation: key c (prefix at -P..-1) for query i
    # iff i - W < c <= i.
    P, L = 3, q.shape[2]
    pos = torch.arange(-P, L)
    allowed = (pos[None] <= torch.arange(L)[:, None]) & (pos[None] > torch.arange(L)[:, None]
                                                          - window)
    kk, vv = (torch.cat([p.expand(2, -1, -1, -1), t], 2).repeat_interleave(2, 1)
              for p, t in ((pk, k), (pv, v)))
    scores = (q @ kk.transpose(-1, -2) * 8 ** -0.5).masked_fill(~allowed, float("-inf"))
    assert_close(out, (scores.softmax(-1) @ vv).transpose(1, 2), torch.float32)


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_a_bad_sliding_window_names_the_model(value):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="TinyModel.*sliding_window"):
        attention.prefix_attention_forward(_Attention(), q, k, v, None, sliding_window=value,
                                           ptuning_prefix=_binding())


def test_a_short_bidirectional_window_is_refused():
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match="bidirectional sliding window"):
        attention.prefix_attention_forward(_Attention(), q, k, v, None, sliding_window=3,
                                           is_causal=False)
    attention.prefix_attention_forward(_Attention(), q, k, v, None, sliding_window=6,
                                       is_causal=False)     # covers every key: no window


def test_softcap_and_sinks_reach_the_prefix_attention():
    q, k, v = _qkv()
    binding = _binding()
    pk, pv = binding.prefixes.layer(0)
    sinks = torch.randn(4)
    out, _ = attention.prefix_attention_forward(_Attention(), q, k, v, None, softcap=0.7,
                                                s_aux=sinks, ptuning_prefix=binding)
    want = reference.prefix_attention(q, k, v, pk, pv, softcap=0.7, sinks=sinks)
    assert_close(out, want.transpose(1, 2), torch.float32)
    with pytest.raises(ValueError, match="TinyModel.*softcap"):
        attention.prefix_attention_forward(_Attention(), q, k, v, None, softcap=-1.0,
                                           ptuning_prefix=binding)


def test_packed_kwargs_without_the_wrapper_are_refused():
    """cu_seq_lens reaching the attention without the wrapper's segments (called on the base
    model directly) would be dropped: refused."""
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match="cu_seq_lens_q.*packed"):
        attention.prefix_attention_forward(_Attention(), q, k, v, None,
                                           cu_seq_lens_q=torch.tensor([0, 6]))


# ------------------------------------------------------------------------------------------
# T5's relative position bias: the attention function's part, then a prefix-tuned T5 model
# against PEFT (the rest of T5 x every method is tests/test_model_matrix.py).
def _t5(**overrides):
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=32, num_layers=2, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=16,
               dropout_rate=0.0, attn_implementation="eager")
    model = T.T5ForConditionalGeneration(T.T5Config(**{**cfg, **overrides})).eval()
    with torch.no_grad():      # random, large biases: a wrong column would show
        for m in model.modules():
            if getattr(m, "has_relative_attention_bias", False):
                m.relative_attention_bias.weight.normal_(0, 2.0)
    return model


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
@pytest.mark.parametrize("past", [0, 3])
def test_t5_position_bias_over_the_prefix_equals_peft(stack, past):
    """For each self-attention layer (the first computes the bias, the second reuses it): our
    attention given T5's bias over the sequence (cache of real tokens only) equals T5's eager
    attention with the prefix as the first P entries of its cache, PEFT's layout."""
    from transformers import DynamicCache
    t5 = _t5()
    generations.claim(t5)
    P, L, H, D = 3, 5, 4, 8
    prefix = torch.randn(2, 1, 2, H, P, D)       # (layers, tasks=1, k/v, H, P, D)
    hidden = torch.randn(2, L, 32)
    cached = torch.randn(2, H, past, D), torch.randn(2, H, past, D)
    blocks = getattr(t5, stack).block
    peft_bias = our_bias = None
    for layer, block in enumerate(blocks):
        module = block.layer[0].SelfAttention
        causal = stack == "decoder"
        # PEFT: [prefix; cached] in the cache; T5 computes the bias over all P + past + L keys.
        cache = DynamicCache()
        pk, pv = prefix[layer, 0, 0], prefix[layer, 0, 1]
        cache.update(torch.cat([pk.expand(2, -1, -1, -1), cached[0]], 2),
                     torch.cat([pv.expand(2, -1, -1, -1), cached[1]], 2), layer)
        mask = None
        if causal:
            keys = P + past + L
            allowed = torch.arange(keys)[None] <= torch.arange(L)[:, None] + P + past
            mask = torch.zeros(L, keys).masked_fill(~allowed, float("-inf"))[None, None]
        with torch.no_grad():
            want, peft_bias = module(hidden, mask=mask, position_bias=peft_bias, cache=cache)[:2]
        # Ours: only the real tokens in the cache; the prefix through the binding.
        module.config._attn_implementation = attention.register()
        ours_cache = DynamicCache()
        if past:
            ours_cache.update(cached[0], cached[1], layer)
        from ptuning_fast.prompts import LayerPrefixes
        binding = attention.PrefixBinding(LayerPrefixes(prefix[:, 0], 1), None, "reference",
                                          "T5")
        with torch.no_grad():
            got, our_bias = module(hidden, mask=None, position_bias=our_bias,
                                   cache=ours_cache if past else None, ptuning_prefix=binding,
                                   is_causal=causal)[:2]
        module.config._attn_implementation = "eager"
        assert our_bias.shape[-1] == past + L            # T5 saw only the real keys
        assert_close(got, want, torch.float32, name=f"{stack} layer {layer}")
    assert peft_bias.abs().max() > 1.0


@pytest.mark.parametrize("padding", [False, True], ids=["full", "left_padded"])
def test_prefix_tuned_t5_with_large_position_biases_equals_peft(padding):
    """PEFT puts its prefix into the decoder's self-attention only (the cross-attention cache is
    emptied); ours is placed by module (T5's encoder, decoder and cross-attention modules share
    `layer_idx`s). Large random bias tables: a wrong prefix column shows in the logits."""
    seq2seq = dict(pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
    ours = pf.wrap(_t5(**seq2seq), pf.PrefixTuningConfig(3), backend="reference")
    with torch.no_grad():
        ours.prompt_encoder.embedding.weight.normal_(0, 0.5)
    twin = peft_twin(ours, _t5(**seq2seq))
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    if padding:
        mask[1, :3] = 0
    labels = torch.randint(3, VOCAB, (2, 5), generator=g)
    ours.train(), twin.train()
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    ref = twin(input_ids=ids, attention_mask=mask, labels=labels)
    assert_close(out.logits, ref.logits, torch.float32, "fwd", name="logits")
    out.loss.backward(), ref.loss.backward()
    mine = ours.prompt_encoder.embedding.weight
    assert_close(mine.grad, twin.prompt_encoder["default"].embedding.weight.grad, torch.float32,
                 "grad", name="prefix grad")


def test_t5_bias_from_an_unknown_module_is_refused():
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match="TinyModel.*position_bias.*_Attention"):
        attention.prefix_attention_forward(_Attention(), q, k, v, None,
                                           position_bias=torch.zeros(1, 4, 6, 6),
                                           ptuning_prefix=_binding())
    # Without a prefix, the bias is used as it is.
    bias = torch.randn(1, 4, 6, 6)
    out, _ = attention.prefix_attention_forward(_Attention(), q, k, v, None, position_bias=bias)
    want = reference.prefix_attention(q, k, v, bias=bias)
    assert_close(out, want.transpose(1, 2), torch.float32)
