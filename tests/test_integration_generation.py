"""generate(): greedy, sampling, beam search and num_return_sequences give PEFT's tokens on the
same weights, and those of the unwrapped model with the prompt/prefix materialized in its KV
cache; the prefix stays out of our KV cache; decoding with the cache equals a full pass."""
import pytest
import torch
import transformers

import ptuning_fast as pf
from conftest import assert_close
from models import (MaterializedPrompt, batch, cache_kwarg, peft_generation_broken, tiny_llama,
                    wrapped_and_twin)

pytest.importorskip("peft")

CONFIGS = {
    "prefix": pf.PrefixTuningConfig(3),
    "prompt": pf.PromptTuningConfig(3),
    "ptuning": pf.PTuningConfig(3, encoder_hidden_size=20),
}
MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=20, temperature=1.3),
    "beam": dict(do_sample=False, num_beams=3),
    "beam_multi": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "sampling_multi": dict(do_sample=True, num_return_sequences=2),
    "greedy_right_padded": dict(do_sample=False),   # odd for generation, but must still match
}


def generate(model, ids, mask, seed=0, **kw):
    torch.manual_seed(seed)
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0,
                          **kw)


def cases():
    out = [pytest.param(m, k, mode, "reference", id=f"{m}-{k}-{mode}-reference")
           for m in ("llama", "qwen2") for k in CONFIGS for mode in MODES]
    out.append(pytest.param("llama", "prefix", "greedy", "triton",
                            id="llama-prefix-greedy-triton"))
    out.append(pytest.param("llama", "prompt", "greedy", "triton",
                            id="llama-prompt-greedy-triton"))
    return out


@pytest.mark.parametrize("model_name, method, mode, backend", cases())
def test_generate_matches_reference(model_name, method, mode, backend):
    """Ours equals transformers' generate() on the unwrapped model with the prompt/prefix
    materialized in its KV cache (PEFT's algorithm, without PEFT's generation code)."""
    ours, _ = wrapped_and_twin(model_name, CONFIGS[method], backend=backend)
    padding = "right" if mode.endswith("right_padded") else "left"
    ids, mask, _ = batch(model_name, padding=padding)
    a = generate(ours, ids, mask, **MODES[mode])
    r = generate(MaterializedPrompt(ours), ids, mask, **MODES[mode])
    assert torch.equal(a, r), f"tokens differ:\n{a}\n{r}"
    # the prompt matters: the base model alone generates something else
    plain = generate(ours.base_model, ids, mask, **MODES[mode]) if method != "prefix" else None
    if plain is not None:
        assert not torch.equal(plain, a)


@pytest.mark.parametrize("model_name, method, mode, backend", cases())
def test_generate_matches_peft(model_name, method, mode, backend):
    ours, twin = wrapped_and_twin(model_name, CONFIGS[method], backend=backend)
    padding = "right" if mode.endswith("right_padded") else "left"
    ids, mask, _ = batch(model_name, padding=padding)
    a = generate(ours, ids, mask, **MODES[mode])
    b = generate(twin, ids, mask, **MODES[mode])
    # Tokens that differ are our fault only if PEFT's are the reference's.
    if not torch.equal(a, b) and \
            not torch.equal(b, generate(MaterializedPrompt(ours), ids, mask, **MODES[mode])):
        pytest.skip(peft_generation_broken(twin))
    assert a.shape == b.shape
    assert torch.equal(a, b), f"tokens differ:\n{a}\n{b}"


