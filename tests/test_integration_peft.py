"""Same function as PEFT: with the same weights, the wrapped model gives PEFT's logits, loss,
gradients and optimizer step, on left- and right-padded batches, for every method and model.

Each case builds two identical copies of a tiny random model, wraps one with ptuning_fast and
the other with PEFT, and copies our soft-prompt weights into PEFT's encoder."""
import pytest
import torch

import ptuning_fast as pf
from conftest import assert_close
from models import (MaterializedPrompt, batch, peft_generation_broken, peft_name,
                    peft_refusal_reason, peft_refuses, wrapped_and_twin)

pytest.importorskip("peft")

CONFIGS = {
    "prefix": pf.PrefixTuningConfig(3),
    "prefix_proj": pf.PrefixTuningConfig(4, prefix_projection=True, encoder_hidden_size=24),
    "prompt": pf.PromptTuningConfig(3),
    "ptuning_mlp": pf.PTuningConfig(3, encoder_hidden_size=20),
    "ptuning_lstm": pf.PTuningConfig(2, encoder_reparameterization_type="lstm",
                                     encoder_hidden_size=8),
}


def cases():
    """Every model x method x padding with the reference backend; a few tiny triton cases
    (the interpreter is slow)."""
    out = []
    for model_name in ("llama", "qwen2", "bert", "roberta"):
        for method in CONFIGS:
            for padding in ("right", "left"):
                out.append(pytest.param(model_name, method, padding, "reference",
                                        id=f"{model_name}-{method}-{padding}-reference"))
    for method in ("prefix", "prompt", "ptuning_mlp"):
        for model_name in ("llama", "bert") + (("qwen2",) if method == "prefix" else ()):
            out.append(pytest.param(model_name, method, "left", "triton",
                                    id=f"{model_name}-{method}-left-triton"))
    return out


def assert_same_training_step(ours, other, model_name, padding, other_name=lambda name: name):
    """Logits, loss, gradients and one AdamW step of `ours` equal `other`'s; `other_name` maps
    our trainable parameter names to other's."""
    ours.train(), other.train()
    ids, mask, labels = batch(model_name, padding=padding)

    out, ref = ours(input_ids=ids, attention_mask=mask, labels=labels), \
        other(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == ref.logits.shape          # PEFT's shape, prompt positions too
    assert_close(out.logits, ref.logits, torch.float32, "fwd", name="logits")
    assert_close(out.loss, ref.loss, torch.float32, "fwd", name="loss")

    out.loss.backward(), ref.loss.backward()
    assert_same_gradients_and_step(ours, other, other_name)


def assert_same_gradients_and_step(ours, other, other_name=lambda name: name):
    """After both backward passes: the same trainable parameters, gradients (none on frozen
    ones) and parameters after one AdamW step."""
    theirs = dict(other.named_parameters())
    mine = ours.trainable_parameters()
    assert {other_name(n) for n in mine} == {n for n, p in theirs.items() if p.requires_grad}
    for name, p in mine.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
        assert_close(p.grad, theirs[other_name(name)].grad, torch.float32, "grad", name=name)
    frozen_with_grad = [n for n, p in ours.named_parameters() if not p.requires_grad
                        and p.grad is not None]
    assert not frozen_with_grad

    opt_a = torch.optim.AdamW(list(mine.values()), lr=1e-2)
    opt_b = torch.optim.AdamW([theirs[other_name(n)] for n in mine], lr=1e-2)
    opt_a.step(), opt_b.step()
    with torch.no_grad():
        for name, p in mine.items():
            assert_close(p, theirs[other_name(name)], torch.float32, "grad", name=name)


@pytest.mark.parametrize("model_name, method, padding, backend", cases())
def test_forward_backward_and_step_match_peft(model_name, method, padding, backend):
    ours, twin = wrapped_and_twin(model_name, CONFIGS[method], backend=backend)
    try:
        assert_same_training_step(ours, twin, model_name, padding, peft_name)
    except ValueError as error:
        if not peft_refuses(error):
            raise
        pytest.skip(peft_refusal_reason(twin, error))
    with torch.no_grad():
        assert_close(ours.prompt_encoder.output_for_checkpoint(),
                     twin.get_prompt_embedding_to_save("default"), torch.float32, "grad",
                     name="saved prompt_embeddings after one step")


def reference_cases():
    """Prefix tuning on every model; on BERT / RoBERTa the check that remains where PEFT refuses
    them."""
    out = [pytest.param(m, k, padding, "reference", id=f"{m}-{k}-{padding}-reference")
           for m in ("llama", "qwen2", "bert", "roberta") for k in ("prefix", "prefix_proj")
           for padding in ("right", "left")]
    out.append(pytest.param("bert", "prefix", "left", "triton", id="bert-prefix-left-triton"))
    return out


@pytest.mark.parametrize("model_name, method, padding, backend", reference_cases())
def test_forward_backward_and_step_match_materialized_prefix(model_name, method, padding,
                                                              backend):
    """The same training step as the unwrapped model given the prefix in its KV cache."""
    ours, _ = wrapped_and_twin(model_name, CONFIGS[method], backend=backend)
    assert_same_training_step(ours, MaterializedPrompt(ours), model_name, padding)


@pytest.mark.parametrize("model_name", ["llama", "bert"])
def test_prompt_changes_the_output(model_name):
    """Guards the equivalence tests: the soft prompt must actually influence the logits."""
    ours, _ = wrapped_and_twin(model_name, CONFIGS["prefix"])
    ids, mask, _ = batch(model_name)
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask).logits
        ours.prompt_encoder.embedding.weight.mul_(2.0)
        b = ours(input_ids=ids, attention_mask=mask).logits
    assert (a - b).abs().max() > 1e-3


