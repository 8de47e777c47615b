"""The benchmark machinery (ptuning_fast.benchmarks): work counts checked by hand, providers that
compute the same function as the reference (so the comparison is honest), the results schema,
and the CLI end to end on a tiny op subset. CPU only, well under a minute."""
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, assert_close

import ptuning_fast as pf
from ptuning_fast import reference
from ptuning_fast.benchmarks import attention as bench_attention
from ptuning_fast.benchmarks import command, flops, models, providers, report, results
from ptuning_fast.benchmarks import terms as bench_terms
from ptuning_fast.benchmarks.case import Case
from ptuning_fast.benchmarks.embedding import naive_prompt_embedding

# Eager FlexAttention on CPU is what the CPU figures time; its advice to compile is expected.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


# --- work counts ---------------------------------------------------------------------------

@pytest.mark.parametrize("Lq, Lk, P, causal, expected", [
    (4, 4, 0, True, 1 + 2 + 3 + 4),            # plain causal triangle
    (4, 4, 2, True, 10 + 4 * 2),               # + every query sees both prefix keys
    (3, 5, 2, False, 3 * 7),                   # no causal mask: everything
    (1, 5, 3, True, 3 + 5),                    # decode: the one query sees the whole cache
    (2, 5, 1, True, (1 + 4) + (1 + 5)),        # bottom-right aligned: query 0 sees keys 0..3
    (5, 3, 0, True, 0 + 0 + 1 + 2 + 3),        # Lq > Lk: the first two queries see nothing
    (5, 3, 2, True, 5 * 2 + 6),
])
def test_visible_pairs_by_hand(Lq, Lk, P, causal, expected):
    assert flops.visible_pairs(Lq, Lk, P, causal) == expected


@pytest.mark.parametrize("Lq, Lk, P, causal", [(7, 7, 3, True), (1, 9, 4, True), (3, 11, 0, True),
                                               (6, 4, 2, True), (5, 8, 5, False)])
def test_visible_pairs_match_the_reference_mask(Lq, Lk, P, causal):
    mask = reference.visible_keys(1, Lq, Lk, P, causal=causal, attention_mask=None, device="cpu")
    assert flops.visible_pairs(Lq, Lk, P, causal) == int(mask.sum())


def test_attention_flops_by_hand():
    # B=2, Hq=3, D=8, Lq=Lk=4, P=2: 18 visible pairs per head, 4 * D FLOPs each.
    fwd = flops.attention_flops(2, 3, 4, 4, 2, 8, True, "fwd")
    assert fwd == 4 * 8 * 2 * 3 * 18
    assert flops.attention_flops(2, 3, 4, 4, 2, 8, True, "fwd_bwd") == fwd * 3.5
    with pytest.raises(ValueError):
        flops.attention_flops(2, 3, 4, 4, 2, 8, True, "bwd")


def test_byte_counts_by_hand():
    # ids 2*3*8, gathered rows 2*3*4*2, prompt 5*4*2 read; (2, 8, 4) bf16 written.
    assert flops.prompt_embedding_bytes(2, 3, 5, 4, 2) == 48 + 48 + 40 + 128
    assert flops.copy_bytes(10, 4) == 80
    # q and out (1*2*3*4 each), k and v (1*1*5*4 each), prefix K/V (1*2*4 each), fp16
    assert flops.attention_fwd_bytes(1, 2, 1, 3, 5, 2, 4, 2) == (48 + 40 + 16) * 2


# --- the providers compute the reference's function -------------------------------------

def _inputs(B, Hq, Hkv, Lq, Lk, P, D, requires_grad=False):
    def randn(*shape):
        return torch.randn(*shape, dtype=torch.float64).requires_grad_(requires_grad)
    return providers.AttnInputs(randn(B, Hq, Lq, D), randn(B, Hkv, Lk, D), randn(B, Hkv, Lk, D),
                                randn(Hkv, P, D), randn(Hkv, P, D))


def _reference(x):
    # upcast: the reference's softmax runs in float64 too (by default it is float32)
    return reference.prefix_attention(x.q, x.k, x.v, x.prefix_k, x.prefix_v, causal=x.causal,
                                      upcast=True)


