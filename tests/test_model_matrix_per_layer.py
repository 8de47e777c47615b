"""Models whose layers differ in KV heads or head dim (a tiny Gemma 4: sliding layers with 2 kv
heads of dim 8, a full-attention layer with 1 or 2 kv heads of dim 16).

By default the prefix is PEFT's: one shape, the widest layer's, sliced for each layer; it equals
PEFT itself and checkpoints load both ways. Where a layer does not fit that shape (PEFT skips it)
wrap refuses by name. `per_layer_shapes=True` gives each layer a prefix of its own shape (no PEFT
function: the reference is the unwrapped model with each layer's prefix in its KV cache)."""
import copy
import warnings

import pytest
import torch

import ptuning_fast as pf
from conftest import assert_close
from models import MaterializedPrompt, peft_name, peft_twin
from test_integration_peft import assert_same_gradients_and_step

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
if not hasattr(transformers, "Gemma4TextConfig"):
    pytest.skip(f"transformers {transformers.__version__} has no Gemma 4", allow_module_level=True)


def tiny_gemma4(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, global_head_dim=16,
               num_global_key_value_heads=1, attention_k_eq_v=True,
               layer_types=["sliding_attention", "full_attention"], sliding_window=64,
               max_position_embeddings=128, vocab_size_per_layer_input=97,
               hidden_size_per_layer_input=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               attn_implementation="eager")
    cfg.update(overrides)
    return transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(**cfg)).eval()


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :4] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, ids.masked_fill(mask == 0, -100)


def own(**kwargs):
    """A prefix config giving each layer a prefix of its own shape."""
    return pf.PrefixTuningConfig(3, per_layer_shapes=True, **kwargs)


def wrapped(config, **overrides):
    model = pf.wrap(tiny_gemma4(**overrides), config)
    with torch.no_grad():
        model.prompt_encoder.embedding.weight.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("projection", [False, True], ids=["prefix", "prefix_proj"])
def test_each_layer_gets_a_prefix_of_its_own_shape(projection):
    model = wrapped(own(projection=projection, encoder_hidden_size=12))
    layers = model.base_model.model.layers
    want = [(a.self_attn.k_proj.out_features // a.self_attn.head_dim, a.self_attn.head_dim)
            for a in layers]
    assert model.dims.layer_kv_shapes == tuple(want) == ((2, 8), (1, 16))
    prefixes = model.prompt_encoder()
    for i, (heads, dim) in enumerate(want):
        k, v = prefixes.layer(i)
        assert k.shape == v.shape == (heads, 3, dim)
    assert model.prompt_encoder.output_for_checkpoint().shape == (3, 2 * 2 * 8 + 2 * 1 * 16)


@pytest.mark.parametrize("projection", [False, True], ids=["prefix", "prefix_proj"])
def test_training_step_matches_the_materialized_prefix(projection):
    ours = wrapped(own(projection=projection, encoder_hidden_size=12))
    other = MaterializedPrompt(ours)
    ours.train(), other.train()
    ids, mask, labels = batch()
    a = ours(input_ids=ids, attention_mask=mask, labels=labels)
    b = other(ids, mask, labels)
    assert_close(a.logits, b.logits, torch.float32, name="logits")
    assert_close(a.loss, b.loss, torch.float32, name="loss")
    a.loss.backward(), b.loss.backward()
    theirs = other.trainable_parameters()
    for name, p in ours.trainable_parameters().items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert_close(p.grad, theirs[name].grad, torch.float32, "grad", name=name)


@pytest.mark.parametrize("mode", [dict(), dict(num_beams=2)], ids=["greedy", "beam"])
def test_generation_matches_the_materialized_prefix(mode):
    ours = wrapped(own())
    ids, mask, _ = batch()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
              pad_token_id=0, **mode)
    assert torch.equal(ours.generate(**kw), MaterializedPrompt(ours).generate(**kw))


