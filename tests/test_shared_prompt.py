"""Prompt Tuning / P-Tuning's shared prompt pass (ptuning_fast/integrations/shared_prompt.py):
the prompt positions computed once per task give the concatenation's function (PEFT's way,
`shared_prompt=False`), forward, loss, every gradient and generation; it runs exactly where it
applies, and the concatenation everywhere else. The model matrix compares both with PEFT."""
import pytest
import torch

import ptuning_fast as pf
from conftest import assert_close
from models import batch, tiny_causal, tiny_gpt2, tiny_llama

P = 3
CONFIGS = {"prompt": lambda T: pf.PromptTuningConfig(P, num_tasks=T),
           "ptuning": lambda T: pf.PTuningConfig(P, encoder_hidden_size=16, num_tasks=T)}
BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2, "gemma": lambda s: tiny_causal("gemma", s)}


def pair(model_name, method, T=1, backend="reference", **kw):
    """(shared, concatenation): the same base weights and prompt weights (random, not zero)."""
    shared = pf.wrap(BUILD[model_name](0), CONFIGS[method](T), backend=backend, **kw)
    kw["shared_prompt"] = False
    concat = pf.wrap(BUILD[model_name](0), CONFIGS[method](T), backend=backend, **kw)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in shared.prompt_encoder.parameters():
            p.normal_(0, 0.5)
    concat.prompt_encoder.load_state_dict(shared.prompt_encoder.state_dict())
    return shared, concat


def forward_shapes(model):
    """Records the (rows, positions) of every base-model forward: the passes that ran."""
    seen = []

    def hook(module, args, kwargs):
        ref = kwargs.get("input_ids")
        ref = kwargs.get("inputs_embeds") if ref is None else ref
        seen.append(tuple(ref.shape[:2]))
    model.base_model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def loss_grads(model, **kw):
    model.zero_grad(set_to_none=True)
    out = model(**kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.trainable_parameters().items()}


@pytest.mark.parametrize("model_name", ["llama", "gpt2", "gemma"])
@pytest.mark.parametrize("method", ["prompt", "ptuning"])
@pytest.mark.parametrize("T, padding", [(1, "left"), (1, "right"), (2, "left")])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_same_function_as_the_concatenation(model_name, method, T, padding, backend):
    shared, concat = pair(model_name, method, T, backend)
    ids, mask, labels = batch(model_name, batch_size=5, length=9, padding=padding)
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels)
    if T > 1:
        kw["task_ids"] = torch.tensor([1, 0, 1, 1, 0])
    passes = forward_shapes(shared)
    ours, ours_grads = loss_grads(shared, **kw)
    theirs, their_grads = loss_grads(concat, **kw)
    assert passes == [(T, P), (5, 9)]                   # the prompt once per task, then tokens
    assert ours.logits.shape == theirs.logits.shape == (5, P + 9, 97)
    assert_close(ours.logits, theirs.logits, torch.float32)
    assert_close(ours.loss, theirs.loss, torch.float32)
    assert ours_grads.keys() == their_grads.keys()
    for name, grad in their_grads.items():
        assert grad.abs().max() > 0, name                # the check below is not vacuous
        assert_close(ours_grads[name], grad, torch.float32)


def test_prompt_logits_false_keeps_the_loss():
    shared, concat = pair("llama", "prompt", prompt_logits=False)
    ids, mask, labels = batch("llama", batch_size=4, padding="left")
    ours = shared(input_ids=ids, attention_mask=mask, labels=labels)
    theirs = concat(input_ids=ids, attention_mask=mask, labels=labels)
    assert ours.logits.shape == (4, 7, 97)
    assert_close(ours.logits, theirs.logits, torch.float32)
    # The first label is still predicted from the last prompt position.
    assert_close(ours.loss, theirs.loss, torch.float32)


def test_same_gradients_under_activation_checkpointing():
    shared, concat = pair("llama", "ptuning", T=2)
    for model in (shared, concat):
        model.train()
        model.gradient_checkpointing_enable()
    ids, mask, labels = batch("llama", batch_size=4, padding="left")
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels,
              task_ids=torch.tensor([0, 1, 1, 0]))
    ours, ours_grads = loss_grads(shared, **kw)
    theirs, their_grads = loss_grads(concat, **kw)
    assert_close(ours.loss, theirs.loss, torch.float32)
    for name, grad in their_grads.items():
        assert_close(ours_grads[name], grad, torch.float32)