SHAPES = [(2, 4, 2, 37, 37, 5, 16), (1, 6, 3, 19, 19, 1, 32), (2, 4, 1, 4, 23, 7, 16)]


@pytest.mark.parametrize("provider", ["naive", "cat_sdpa", "flex"])
@pytest.mark.parametrize("shape", SHAPES)
def test_provider_forward_matches_reference(provider, shape):
    x = _inputs(*shape)
    torch.testing.assert_close(providers.setup(provider, x)(), _reference(x))


@pytest.mark.parametrize("provider", ["naive", "cat_sdpa", "flex"])
def test_provider_decode_matches_reference(provider):
    x = _inputs(3, 8, 2, 1, 29, 6, 16)
    torch.testing.assert_close(providers.setup(provider, x, decode=True)(), _reference(x))


@pytest.mark.parametrize("provider", ["naive", "cat_sdpa"])
def test_provider_gradients_match_reference(provider):
    x = _inputs(2, 4, 2, 13, 13, 3, 16, requires_grad=True)
    leaves = (x.q, x.k, x.v, x.prefix_k, x.prefix_v)
    grad_out = torch.randn_like(x.q)
    got = torch.autograd.grad(providers.setup(provider, x)(), leaves, grad_out)
    expected = torch.autograd.grad(_reference(x), leaves, grad_out)
    for name, g, e in zip(("q", "k", "v", "prefix_k", "prefix_v"), got, expected):
        torch.testing.assert_close(g, e, msg=lambda m, name=name: f"d{name}: {m}")


def test_naive_prompt_embedding_matches_reference():
    ids = torch.randint(0, 50, (3, 7))
    weight, prompt = torch.randn(50, 8), torch.randn(4, 8)
    torch.testing.assert_close(naive_prompt_embedding(ids, weight, prompt),
                               reference.prompt_embedding(ids, weight, prompt))


def test_kernel_providers_report_themselves_unavailable_on_cpu():
    cases = command.build_cases(["prefix_attention", "prompt_embedding"], ["fused", "flash_attn"],
                                torch.device("cpu"), quick=True)
    for case in [c for c in cases if c.provider in ("fused", "flash_attn")][:3]:
        record, failed = command.run_case(case, torch.device("cpu"), quick=True)
        assert not failed and record["skipped"], record
        assert record["median_ms"] is None and record["tflops"] is None


# --- model cases, on a tiny Llama ----------------------------------------------------------

@pytest.fixture
def tiny_llama(monkeypatch):
    monkeypatch.setattr(models, "SMALL_LLAMA", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=256))


@pytest.mark.parametrize("op", ["train_step", "generate"])
def test_model_cases_measure_or_say_why(tiny_llama, op):
    cpu = torch.device("cpu")
    for case in command.build_cases([op], providers.PROVIDERS, cpu, quick=True)[:2]:
        record, failed = command.run_case(case, cpu, quick=True)
        assert not failed, record["skipped"]
        if case.provider == "peft":
            assert record["skipped"] is None and record["tokens_per_s"] > 0
        assert set(record) == set(results.RECORD_KEYS)


# --- results schema and the CLI ------------------------------------------------------------

def _check_schema(data):
    assert set(data) == {"device", "torch", "triton", "transformers", "created", "records"}
    assert data["device"].startswith("CPU")
    assert data["records"]
    for rec in data["records"]:
        assert set(rec) == set(results.RECORD_KEYS)
        assert rec["op"] in command.OPS
        if rec["skipped"] is not None:
            assert all(rec[k] is None for k in results.MEASURE_KEYS)
            continue
        assert rec["median_ms"] > 0
        assert rec["peak_mem_mb"] is None            # CPU: no allocator counter, no guess
        if rec["op"] in ("prefix_attention", "decode") and rec["provider"] != "copy":
            assert rec["tflops"] > 0
        if rec["op"] in ("decode", "prompt_embedding"):
            assert rec["gbps"] > 0