def test_mixed_tasks_and_checkpoint_round_trip(tmp_path):
    ours = wrapped(own(num_tasks=2))
    ids, mask, _ = batch()
    tasks = torch.tensor([1, 0, 1])
    with torch.no_grad():
        together = ours(input_ids=ids, attention_mask=mask, task_ids=tasks).logits
        for row in range(3):
            alone = ours(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1],
                         task_ids=tasks[row:row + 1]).logits
            assert_close(together[row:row + 1], alone, torch.float32, name=f"row {row}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # num_tasks > 1 and per-layer shapes: PEFT can't
        ours.save_pretrained(tmp_path)
    loaded = pf.PTuningModel.from_pretrained(tiny_gemma4(), tmp_path)
    with torch.no_grad():
        again = loaded(input_ids=ids, attention_mask=mask, task_ids=tasks).logits
    assert_close(again, together, torch.float32, name="loaded")


def test_saving_says_peft_cannot_load_per_layer_prefixes(tmp_path):
    with pytest.warns(UserWarning, match="each layer's own shape.*PEFT"):
        wrapped(own()).save_pretrained(tmp_path)


def test_kv_shared_layers_are_refused():
    base = tiny_gemma4(num_hidden_layers=3, num_kv_shared_layers=1,
                       layer_types=["sliding_attention", "full_attention", "full_attention"])
    with pytest.raises(NotImplementedError, match="Gemma4ForCausalLM.*num_kv_shared_layers"):
        pf.wrap(base, pf.PrefixTuningConfig(3))


def test_per_layer_prefixes_run_on_the_kernels():
    """Head dims 8 and 16 in one model, through the Triton kernels (the interpreter without a
    GPU): the reference backend's logits and prefix gradient."""
    config = own()
    ref, tri = wrapped(config), pf.wrap(tiny_gemma4(), config, backend="triton")
    tri.prompt_encoder.load_state_dict(ref.prompt_encoder.state_dict())
    ids, mask, labels = batch()
    grads = []
    for model in (ref, tri):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads.append((out.logits, model.prompt_encoder.embedding.weight.grad))
    assert_close(grads[1][0], grads[0][0], torch.float32, name="logits")
    assert_close(grads[1][1], grads[0][1], torch.float32, "grad", name="prefix grad")


# Full-attention layers with 2 kv heads of dim 16: PEFT's prefix (2 heads of 16) fits every layer.
FITS = dict(num_global_key_value_heads=2)


def test_default_prefix_is_pefts_and_equals_peft(tmp_path):
    """PEFT sizes the prefix by the widest layer (2 kv heads of 16) and slices it for the
    sliding layers (2 of 8): ours equals PEFT's forward, loss, gradients and optimizer step."""
    base = tiny_gemma4(**FITS)
    ours = pf.wrap(copy.deepcopy(base), pf.PrefixTuningConfig(3))
    with torch.no_grad():
        ours.prompt_encoder.embedding.weight.normal_(0, 0.5)
    assert (ours.dims.num_kv_heads, ours.dims.head_dim) == (2, 16)
    assert ours.prompt_encoder.embedding.weight.shape == (3, 2 * 2 * 2 * 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # PEFT's deprecation warnings
        twin = peft_twin(ours, base)
        ids, mask, labels = batch()
        ours.train(), twin.train()
        a = ours(input_ids=ids, attention_mask=mask, labels=labels)
        b = twin(input_ids=ids, attention_mask=mask, labels=labels)
    assert_close(a.logits, b.logits, torch.float32, name="logits")
    assert_close(a.loss, b.loss, torch.float32, name="loss")
    a.loss.backward(), b.loss.backward()
    assert_same_gradients_and_step(ours, twin, peft_name)


def test_pefts_gemma4_checkpoint_loads_both_ways(tmp_path):
    import peft
    base = tiny_gemma4(**FITS)
    ids, mask, _ = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=3))
        with torch.no_grad():
            theirs.prompt_encoder["default"].embedding.weight.normal_(0, 0.5)
            want = theirs(input_ids=ids, attention_mask=mask).logits
        theirs.save_pretrained(tmp_path / "peft")
        loaded = pf.PTuningModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
        with torch.no_grad():
            assert_close(loaded(input_ids=ids, attention_mask=mask).logits, want,
                         torch.float32, name="ours from PEFT's checkpoint")
        loaded.save_pretrained(tmp_path / "ours")
        again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
        with torch.no_grad():
            assert_close(again(input_ids=ids, attention_mask=mask).logits, want,
                         torch.float32, name="PEFT from our checkpoint")


def test_layers_pefts_prefix_cannot_fit_are_refused_by_name():
    """1 kv head on the full layer: PEFT's prefix (1 head of 16) cannot be sliced for the
    sliding layers' 2 heads, and PEFT skips them."""
    with pytest.raises(NotImplementedError, match=r"Gemma4ForCausalLM.*layers \[0\].*"
                                                  r"per_layer_shapes=True"):
        pf.wrap(tiny_gemma4(), pf.PrefixTuningConfig(3))
