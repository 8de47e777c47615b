"""Every model type with a causal-LM, sequence-classification, token-classification or
seq2seq-LM head in the installed transformers computes PEFT's function under `wrap` (fast where
verified, PEFT's own way elsewhere) or is refused by name: never a silent difference.
docs/model_zoo.md records each row (tests/model_zoo.py)."""
import copy
import os

import pytest

from model_zoo import (HEADS, check, check_type, documented_rows, markdown_row, model_types,
                       summary)

CASES = [(head, t) for head in HEADS for t in model_types(head)]


@pytest.fixture(scope="module")
def documented():
    return documented_rows()


@pytest.mark.parametrize("head, model_type", CASES, ids=[f"{h}-{t}" for h, t in CASES])
def test_computes_pefts_function_or_is_refused(head, model_type, documented, one_torch_thread):
    outcomes = check_type(model_type, head)
    failures = {m: o for m, o in outcomes.items() if o[0] not in ("equal", "refused",
                                                                  "no function", "unbuildable")}
    assert not failures, failures
    assert documented.get((head, model_type)) == markdown_row(model_type, outcomes), \
        "docs/model_zoo.md is stale: regenerate it with `python -m tests.model_zoo --markdown`"


def test_the_zoo_is_large(documented):
    """At least 100 causal-LM model types built and held to PEFT's function (or refused) by all
    three methods, and at least 50 of each classifier; every type and head of this transformers
    has a row."""
    assert set(documented) == set(CASES)
    built = {head: sum("not built here" not in row for (h, _), row in documented.items()
                       if h == head) for head in HEADS}
    assert built["CAUSAL_LM"] >= 100 and built["SEQ_CLS"] >= 50 and built["TOKEN_CLS"] >= 50 \
        and built["SEQ_2_SEQ_LM"] >= 15, built


def test_readme_counts_are_the_zoos(documented):
    with open(os.path.join(os.path.dirname(__file__), "..", "README.md")) as f:
        assert summary(documented) in f.read(), \
            "README.md's zoo counts are stale: `python -m tests.model_zoo --summary`"


def test_multi_head_latent_attention_is_refused_by_name(one_torch_thread):
    """DeepSeek-V3 (MLA, which the generic builder cannot shrink): prompt methods equal PEFT's
    algorithm; its layers cache one latent head, not the query heads' keys, so a prefix of
    keys and values has no function (PEFT's forward fails: "Sizes of tensors must match"), and
    ours names the model instead of failing inside the op."""
    import transformers
    config = transformers.DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=2,
        num_experts_per_tok=1, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, first_k_dense_replace=1,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=128)
    config._attn_implementation = "eager"
    base = transformers.DeepseekV3ForCausalLM(config).eval()
    assert check(copy.deepcopy(base), "prompt")[0] == "equal"
    outcome, detail = check(copy.deepcopy(base), "prefix")
    assert outcome == "refused" and "DeepseekV3ForCausalLM" in detail, (outcome, detail)


def test_linear_and_full_attention_hybrid(one_torch_thread):
    """Qwen3-Next (linear-attention and full-attention layers, which the generic builder cannot
    shrink): prompt methods equal PEFT's algorithm (the prompt concatenated: the shared prompt
    pass would carry the attention layers' keys but not the linear layers' state); prefix
    tuning is refused by name (its cache keeps linear-attention state a prefix cannot give)."""
    import transformers
    config = transformers.Qwen3NextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts=2, num_experts_per_tok=1,
        linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=16,
        linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"],
        pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=128)
    config._attn_implementation = "eager"
    base = transformers.Qwen3NextForCausalLM(config).eval()
    for method in ("prompt", "ptuning"):
        assert check(copy.deepcopy(base), method)[0] == "equal", method
    outcome, detail = check(copy.deepcopy(base), "prefix")
    assert outcome == "refused" and "Qwen3NextForCausalLM" in detail, (outcome, detail)