def test_cli_quick_writes_json_markdown_and_plots(tmp_path, capsys):
    out = tmp_path / "run.json"
    code = command.main(["--quick", "--out", str(out), "--ops", "decode,prompt_embedding"])
    assert code == 0
    data = json.loads(out.read_text())
    _check_schema(data)
    assert {r["op"] for r in data["records"]} == {"decode", "prompt_embedding"}
    measured = {(r["op"], r["provider"]) for r in data["records"] if r["skipped"] is None}
    assert {("decode", "naive"), ("decode", "cat_sdpa"), ("decode", "copy"),
            ("prompt_embedding", "copy")} <= measured
    md = (tmp_path / "run.md").read_text()
    assert "CPU figures" in md and "## decode" in md and "## prompt_embedding" in md
    assert "torch % of copy" in md and "torch speedup vs naive" in md
    if report.plotting_unavailable() is None:     # matplotlib is optional ([bench] extra)
        for op in ("decode", "prompt_embedding"):
            png = tmp_path / f"run-{op}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"](run-{op}.png)" in md
    printed = capsys.readouterr().out
    assert "Kernel timings need a GPU" in printed

    # Re-rendering from the JSON alone gives the same table.
    (tmp_path / "run.md").unlink()
    assert command.main(["--from-json", str(out)]) == 0
    assert (tmp_path / "run.md").read_text() == md


def test_output_path_defaults_to_bench_results(tmp_path):
    cpu = torch.device("cpu")
    default = command.output_path(None, cpu)
    assert default.parent.as_posix() == "bench/results" and default.name.startswith("cpu-")
    assert command.output_path(tmp_path, cpu).parent == tmp_path
    assert command.output_path(tmp_path / "x.json", cpu) == tmp_path / "x.json"


def test_output_path_never_overwrites_earlier_results(tmp_path, monkeypatch):
    # Run from the repo root on the day of a committed result: a new file, never that one.
    monkeypatch.chdir(tmp_path)
    cpu = torch.device("cpu")
    first = command.output_path(None, cpu)
    first.parent.mkdir(parents=True)
    first.write_text("{}")
    second = command.output_path(None, cpu)
    assert second != first and second.parent == first.parent
    assert second.name == first.stem + "-2.json"
    second.with_suffix(".md").write_text("")            # a markdown table alone counts too
    assert command.output_path(None, cpu).name == first.stem + "-3.json"
    assert command.output_path(Path("mine.json"), cpu) == Path("mine.json")   # as asked


def test_bad_op_is_a_usage_error():
    with pytest.raises(SystemExit):
        command.main(["--ops", "attention"])


def test_case_fields_are_the_record_fields():
    case = Case("decode", "fwd", "naive", "fp32", B=1, Hq=2, Hkv=1, Lq=1, Lk=4, P=2, D=8,
                causal=True)
    assert set(case.fields()) == set(results.CASE_KEYS)


def test_interrupted_run_keeps_what_it_measured(tmp_path, monkeypatch):
    real_run_case = command.run_case
    calls = []

    def run_case_then_time_limit(case, device, quick):
        calls.append(case)
        if len(calls) == 3:
            raise KeyboardInterrupt          # what `timeout -s INT` delivers
        return real_run_case(case, device, quick)
    monkeypatch.setattr(command, "run_case", run_case_then_time_limit)
    out = tmp_path / "cut.json"
    assert command.main(["--quick", "--out", str(out), "--ops", "prompt_embedding,decode"]) == 1
    records = json.loads(out.read_text())["records"]
    assert len(records) == len(command.build_cases(["prompt_embedding", "decode"],
                                                   providers.PROVIDERS, torch.device("cpu"),
                                                   quick=True))
    assert all(r["skipped"] == command.INTERRUPTED for r in records[2:])


