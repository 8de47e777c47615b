"""Beyond PEFT: reading a trained prompt through its nearest vocabulary tokens, and prompt
ensembling in one batch through task_ids (Lester et al. 2021)."""
import pytest
import torch

import ptuning_fast as pf
from conftest import assert_close
from models import VOCAB, batch, tiny_bert, tiny_llama


def _random_prompts(model):
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 1)
    return model


@pytest.mark.parametrize("num_tasks", [1, 2])
def test_nearest_tokens_finds_planted_vocabulary_rows(num_tasks):
    """Prompt rows that are scaled vocabulary rows have those tokens nearest, similarity 1."""
    model = pf.wrap(tiny_llama(0), pf.PromptTuningConfig(num_virtual_tokens=5,
                                                         num_tasks=num_tasks))
    vocab = model.base_model.get_input_embeddings().weight
    planted = torch.randint(3, VOCAB, (num_tasks * 5,))
    with torch.no_grad():
        model.prompt_encoder.embedding.weight.copy_(vocab[planted] * 2.5)
    found = model.nearest_tokens(k=3)
    shape = (5, 3) if num_tasks == 1 else (num_tasks, 5, 3)
    assert found.ids.shape == found.similarity.shape == shape and found.tokens is None
    torch.testing.assert_close(found.ids[..., 0].reshape(-1), planted)
    torch.testing.assert_close(found.similarity[..., 0], torch.ones(shape[:-1]))
    assert (found.similarity[..., :-1] >= found.similarity[..., 1:]).all()   # best first


def test_nearest_tokens_equal_brute_force_cosine_for_p_tuning():
    """P-Tuning reads the encoder's output; the answer equals a per-token cosine search."""
    model = _random_prompts(pf.wrap(tiny_llama(0), pf.PTuningConfig(
        num_virtual_tokens=4, encoder_hidden_size=12, encoder_dropout=0.0)))
    found = model.nearest_tokens(k=4)
    vocab = model.base_model.get_input_embeddings().weight
    with torch.no_grad():
        prompt = model.prompt_encoder()
    for i in range(4):
        cos = torch.nn.functional.cosine_similarity(prompt[i][None], vocab, dim=-1)
        best = cos.topk(4)
        torch.testing.assert_close(found.similarity[i], best.values)
        assert found.ids[i].tolist() == best.indices.tolist()


def test_nearest_tokens_strings_with_a_tokenizer():
    class Tokenizer:
        def convert_ids_to_tokens(self, ids):
            return [f"tok{i}" for i in ids]

    model = _random_prompts(pf.wrap(tiny_llama(0), pf.PromptTuningConfig(num_virtual_tokens=2,
                                                                         num_tasks=2)))
    found = model.nearest_tokens(k=2, tokenizer=Tokenizer())
    assert found.tokens == [[[f"tok{i}" for i in row] for row in task]
                            for task in found.ids.tolist()]


@pytest.mark.parametrize("k", [0, VOCAB + 1, 2.0, True])
def test_nearest_tokens_bad_k(k):
    model = pf.wrap(tiny_llama(0), pf.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="`k` must be an int"):
        model.nearest_tokens(k=k)


def test_nearest_tokens_refused_for_prefix_tuning():
    model = pf.wrap(tiny_llama(0), pf.PrefixTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="prefix tuning"):
        model.nearest_tokens()


ENSEMBLE_CASES = {
    "prompt-llama": (tiny_llama, "llama", lambda T: pf.PromptTuningConfig(3, num_tasks=T)),
    "prefix-llama": (tiny_llama, "llama", lambda T: pf.PrefixTuningConfig(
        3, num_tasks=T, prefix_projection=True, encoder_hidden_size=10)),
    "ptuning-bert": (tiny_bert, "bert", lambda T: pf.PTuningConfig(
        2, num_tasks=T, encoder_hidden_size=8)),
}


@pytest.mark.parametrize("prompts", [None, [2, 0]], ids=["all", "subset"])
@pytest.mark.parametrize("case", list(ENSEMBLE_CASES))
def test_ensemble_equals_each_prompt_run_separately(case, prompts):
    build, name, make = ENSEMBLE_CASES[case]
    model = _random_prompts(pf.wrap(build(0), make(3), backend="reference"))
    ids, mask, _ = batch(name, padding="left" if name == "llama" else "right")
    with torch.no_grad():
        out = model.ensemble(ids, mask, task_ids=prompts)
        chosen = [0, 1, 2] if prompts is None else prompts
        each = [model(input_ids=ids, attention_mask=mask,
                      task_ids=torch.full((ids.shape[0],), t)).logits for t in chosen]
    stacked = torch.stack(each, dim=1)                     # (B, E, ..., V)
    assert_close(out.logits, stacked, torch.float32, name="per-prompt logits")
    mean_probs = torch.stack([e.float().softmax(-1) for e in each]).mean(0)
    assert_close(out.log_probs.exp(), mean_probs, torch.float32, name="averaged probabilities")
    votes = torch.stack([e.argmax(-1) for e in each], dim=1).mode(dim=1).values
    assert torch.equal(out.votes, votes)
    # the prompts differ, so the ensemble is not any single prompt
    assert (stacked[:, 0] - stacked[:, 1]).abs().max() > 1e-4


def test_ensemble_needs_several_prompts_and_no_labels():
    single = pf.wrap(tiny_llama(0), pf.PromptTuningConfig(3))
    ids, mask, labels = batch("llama")
    with pytest.raises(ValueError, match="num_tasks=1"):
        single.ensemble(ids, mask)
    multi = pf.wrap(tiny_llama(0), pf.PromptTuningConfig(3, num_tasks=2))
    with pytest.raises(ValueError, match="labels"):
        multi.ensemble(ids, mask, labels=labels)
    with pytest.raises(ValueError, match="task_ids"):
        multi.ensemble(ids, mask, task_ids=[[0, 1]])
    with pytest.raises(ValueError, match="task_ids"):           # out of range: the model's check
        multi.ensemble(ids, mask, task_ids=[0, 5])
