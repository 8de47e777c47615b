"""PEFT's newest prefix features: a prefix initialized by a prefill of the frozen model on a text
(initialize_kv_prefix_from_text, the Cartridges initialization), CARTRIDGE checkpoints, and
checkpoints of zero-initialized prefixes — each against PEFT itself."""
import copy

import pytest
import torch

import ptuning_fast as pf
from conftest import assert_close
from models import batch, tiny_llama
from test_integration_terms import WINDOW, tiny_terms
from tiny_tokenizer import tiny_tokenizer

peft = pytest.importorskip("peft")

TEXT = "the quick brown fox jumps over a lazy dog"


def _pair(P=4, config=None):
    base = tiny_llama(0)
    twin = peft.get_peft_model(copy.deepcopy(base), config or peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P))
    return pf.wrap(base, pf.PrefixTuningConfig(num_virtual_tokens=P), backend="reference"), twin


def _logits(model):
    ids, mask, _ = batch("llama", padding="left")
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat-template"])
def test_prefix_from_text_same_as_peft(tmp_path, chat):
    tokenizer = tiny_tokenizer(tmp_path, chat_template=chat)
    mine, twin = _pair()
    theirs = peft.initialize_kv_prefix_from_text(twin, tokenizer, text=TEXT)
    ours = pf.initialize_kv_prefix_from_text(mine, tokenizer, text=TEXT)
    assert ours.shape == theirs.shape == (4, 2 * 2 * 2 * 16)
    assert_close(ours, theirs, torch.float32, name="prefix from text")
    torch.testing.assert_close(mine.prompt_encoder.embedding.weight,
                               twin.prompt_encoder["default"].embedding.weight)
    assert_close(_logits(mine), _logits(twin), torch.float32, name="logits")


def test_prefix_from_text_is_the_prefill_cache(tmp_path):
    """Without PEFT: layer l's prefix keys/values are the base model's cached ones for the
    first P tokens of the text (positions 0 .. P - 1), and the wrapped model then gives the
    base model's next-token logits of [text; ids] for the ids placed after P text tokens."""
    tokenizer = tiny_tokenizer(tmp_path)
    base = tiny_llama(0)
    fresh = copy.deepcopy(base)
    mine = pf.wrap(base, pf.PrefixTuningConfig(num_virtual_tokens=5), backend="reference")
    pf.initialize_kv_prefix_from_text(mine, tokenizer, text=TEXT)
    text_ids = tokenizer(TEXT, return_tensors="pt")["input_ids"][:, :5]
    with torch.no_grad():
        out = fresh(input_ids=text_ids, use_cache=True)
        prefixes = mine.prompt_encoder()
    cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
    for layer, (k, v) in enumerate((lay.keys, lay.values) for lay in cache.layers):
        pk, pv = prefixes.layer(layer)
        torch.testing.assert_close(pk, k[0])
        torch.testing.assert_close(pv, v[0])
    ids = torch.randint(3, 97, (1, 6))
    with torch.no_grad():
        full = fresh(input_ids=torch.cat([text_ids, ids], 1)).logits[:, 5:]
        ours = mine(input_ids=ids).logits
    assert_close(ours, full, torch.float32, name="logits after the text")


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
@pytest.mark.parametrize("longer", [False, True], ids=["P<W", "P>=W"])
def test_prefix_from_text_past_the_sliding_window(tmp_path, arch, longer):
    """A text longer than the sliding window (every layer windowed: Mistral; sliding and full
    layers: Gemma 3), with P below and at least the window: the prefix holds the text's first
    P tokens, so the wrapped model continues them as the base model does. (A sliding cache
    keeps only the last W - 1 tokens: the prefix took those, silently, as PEFT's does.)"""
    tokenizer = tiny_tokenizer(tmp_path)
    text_ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    assert text_ids.shape[1] > WINDOW
    P = WINDOW + 2 if longer else WINDOW - 2
    base = tiny_terms(arch)
    fresh = copy.deepcopy(base)
    mine = pf.wrap(base, pf.PrefixTuningConfig(num_virtual_tokens=P), backend="reference")
    pf.initialize_kv_prefix_from_text(mine, tokenizer, text=TEXT)
    ids = torch.randint(3, 97, (1, 6))
    with torch.no_grad():
        full = fresh(input_ids=torch.cat([text_ids[:, :P], ids], 1)).logits[:, P:]
        ours = mine(input_ids=ids).logits
    assert_close(ours, full, torch.float32, name="logits after the text")