def test_prefix_generation_differs_from_base():
    ours, _ = wrapped_and_twin("llama", CONFIGS["prefix"])
    ids, mask, _ = batch("llama", padding="left")
    a = generate(ours, ids, mask, do_sample=False)
    with torch.no_grad():                      # the same model with a zero prefix effect removed
        ours.prompt_encoder.embedding.weight.mul_(3.0)
    b = generate(ours, ids, mask, do_sample=False)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("cache_name", ["past_key_values", "cache"])
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_cached_decoding_matches_full_pass(method, cache_name):
    """Prefix: the cache holds the real tokens only. Prompt: the prompt is cached once, and
    later steps only extend the mask. The cache goes in under either name transformers takes
    (`cache` from 5.24 on, `past_key_values` before and still accepted)."""
    ours, _ = wrapped_and_twin("llama", CONFIGS[method])
    if cache_name == "cache" and cache_kwarg(ours.base_model) != "cache":
        pytest.skip(f"transformers {transformers.__version__} takes the KV cache only as "
                    "`past_key_values`")
    ids, mask, _ = batch("llama", padding="left", length=8)
    P = 3 if method == "prompt" else 0
    with torch.no_grad():
        full = ours(input_ids=ids, attention_mask=mask).logits
        first = ours(input_ids=ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        cache = first[cache_name]
        assert cache.get_seq_length() == 5 + P              # no prefix inside the cache
        steps = [first.logits]
        for t in range(5, 8):
            out = ours(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1],
                       use_cache=True, **{cache_name: cache})
            steps.append(out.logits)
    assert_close(torch.cat(steps, dim=1), full, torch.float32, name="cached decoding")


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_mixed_task_generation_equals_each_row_alone(method):
    cfg = pf.PrefixTuningConfig(3, num_tasks=3) if method == "prefix" \
        else pf.PromptTuningConfig(3, num_tasks=3)
    ours = pf.wrap(tiny_llama(0), cfg)
    ids, mask, _ = batch("llama", padding="left")
    tasks = torch.tensor([2, 0, 1])
    kw = dict(do_sample=False, num_beams=2, num_return_sequences=2)
    together = generate(ours, ids, mask, task_ids=tasks, **kw)
    rows = [generate(ours, ids[r:r + 1], mask[r:r + 1], task_ids=tasks[r:r + 1], **kw)[:, -6:]
            for r in range(3)]
    assert torch.equal(together[:, -6:], torch.cat(rows))
    others = generate(ours, ids, mask, task_ids=torch.tensor([0, 1, 2]), **kw)
    assert not torch.equal(others, together)      # the task choice matters


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_generate_from_inputs_embeds_equals_from_ids(method):
    ours, _ = wrapped_and_twin("llama", CONFIGS[method])
    ids, mask, _ = batch("llama", padding="left")
    embeds = ours.base_model.get_input_embeddings()(ids)
    a = generate(ours, ids, mask, do_sample=False)
    b = ours.generate(input_ids=ids, inputs_embeds=embeds, attention_mask=mask,
                      max_new_tokens=6, pad_token_id=0, do_sample=False)
    assert torch.equal(a[:, -6:], b[:, -6:])


class _DuringGeneration:
    """A logits processor that runs `fn` at every generation step (and keeps what it returns)."""

    def __init__(self, fn):
        self.fn, self.results = fn, []

    def __call__(self, input_ids, scores):
        self.results.append(self.fn())
        return scores


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_generation_prefix_is_bound_to_its_model():
    """During A.generate, another model using the same attention implementation (B wrapped, B's
    base called directly) and A's own forward see their own prefixes, not A's generation's."""
    from transformers import LogitsProcessorList
    a = pf.wrap(tiny_llama(0), pf.PrefixTuningConfig(3))
    b = pf.wrap(tiny_llama(1), pf.PrefixTuningConfig(3))
    ids, mask, _ = batch("llama", padding="left")
    expected = {"b": _logits(b, ids, mask), "b_base": _logits(b.base_model, ids, mask),
                "a": _logits(a, ids, mask)}
    probes = {name: _DuringGeneration(lambda m=m: _logits(m, ids, mask))
              for name, m in (("b", b), ("b_base", b.base_model), ("a", a))}
    generate(a, ids, mask, do_sample=False, logits_processor=LogitsProcessorList(probes.values()))
    for name, probe in probes.items():
        for got in probe.results:
            assert_close(got, expected[name], torch.float32, name=name)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_concurrent_generations_of_one_model_in_threads(method):
    """Two threads generate with one model at once (different tasks); a barrier at every step
    keeps both calls open together. Each gets what it gets alone."""
    import threading

    from transformers import LogitsProcessorList
    cfg = pf.PrefixTuningConfig(3, num_tasks=2) if method == "prefix" \
        else pf.PromptTuningConfig(3, num_tasks=2)
    model = pf.wrap(tiny_llama(0), cfg)
    with torch.no_grad():
        model.prompt_encoder.embedding.weight.normal_()
    ids, mask, _ = batch("llama", padding="left")
    tasks = {0: torch.tensor([0, 1, 0]), 1: torch.tensor([1, 1, 0])}
    alone = {t: generate(model, ids, mask, task_ids=tasks[t], do_sample=False) for t in tasks}
    barrier = threading.Barrier(2, timeout=60)
    steps = LogitsProcessorList([_DuringGeneration(barrier.wait)])
    together, errors = {}, []

    def run(t):
        try:
            together[t] = generate(model, ids, mask, task_ids=tasks[t], do_sample=False,
                                   logits_processor=steps)
        except Exception as exc:  # noqa: BLE001 — reported below
            errors.append(exc)
            barrier.abort()
    threads = [threading.Thread(target=run, args=(t,)) for t in tasks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for t in tasks:
        assert torch.equal(together[t], alone[t]), t
