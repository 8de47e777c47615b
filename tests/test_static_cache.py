"""Generation with a static KV cache (`cache_implementation="static"`): prefix tuning and the
shared prompt pass give the dynamic cache's tokens (greedy, sampling, beam search, padding, mixed
tasks), also with the model's forward compiled (one graph, no break) and with transformers'
own compiled decoding (`compile_config`); a manual forward over a StaticCache gives the dynamic
cache's logits; what a static cache cannot do here is refused by name."""
import gc

import pytest
import torch

import ptuning_fast as pf
from models import batch, tiny_causal, tiny_llama, tiny_qwen2

P = 3
BUILD = {"llama": tiny_llama, "qwen2": tiny_qwen2}
MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=20, temperature=1.3),
    "beam": dict(do_sample=False, num_beams=3, num_return_sequences=2),
}


def wrapped(model_name="llama", config=None, **kw):
    model = pf.wrap(BUILD[model_name](0), config or pf.PrefixTuningConfig(P), **kw)
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 1.0)      # a prefix that changes the tokens
    return model


def generate(model, ids, mask, seed=0, **kw):
    torch.manual_seed(seed)
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                          min_new_tokens=6, pad_token_id=0, **kw)


@pytest.mark.parametrize("model_name", list(BUILD))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("tasks", [1, 2])
def test_prefix_static_cache_same_tokens_as_dynamic(model_name, mode, tasks):
    model = wrapped(model_name, pf.PrefixTuningConfig(P, num_tasks=tasks))
    ids, mask, _ = batch(model_name, padding="left")
    kw = dict(MODES[mode], task_ids=torch.tensor([1, 0, 1])) if tasks > 1 else MODES[mode]
    dynamic = generate(model, ids, mask, **kw)
    static = generate(model, ids, mask, cache_implementation="static", **kw)
    assert torch.equal(static, dynamic), f"{static}\n{dynamic}"
    assert not torch.equal(dynamic, generate(model.base_model, ids, mask, **MODES[mode]))


def test_static_cache_through_the_kernels():
    """The Triton kernels (under the interpreter on CPU): the prefill's cut keys and the decode
    kernel over the whole static buffer with its written-slots mask, under beam search."""
    model = wrapped(backend="triton")
    ids, mask, _ = batch("llama", padding="left")
    assert torch.equal(generate(model, ids, mask, cache_implementation="static", **MODES["beam"]),
                       generate(model, ids, mask, **MODES["beam"]))


def test_shared_prompt_static_cache_same_tokens_as_dynamic():
    model = wrapped(config=pf.PromptTuningConfig(P), shared_prompt=True)
    ids, mask, _ = batch("llama", padding="left")
    assert torch.equal(generate(model, ids, mask, cache_implementation="static"),
                       generate(model, ids, mask))


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_compiled_forward_decodes_in_one_graph(backend):
    """torch.compile of the base model's forward with fullgraph=True (any graph break raises):
    the prefill and every decoding step trace whole, the binding read from the forward's
    arguments, the kernels as custom ops ("triton"; the interpreter on CPU). The "eager"
    backend: Dynamo's tracing without a compiler's minutes."""
    model = wrapped(backend=backend)
    ids, mask, _ = batch("llama", padding="left")
    dynamic = generate(model, ids, mask)
    torch._dynamo.reset()
    base = model.base_model
    base.forward = torch.compile(base.forward, fullgraph=True, backend="eager", dynamic=False)
    try:
        assert torch.equal(generate(model, ids, mask, cache_implementation="static"), dynamic)
    finally:
        del base.forward
        torch._dynamo.reset()


def test_transformers_compiled_decoding():
    """transformers compiles the decoding step itself with a static cache (by default on CUDA;
    here asked for with a compile_config): the same tokens."""
    from transformers import CompileConfig
    model = wrapped()
    ids, mask, _ = batch("llama", padding="left")
    dynamic = generate(model, ids, mask)
    config = CompileConfig(backend="eager", fullgraph=False, dynamic=False)
    config._compile_all_devices = True
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    try:
        static = generate(model, ids, mask, cache_implementation="static", compile_config=config)
        graphs = counters["stats"]["unique_graphs"]
        # Other wrapped models come and go (the registry of wrapped modules changes): the
        # step hook is never traced, so nothing guards on it and nothing recompiles.
        other = wrapped()
        del other
        gc.collect()
        again = generate(model, ids, mask, cache_implementation="static", compile_config=config)
        assert counters["stats"]["unique_graphs"] == graphs
        # ... and Dynamo never traced into it (it would break on the ContextVar it reads).
        assert "ContextVar" not in " ".join(counters["graph_break"])
    finally:
        torch._dynamo.reset()
    assert torch.equal(static, dynamic) and torch.equal(again, dynamic)
    assert hasattr(model.base_model, "_compiled_call")       # it did compile