def test_bf16_model_matches_peft():
    """A bf16 base: prefixes are cast to the model dtype once, as PEFT does."""
    ours, twin = wrapped_and_twin("llama", CONFIGS["prefix"])
    ours.base_model.to(torch.bfloat16), twin.base_model.to(torch.bfloat16)
    ids, mask, labels = batch("llama", padding="left")
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask).logits
        b = twin(input_ids=ids, attention_mask=mask).logits
    assert a.dtype == b.dtype == torch.bfloat16
    assert_close(a.float(), b.float(), torch.bfloat16, "fwd", name="bf16 logits")


def test_inputs_embeds_and_position_ids_like_peft():
    ours, twin = wrapped_and_twin("llama", CONFIGS["prefix"])
    ids, mask, _ = batch("llama", padding="left")
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    embeds = ours.base_model.get_input_embeddings()(ids)
    with torch.no_grad():
        a = ours(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits
        b = twin(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits
    assert_close(a, b, torch.float32, "fwd", name="logits with inputs_embeds + position_ids")


@pytest.mark.parametrize("kind", ["prefix", "prefix_default_width", "ptuning", "prompt"])
def test_wrap_accepts_peft_configs(kind):
    """pf.wrap(model, <PEFT config>) builds the same modules PEFT builds from that config
    (prefix_default_width: PEFT sizes the projection by the GQA prefix width, 1 x 8 on Qwen2)."""
    import copy

    import peft
    from models import tiny_llama, tiny_qwen2
    make = {
        "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                  prefix_projection=True, encoder_hidden_size=12),
        "prefix_default_width": lambda: peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True),
        "ptuning": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                    encoder_reparameterization_type="LSTM"),
        "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    }[kind]
    base = tiny_qwen2(0) if kind == "prefix_default_width" else tiny_llama(0)
    twin = peft.get_peft_model(copy.deepcopy(base), make())
    ours = pf.wrap(base, make())
    theirs = twin.prompt_encoder["default"].state_dict()
    assert {k: v.shape for k, v in ours.prompt_encoder.state_dict().items()} == \
        {k: v.shape for k, v in theirs.items()}
    ours.prompt_encoder.load_state_dict(theirs)
    ids, mask, labels = batch("llama", padding="left")
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask, labels=labels)
        b = twin(input_ids=ids, attention_mask=mask, labels=labels)
    assert_close(a.logits, b.logits, torch.float32, name="logits")


@pytest.mark.parametrize("arch", ["mistral", "gemma", "qwen3"])
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_more_architectures_match_peft(arch, method):
    """Logits and loss on Mistral / Gemma / Qwen3 equal PEFT's."""
    import copy

    from models import peft_twin, tiny_causal
    base = tiny_causal(arch)
    ours = pf.wrap(copy.deepcopy(base), CONFIGS[method])
    twin = peft_twin(ours, base)
    ids, mask, labels = batch("llama", padding="left")
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask, labels=labels)
        b = twin(input_ids=ids, attention_mask=mask, labels=labels)
    assert_close(a.logits, b.logits, torch.float32, name="logits")
    assert_close(a.loss, b.loss, torch.float32, name="loss")


@pytest.mark.parametrize("against", ["reference", "peft"])
@pytest.mark.parametrize("arch", ["mistral", "gemma", "qwen3"])
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_more_architectures_generate_like(arch, method, against):
    """Greedy tokens on Mistral / Gemma / Qwen3 equal those of the unwrapped model with the
    prompt/prefix materialized in its KV cache, and PEFT's."""
    import copy

    from models import peft_twin, tiny_causal
    base = tiny_causal(arch)
    ours = pf.wrap(copy.deepcopy(base), CONFIGS[method])
    ids, mask, _ = batch("llama", padding="left")
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
              pad_token_id=0)
    tokens, reference = ours.generate(**kw), MaterializedPrompt(ours).generate(**kw)
    if against == "reference":
        assert torch.equal(tokens, reference)
        return
    twin = peft_twin(ours, base)
    theirs = twin.generate(**kw)
    if not torch.equal(tokens, theirs) and not torch.equal(theirs, reference):
        pytest.skip(peft_generation_broken(twin))
    assert torch.equal(tokens, theirs)


def test_prompt_logits_false_drops_prompt_positions():
    from models import tiny_llama
    full = pf.wrap(tiny_llama(0), CONFIGS["prompt"])
    short = pf.wrap(tiny_llama(0), CONFIGS["prompt"], prompt_logits=False)
    short.prompt_encoder.load_state_dict(full.prompt_encoder.state_dict())
    ids, mask, labels = batch("llama")
    with torch.no_grad():
        a = full(input_ids=ids, attention_mask=mask, labels=labels)
        b = short(input_ids=ids, attention_mask=mask, labels=labels)
    assert b.logits.shape == ids.shape + (a.logits.shape[-1],)
    assert_close(b.logits, a.logits[:, 3:], torch.float32, name="logits")
    assert_close(b.loss, a.loss, torch.float32, name="loss")