def test_prefix_from_a_cache_that_slid_is_refused(tmp_path):
    """A cache whose sliding layers dropped the text's first tokens is refused by name, with
    what it kept and the window, never loaded."""
    tokenizer = tiny_tokenizer(tmp_path)
    text_ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    base = tiny_terms("mistral")
    mine = pf.wrap(copy.deepcopy(base), pf.PrefixTuningConfig(3), backend="reference")
    before = mine.prompt_encoder.embedding.weight.detach().clone()
    with torch.no_grad():
        out = base(input_ids=text_ids, use_cache=True)
    cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
    kept, given = WINDOW - 1, text_ids.shape[1]
    with pytest.raises(ValueError, match=rf"`past_key_values` layer 0 kept the last {kept} of "
                                         rf"the {given} tokens .*sliding window of {WINDOW}"):
        pf.initialize_kv_prefix_from_past_key_values(mine, past_key_values=cache)
    torch.testing.assert_close(mine.prompt_encoder.embedding.weight, before, rtol=0, atol=0)


def test_prefix_from_text_per_task_and_errors(tmp_path):
    tokenizer = tiny_tokenizer(tmp_path)
    multi = pf.wrap(tiny_llama(0), pf.PrefixTuningConfig(num_virtual_tokens=3, num_tasks=2))
    before = multi.prompt_encoder.embedding.weight.detach().clone()
    flat = pf.initialize_kv_prefix_from_text(multi, tokenizer, text=TEXT, task_id=1)
    after = multi.prompt_encoder.embedding.weight
    torch.testing.assert_close(after[:3], before[:3])        # task 0 untouched
    torch.testing.assert_close(after[3:], flat)
    with pytest.raises(ValueError, match="at least num_virtual_tokens=12"):
        pf.initialize_kv_prefix_from_text(
            pf.wrap(tiny_llama(0), pf.PrefixTuningConfig(12)), tokenizer, text="a lazy dog")
    with pytest.raises(ValueError, match="prefix_projection=True"):
        pf.initialize_kv_prefix_from_text(
            pf.wrap(tiny_llama(0), pf.PrefixTuningConfig(3, prefix_projection=True)),
            tokenizer, text=TEXT)
    with pytest.raises(ValueError, match="prompt_tuning"):
        pf.initialize_kv_prefix_from_text(
            pf.wrap(tiny_llama(0), pf.PromptTuningConfig(3)), tokenizer, text=TEXT)
    with pytest.raises(ValueError, match="adapter_name"):
        pf.initialize_kv_prefix_from_text(multi, tokenizer, text=TEXT, adapter_name="other")
    with pytest.raises(ValueError, match="task_id"):
        pf.initialize_kv_prefix_from_text(multi, tokenizer, text=TEXT, task_id=2)


@pytest.mark.parametrize("frozen", [1, 0])
def test_cartridge_checkpoint_loads_with_peft_logits(tmp_path, frozen):
    cfg = peft.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                               num_frozen_tokens=frozen)
    base = tiny_llama(0)
    twin = peft.get_peft_model(copy.deepcopy(base), cfg)
    peft.initialize_kv_prefix_from_text(twin, tiny_tokenizer(tmp_path / "tok"), text=TEXT)
    with torch.no_grad():
        twin.prompt_encoder["default"].trainable_embedding.add_(0.1)     # "trained"
    twin.save_pretrained(tmp_path / "cartridge")
    mine = pf.PTuningModel.from_pretrained(base, tmp_path / "cartridge", backend="reference")
    assert mine.is_prefix and mine.num_virtual_tokens == 4
    assert_close(_logits(mine), _logits(twin), torch.float32, name="cartridge logits")
    if frozen:
        with pytest.raises(NotImplementedError, match="num_frozen_tokens=1"):
            pf.PTuningModel.from_pretrained(tiny_llama(0), tmp_path / "cartridge",
                                            is_trainable=True)
    else:
        trainable = pf.PTuningModel.from_pretrained(tiny_llama(0), tmp_path / "cartridge",
                                                    is_trainable=True)
        assert list(trainable.trainable_parameters()) == ["prompt_encoder.embedding.weight"]


def test_zero_init_prefix_checkpoints_both_ways(tmp_path):
    """PEFT's init_weights="zero" adapters load here, and ours load in PEFT."""
    for projection in (False, True):
        kwargs = dict(task_type="CAUSAL_LM", num_virtual_tokens=3, init_weights="zero",
                      prefix_projection=projection)
        base = tiny_llama(0)
        twin = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(**kwargs))
        mine = pf.wrap(copy.deepcopy(base), pf.PrefixTuningConfig(**kwargs), backend="reference")
        assert mine.prompt_encoder().kv.abs().max() == 0
        with torch.no_grad():                           # one "training step" away from zero
            for p in list(mine.prompt_encoder.parameters()):
                p.add_(torch.randn_like(p) * 0.1)
        ours_dir, peft_dir = tmp_path / f"ours-{projection}", tmp_path / f"peft-{projection}"
        mine.save_pretrained(ours_dir)
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), ours_dir)
        assert_close(_logits(loaded), _logits(mine), torch.float32, name="ours in PEFT")
        twin.save_pretrained(peft_dir)
        back = pf.PTuningModel.from_pretrained(copy.deepcopy(base), peft_dir, backend="reference")
        assert_close(_logits(back), _logits(twin), torch.float32, name="PEFT's here")