def test_from_json_merges_results_of_one_device(tmp_path):
    head = {"device": "CPU: test", "torch": "t", "triton": "t", "transformers": "t",
            "created": "2026-01-01T00:00:00+00:00"}
    case = Case("decode", "fwd", "naive", "fp32", B=1, Hq=2, Hkv=1, Lq=1, Lk=4, P=2, D=8,
                causal=True)
    rec = results.skipped_record(case, "for the test")
    results.write(tmp_path / "a.json", head, [rec])
    results.write(tmp_path / "b.json", head, [rec, rec])
    merged = tmp_path / "merged.json"
    assert command.main(["--from-json", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
                         "--out", str(merged)]) == 0
    assert len(json.loads(merged.read_text())["records"]) == 3
    assert (tmp_path / "merged.md").exists()


def test_fused_provider_call_matches_reference_under_the_interpreter():
    """What the `fused` provider times is the library's kernel computing the same function
    (fp32 under TRITON_INTERPRET=1 here; on a GPU the bench runs it natively)."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x64 = _inputs(1, 4, 2, 19, 19, 5, 16)
    x = providers.AttnInputs(*(t.float().to(device) for t in (x64.q, x64.k, x64.v, x64.prefix_k,
                                                               x64.prefix_v)))
    got = providers.fused_attention(x)()
    torch.testing.assert_close(got.double().cpu(), _reference(x64), atol=2e-3 if device == "cuda"
                               else 1e-5, rtol=2e-3 if device == "cuda" else 1e-4)


def test_gpu_grid_is_the_issues_grid_with_flex_last():
    """Built without touching CUDA: the full grid covers bf16/fp16 x D {64, 128} x P {16, 64, 256}
    x Lk {512..8192} x fwd/fwd_bwd for every provider, FlexAttention on its slice, last."""
    cuda = torch.device("cuda")
    cases = command.build_cases(["prefix_attention"], providers.PROVIDERS, cuda, quick=False)
    fused = [c for c in cases if c.provider == "fused"]
    assert len(fused) == 2 * 2 * 3 * 4 * 2
    assert {(c.dtype, c.D, c.P, c.Lk, c.mode) for c in fused} == {
        (dt, D, P, Lk, mode) for dt in ("bf16", "fp16") for D in (64, 128) for P in (16, 64, 256)
        for Lk in (512, 1024, 2048, 8192) for mode in ("fwd", "fwd_bwd")}
    assert all(c.Hq == 4 * c.Hkv and c.Hq * c.D == 2048 and c.B * c.Lk == 16384 for c in fused)
    flex_at = [i for i, c in enumerate(cases) if c.provider == "flex"]
    assert flex_at and flex_at == list(range(len(cases) - len(flex_at), len(cases)))
    models_cases = command.build_cases(["train_step"], providers.PROVIDERS, cuda, quick=False)
    assert {(c.B, c.Lq, c.P, c.dtype) for c in models_cases} == {(8, 512, 64, "bf16"),
                                                                 (2, 4096, 64, "bf16")}
    generate = command.build_cases(["generate"], providers.PROVIDERS, cuda, quick=False)
    assert {(c.method, c.B, c.provider) for c in generate if c.B == 32} == {
        ("prefix_tuning", 32, p)
        for p in ("ptuning_fast", "peft", "peft_algorithm", "ptuning_fast_static")}
    decode = command.build_cases(["decode"], providers.PROVIDERS, cuda, quick=False)

    def shapes(cases):
        return {(c.dtype, c.B, c.Hq, c.Hkv, c.D, c.P, c.Lk) for c in cases}
    assert ("bf16", 8, 32, 8, 128, 64, 4096) in shapes(decode)
    assert shapes(c for c in decode if c.provider == "copy") == shapes(decode)


def test_decode_copy_moves_the_bytes_of_the_step():
    """The decode target's yardstick: a copy of as many bytes as the step reads and writes."""
    case = next(c for c in bench_attention.decode_cases(torch.device("cpu"), True, ["naive"])
                if c.provider == "copy")
    prepared = case.prepare(case, torch.device("cpu"))
    step_bytes = flops.attention_fwd_bytes(case.B, case.Hq, case.Hkv, 1, case.Lk, case.P,
                                           case.D, 4)
    assert prepared.bytes == step_bytes and prepared.flops is None
    out = prepared.step()
    assert out.numel() * 4 * 2 == step_bytes


