"""`ptuning-fast bench` on CPU times the providers of one model case in alternation: the grouping,
the round-robin order, and what happens when one provider cannot run."""
import torch

from ptuning_fast.benchmarks import command, models, timing
from ptuning_fast.benchmarks.case import Case, Prepared, Unavailable

CPU = torch.device("cpu")


def _model_case(provider, method="prompt_tuning", prepare=None):
    return Case("train_step", "step", provider, "fp32", B=2, Lq=8, P=4, method=method,
                prepare=prepare)


def test_model_providers_are_grouped_on_cpu_only():
    cases = [_model_case("ptuning_fast"), _model_case("peft"),
             _model_case("ptuning_fast", "p_tuning"), _model_case("peft", "p_tuning"),
             Case("decode", "fwd", "torch", "fp32", B=1),
             Case("decode", "fwd", "naive", "fp32", B=1)]
    groups = command.measurement_groups(cases, CPU)
    assert [[c.provider for c in g] for g in groups] == [
        ["ptuning_fast", "peft"], ["ptuning_fast", "peft"], ["torch"], ["naive"]]
    assert [g[0].method for g in groups[:2]] == ["prompt_tuning", "p_tuning"]
    assert all(len(g) == 1 for g in command.measurement_groups(cases, torch.device("cuda")))


def test_rounds_alternate_and_rotate():
    log = []
    steps = [lambda name=name: log.append(name) for name in "abc"]
    medians = timing.interleaved_cpu_medians_ms(steps, quick=True)
    assert len(medians) == 3 and all(m >= 0 for m in medians)
    warmup, rounds = log[:3], log[3:]
    assert warmup == list("abc") and len(rounds) % 3 == 0 and len(rounds) >= 9
    firsts = [rounds[i] for i in range(0, len(rounds), 3)]
    assert firsts[:3] == list("abc")                      # each provider leads a round in turn
    for i in range(0, len(rounds), 3):
        assert sorted(rounds[i:i + 3]) == list("abc")      # every provider once per round


def test_a_provider_that_cannot_run_is_skipped_and_the_others_measured():
    def works(case, device):
        return Prepared(step=lambda: None, tokens=16)

    def missing(case, device):
        raise Unavailable("peft is not installed")
    group = [_model_case("ptuning_fast", prepare=works), _model_case("peft", prepare=missing)]
    (ours, ours_failed), (theirs, theirs_failed) = command.run_interleaved(group, CPU, quick=True)
    assert not ours_failed and ours["skipped"] is None and ours["tokens_per_s"] > 0
    assert not theirs_failed and theirs["skipped"] == "peft is not installed"


def test_cpu_model_is_an_eight_layer_llama_and_every_method_is_measured():
    assert models.SMALL_LLAMA["num_hidden_layers"] == 8
    for op in ("train_step", "generate"):
        cases = command.build_cases([op], [], CPU, quick=True)
        methods = {c.method for c in cases}
        assert {"prefix_tuning", "p_tuning", "prompt_tuning"} <= methods
        extra = {"peft_algorithm"} if op == "generate" else set()
        assert {c.provider for c in cases} == {"ptuning_fast", "peft"} | extra


def test_peft_algorithm_generates_our_tokens(monkeypatch):
    """The generation baseline computes PEFT's function: greedy tokens equal ours, for a prompt
    that changes them; with transformers' own attention (SDPA), never ptuning_fast's."""
    from ptuning_fast.integrations import attention
    calls = []
    forward = attention.prefix_attention_forward
    monkeypatch.setattr(attention, "prefix_attention_forward",
                        lambda *a, **k: calls.append(1) or forward(*a, **k))
    monkeypatch.setattr(models, "SMALL_LLAMA", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=256))
    ids = torch.randint(0, 256, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    for method in ("prefix_tuning", "p_tuning", "prompt_tuning"):
        base = models.build_base_model(CPU, torch.float32)
        plain = base.generate(input_ids=ids, attention_mask=mask, **kw)
        ours = models.wrap(base, "ptuning_fast", method, 4).eval()
        with torch.no_grad():
            for p in ours.prompt_encoder.parameters():
                p.normal_(std=3.0)
            tokens = ours.generate(input_ids=ids, attention_mask=mask, **kw)
            ours_calls = len(calls)
            theirs = models.peft_algorithm_generate(ours, ids, mask, **kw)
        assert torch.equal(tokens, theirs), method
        assert (ours_calls > 0) == ours.uses_own_attention and len(calls) == ours_calls, method
        assert base.config._attn_implementation == ("ptuning_fast" if ours.uses_own_attention
                                                   else "sdpa"), method
        assert not torch.equal(tokens, plain), method      # the prompt mattered


def test_bench_command_measures_model_providers_together(tmp_path, monkeypatch, capsys):
    """`ptuning-fast bench --ops generate` end to end on a tiny Llama: one progress line pair
    per method (its providers interleaved), a record per provider, the CPU targets judged."""
    import json
    monkeypatch.setattr(models, "SMALL_LLAMA", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=256))
    out = tmp_path / "run.json"
    assert command.main(["--quick", "--out", str(out), "--ops", "generate"]) == 0
    records = json.loads(out.read_text())["records"]
    assert [(r["method"], r["provider"]) for r in records] == [
        (m, p) for m in ("prefix_tuning", "p_tuning", "prompt_tuning")
        for p in ("ptuning_fast", "peft", "peft_algorithm")]
    assert all(r["skipped"] is None and r["tokens_per_s"] > 0 for r in records)
    err = capsys.readouterr().err
    starts = [line for line in err.splitlines() if line.startswith("[") and line.endswith("...")]
    assert len(starts) == 3 and all("interleaved" in line for line in starts)
    assert "generate (p_tuning) tokens/s vs peft_algorithm" in out.with_suffix(".md").read_text()


def test_static_cache_provider_generates_our_tokens(monkeypatch):
    """The full CPU run adds `ptuning_fast_static` for prefix tuning (not --quick: compiling
    takes ~30 s on a CPU): our generate() with a static cache and transformers' compiled
    decoding step, here traced with Dynamo's "eager" backend. The same tokens as ours."""
    from transformers import CompileConfig
    monkeypatch.setattr(models, "SMALL_LLAMA", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=256))
    quick = command.build_cases(["generate"], [], CPU, quick=True)
    full = command.build_cases(["generate"], [], CPU, quick=False)
    assert models.STATIC not in {c.provider for c in quick}
    assert {c.method for c in full if c.provider == models.STATIC} == {"prefix_tuning"}

    def eager_config(device):
        config = CompileConfig(backend="eager")
        config._compile_all_devices = True
        return config
    monkeypatch.setattr(models, "_compile_config", eager_config)
    case = next(c for c in full if c.provider == models.STATIC)
    ours = next(c for c in full if c.provider == "ptuning_fast" and c.method == case.method
                and c.P == case.P)
    torch._dynamo.reset()
    try:
        tokens = [c.prepare(c, CPU).step() for c in (case, ours)]   # same weights, same prompts
    finally:
        torch._dynamo.reset()
    assert torch.equal(*tokens)