@pytest.mark.parametrize("case", ["tasks_not_fewer_than_rows", "hidden_states", "use_cache",
                                  "dropout_in_training", "shared_prompt_off"])
def test_concatenation_where_the_pass_does_not_apply(case):
    """One forward of (B, P + L) positions, and the concatenation's result."""
    T, kw, train = 1, {}, False
    build = tiny_llama
    if case == "tasks_not_fewer_than_rows":
        T = 3
    elif case == "hidden_states":
        kw["output_hidden_states"] = True
    elif case == "use_cache":
        kw["use_cache"] = True
    elif case == "dropout_in_training":
        build, train = (lambda s: tiny_gpt2(s, attn_pdrop=0.1)), True
    model = pf.wrap(build(0), CONFIGS["prompt"](T), backend="reference",
                    shared_prompt=case != "shared_prompt_off")
    model.train(train)
    ids, mask, _ = batch("llama", batch_size=3, padding="left")
    if T > 1:
        kw["task_ids"] = torch.tensor([2, 0, 1])
    passes = forward_shapes(model)
    out = model(input_ids=ids, attention_mask=mask, **kw)
    assert passes == [(3, P + 7)]
    assert out.logits.shape == (3, P + 7, 97)
    if case == "hidden_states":
        assert out.hidden_states[-1].shape[1] == P + 7
    if case == "use_cache":
        assert out.past_key_values.get_seq_length() == P + 7


def test_no_pass_on_models_it_cannot_share():
    """Encoders (the prompt sees the tokens) never get it; their attention is left alone."""
    from models import tiny_bert
    model = pf.wrap(tiny_bert(0), CONFIGS["prompt"](1))
    assert not model.uses_own_attention
    assert model.base_model.config._attn_implementation == "eager"


@pytest.mark.parametrize("mode", [dict(), dict(num_beams=3),
                                  dict(do_sample=True, top_k=5, num_return_sequences=2)],
                         ids=["greedy", "beam", "sample"])
@pytest.mark.parametrize("T", [1, 2])
def test_generation_same_tokens_as_the_concatenation(mode, T):
    # shared_prompt=True: generate() from the shared prompt on CPU too ("auto" does on CUDA).
    shared, concat = pair("llama", "prompt", T, shared_prompt=True)
    passes = forward_shapes(shared)
    ids, mask, _ = batch("llama", batch_size=3, padding="left")
    kw = dict(dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, pad_token_id=0,
                   do_sample=False), **mode)
    if T > 1:
        kw["task_ids"] = torch.tensor([1, 0, 1])
    torch.manual_seed(11)
    ours = shared.generate(**kw)
    torch.manual_seed(11)
    theirs = concat.generate(**kw)
    assert torch.equal(ours, theirs), f"{ours}\n{theirs}"
    assert passes[0] == (T, P) and passes[1][1] == 7      # the prompt pass, then the tokens


def test_auto_generates_from_the_concatenation_on_cpu():
    """On CPU "auto" generates from the concatenation, with the base model's own attention
    (as under PEFT) meanwhile; ours is back afterwards, and a forward of the wrapper
    inside that generate() (a logits processor) concatenates too."""
    model, concat = pair("llama", "prompt")
    passes = forward_shapes(model)
    ids, mask, _ = batch("llama", batch_size=3)
    seen = []

    def processor(input_ids, scores):
        seen.append(model.base_model.config._attn_implementation)
        full = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
        torch.testing.assert_close(full[:, -1], scores)
        return scores
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2,
              pad_token_id=0)
    ours = model.generate(**kw, logits_processor=[processor])
    assert passes[0] == (3, 7) and (1, P) not in passes     # no prompt pass
    own = model._base_state.attn                   # what the base model was built with
    assert own != "ptuning_fast" and seen == [own, own]
    assert model.base_model.config._attn_implementation == "ptuning_fast"
    assert torch.equal(ours, concat.generate(**kw))
    passes.clear()
    model(input_ids=ids, attention_mask=mask, labels=ids)
    assert passes == [(1, P), tuple(ids.shape)]              # the shared pass again


def test_shared_prompt_argument_is_checked():
    with pytest.raises(ValueError, match="`shared_prompt` must be True, False or 'auto'"):
        pf.wrap(tiny_llama(0), CONFIGS["prompt"](1), shared_prompt="yes")