def _measured(op, mode, provider, ms, **fields):
    case = Case(op, mode, provider, "bf16", **fields)
    rec = dict.fromkeys(results.RECORD_KEYS)
    rec.update(case.fields(), median_ms=ms)
    return rec


def test_targets_table_judges_the_worst_case():
    shape = dict(B=16, Hq=16, Hkv=4, Lq=1024, Lk=1024, D=128, causal=True)
    records = []
    for P, fused_ms in ((16, 1.0), (64, 0.9)):      # cat_sdpa 1.5 ms: 1.50x and 1.67x
        records.append(_measured("prefix_attention", "fwd", "fused", fused_ms, P=P, **shape))
        records.append(_measured("prefix_attention", "fwd", "cat_sdpa", 1.5, P=P, **shape))
    train = dict(B=8, Lq=512, P=64, Hq=32, Hkv=8, D=64, method="prefix_tuning")
    ours = _measured("train_step", "step", "ptuning_fast", 100.0, **train)
    theirs = _measured("train_step", "step", "peft", 120.0, **train)
    ours.update(tokens_per_s=4096 / 0.1, peak_mem_mb=6000.0)
    theirs.update(tokens_per_s=4096 / 0.12, peak_mem_mb=10000.0)
    records += [ours, theirs]
    # decode at Lk = 4096 and 1024: fused moves the step's bytes at 60% / 90% of the copy's
    # rate; naive takes 2.5x / 3x its time. Only Lk >= 4096 counts for the bandwidth share.
    for Lk, share, naive in ((4096, 0.6, 2.5), (1024, 0.9, 3.0)):
        decode = dict(B=8, Hq=32, Hkv=8, Lq=1, Lk=Lk, P=64, D=128, causal=True)
        fused = _measured("decode", "fwd", "fused", 1.0, **decode)
        copy = _measured("decode", "fwd", "copy", 0.5, **decode)
        fused.update(gbps=1000.0 * share)
        copy.update(gbps=1000.0)
        records += [fused, copy, _measured("decode", "fwd", "naive", naive, **decode)]
    for B, ours_tps in ((8, 500.0), (32, 1400.0)):     # vs 1000 tok/s: 1.40x counted at B = 32
        gen = dict(B=B, Lq=128, Lk=192, P=64, Hq=32, Hkv=8, D=64, method="prefix_tuning")
        for provider, tps in (("ptuning_fast", ours_tps), ("peft_algorithm", 1000.0)):
            rec = _measured("generate", "greedy", provider, 1.0, **gen)
            rec.update(tokens_per_s=tps)
            records.append(rec)
    head = {"device": "NVIDIA H100 80GB HBM3", "created": "2026-01-01T00:00:00+00:00",
            "torch": "t", "triton": "t", "transformers": "t"}
    md = report.markdown(head, records)
    assert "## Targets" in md
    verdict = {line.split(" | ")[0].lstrip("| "): line.split(" | ", 1)[1]
               for line in md.splitlines() if line.startswith("| ")}
    assert verdict["prefix attention fwd vs cat_sdpa, Lk <= 1024"] == "2 | 1.50x | >= 1.30x | yes |"
    assert verdict["train step (prefix tuning) tokens/s vs PEFT, L = 512"] == \
        "1 | 1.20x | >= 1.00x | yes |"
    assert verdict["train step (prefix tuning) tokens/s vs PEFT, L = 4096"] == \
        "0 | – | >= 1.30x | no data |"
    assert verdict["train step (prefix tuning) peak memory vs PEFT"] == \
        "1 | 0.60x | <= 0.70x | yes |"
    assert verdict["prefix attention fwd TFLOP/s, Lk = 8192"] == "0 | – | >= 450 TF/s | no data |"
    assert verdict["decode step, share of copy bandwidth, Lk >= 4096"] == \
        "1 | 60% | >= 70% | no |"
    assert verdict["decode step vs naive"] == "2 | 2.50x | >= 2.00x | yes |"
    assert verdict["generate (prefix tuning, B >= 32) tokens/s vs PEFT's algorithm"] == \
        "1 | 1.40x | >= 1.30x | yes |"
    cpu = report.markdown({**head, "device": "CPU: x"}, records)
    assert "## Targets (docs/design.md)" not in cpu and "## Targets without Triton" in cpu
    cpu_verdict = {line.split(" | ")[0].lstrip("| "): line.split(" | ", 1)[1]
                   for line in cpu.splitlines() if line.startswith("| ")}
    assert cpu_verdict["train_step (prefix_tuning) tokens/s vs peft"] == \
        "1 | 1.20x | >= 1.20x | yes |"
    assert cpu_verdict["generate (p_tuning) tokens/s vs peft_algorithm"] == \
        "0 | – | >= 1.20x | no data |"