def test_forward_over_a_static_cache_same_logits_as_dynamic():
    from transformers import DynamicCache, StaticCache
    model = wrapped()
    ids, mask, _ = batch("llama", padding="left")
    B, L = ids.shape
    config = model.base_model.config
    logits = {}
    for name, cache in (("dynamic", DynamicCache(config=config)),
                        ("static", StaticCache(config=config, max_cache_len=L + 5))):
        first = model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits
        step_mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
        step = model(input_ids=ids[:, -1:], attention_mask=step_mask,
                     past_key_values=cache).logits
        logits[name] = (first, step)
    for a, b in zip(logits["static"], logits["dynamic"]):
        torch.testing.assert_close(a, b)


def test_static_cache_refused_where_it_cannot_work():
    from transformers import StaticCache
    ids, mask, _ = batch("llama", padding="left")
    # The concatenation (prompt tuning): transformers builds 4D masks for a static cache, which
    # the prompt's mask columns cannot be prepended to.
    prompt = wrapped(config=pf.PromptTuningConfig(P))
    with pytest.raises(NotImplementedError, match="cache_implementation='static'"):
        generate(prompt, ids, mask, cache_implementation="static")
    cache = StaticCache(config=prompt.base_model.config, max_cache_len=32)
    with pytest.raises(NotImplementedError, match="StaticCache"):
        generate(prompt, ids, mask, past_key_values=cache)
    # Sliding-window layers: the static cache drops keys the mask would not follow.
    torch.manual_seed(0)
    mistral = pf.wrap(tiny_causal("mistral"), pf.PrefixTuningConfig(P))
    mistral.base_model.config.sliding_window = 4
    with pytest.raises(NotImplementedError, match="StaticSlidingWindowLayer"):
        generate(mistral, ids, mask, cache_implementation="static")
    # Other cache implementations are named in the error.
    prefix = wrapped()
    with pytest.raises(NotImplementedError, match="cache_implementation='hybrid'"):
        generate(prefix, ids, mask, cache_implementation="hybrid")


def test_cross_attention_mask_is_not_taken_for_a_static_cache():
    """Encoder-decoder cross-attention also has more keys than queries and no cache: the mask
    function passes its 2D mask through."""
    from types import SimpleNamespace

    from ptuning_fast.integrations.attention import padding_mask_passthrough
    enc_mask = torch.ones(2, 9, dtype=torch.bool)
    enc_mask[1, :3] = False
    out = padding_mask_passthrough(batch_size=2, q_length=4, kv_length=9, q_offset=0,
                                   kv_offset=0, attention_mask=enc_mask,
                                   config=SimpleNamespace(is_encoder_decoder=True))
    assert out is enc_mask
    # A decoder-only static cache at its first write: the prefill's mask, narrower than the
    # buffer; then a decoding step: the written slots of the buffer.
    dec = SimpleNamespace(is_encoder_decoder=False)
    prefill = padding_mask_passthrough(batch_size=2, q_length=4, kv_length=9, q_offset=0,
                                       kv_offset=0, attention_mask=enc_mask[:, :4], config=dec)
    assert prefill.shape == (2, 4) and torch.equal(prefill, enc_mask[:, :4])
    step = padding_mask_passthrough(batch_size=2, q_length=1, kv_length=9,
                                    q_offset=torch.tensor(4), kv_offset=0,
                                    attention_mask=enc_mask[:, :5], config=dec)
    expected = torch.zeros(2, 9, dtype=torch.bool)
    expected[:, :5] = enc_mask[:, :5]
    assert torch.equal(step, expected)
    # No 2D mask given: every written slot, on the device transformers names.
    bare = padding_mask_passthrough(batch_size=2, q_length=4, kv_length=9, q_offset=0,
                                    kv_offset=0, attention_mask=None, config=dec,
                                    device=torch.device("meta"))
    assert bare.shape == (2, 4) and bare.device.type == "meta"