def test_terms_cases_cover_every_term_and_count_only_visible_pairs():
    cpu = torch.device("cpu")
    cases = bench_terms.terms_cases(cpu, False, ["fused", "naive"])
    assert {c.terms for c in cases} == set(bench_terms.TERM_SETS)
    assert {c.provider for c in cases} == {"fused", "naive"}
    by_terms = {c.terms: c for c in cases if c.provider == "naive" and c.mode == "fwd"}
    work = {t: c.prepare(c, cpu).flops for t, c in by_terms.items()}
    c = by_terms["none"]
    assert work["none"] == flops.attention_flops(c.B, c.Hq, c.Lq, c.Lk, c.P, c.D, True, "fwd")
    assert work["window"] < work["none"] and work["packed"] < work["none"]
    assert work["softcap"] == work["bias"] == work["sinks"] == work["none"]


@pytest.mark.parametrize("terms", bench_terms.TERM_SETS)
def test_terms_case_kwargs_run_the_kernels_as_the_reference(terms):
    """What the terms benchmark passes is accepted and computed alike by both backends (small
    shape, under the interpreter)."""
    case = Case("attention_terms", "fwd", "fused", "fp32", B=2, Hq=4, Hkv=2, Lq=24, Lk=24, P=5,
                D=32, causal=True, terms=terms)
    x = bench_attention._inputs(case, DEVICE, requires_grad=False)
    kwargs = bench_terms.term_kwargs(terms, case, DEVICE)
    got = pf.prefix_attention(x.q, x.k, x.v, x.prefix_k, x.prefix_v, backend="triton", **kwargs)
    want = reference.prefix_attention(x.q, x.k, x.v, x.prefix_k, x.prefix_v, upcast=True,
                                      **kwargs)
    assert_close(got, want, torch.float32)


def test_from_json_refuses_missing_and_foreign_files(tmp_path, capsys):
    assert command.main(["--from-json", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "a.json" in err and "b.json" in err
    (tmp_path / "c.json").write_text("{not json")
    assert command.main(["--from-json", str(tmp_path / "c.json")]) == 2
    assert "not a results file" in capsys.readouterr().err


def _timed(op, provider, ms, **row):
    return {"op": op, "provider": provider, "skipped": None, "median_ms": ms, "tflops": 1.0,
            "tokens_per_s": 1.0, "peak_mem_mb": 10.0 * ms, **row}


def test_speedup_columns_are_ours_against_the_others():
    terms_row = dict(mode="fwd", terms="bias", dtype="fp32", B=1, Hq=2, Hkv=1, D=8, P=2, Lk=16)
    table = report.op_table("attention_terms", [_timed("attention_terms", "torch", 1.0,
                                                       **terms_row),
                                                _timed("attention_terms", "naive", 3.0,
                                                       **terms_row)])
    assert "torch speedup vs naive" in table and "naive speedup vs" not in table
    assert "| 3.00x |" in table
    keys = {k: 1 for k in report.ROW_KEYS["generate"]}
    gen = report.op_table("generate", [_timed("generate", p, ms, **keys) for p, ms in
                                       (("ptuning_fast", 2.0), ("ptuning_fast_static", 1.0),
                                        ("peft", 4.0))])
    header = gen.splitlines()[0]
    assert "ptuning_fast speedup vs peft" in header
    assert "ptuning_fast_static speedup vs peft" in header
    assert "speedup vs ptuning_fast" not in header
    assert "| 2.00x | 4.00x |" in gen
