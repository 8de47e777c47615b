"""The decode path (kernels/prefix_attention_decode.py): few queries per row, the keys split across
programs and merged in a fixed order. Against the reference (fp32 through the tolerance table,
fp16 through FlashAttention's rule), the prefill kernel's LSE, every split count, GPU tiles and
the split rule (under the interpreter via `pretend_target`), determinism, the automatic dispatch
(also under torch.compile and during generate), the compile specs and the benchmark case.
"""
import pytest
import torch
from conftest import DEVICE, HAS_CUDA, assert_close, assert_error_within, poison_like
from test_prefix_attention import Case, _LaunchSpy, exact, make_inputs

import ptuning_fast as pf
from ptuning_fast import reference
from ptuning_fast.benchmarks import attention as bench_attention
from ptuning_fast.benchmarks import flops, providers
from ptuning_fast.kernels import attention_specs, launch
from ptuning_fast.kernels import prefix_attention_decode as decode_kernels
from ptuning_fast.kernels import prefix_attention_fwd as fwd_kernels
from ptuning_fast.kernels.attention_options import AttentionSpec


def decode(case, inputs, mask, index, **kwargs):
    """The launcher itself, writing into a NaN-poisoned output: every element must be written."""
    q = inputs[0]
    out = poison_like(torch.empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=q.dtype,
                                  device=DEVICE)).transpose(1, 2)
    spec = AttentionSpec(attention_mask=mask, prefix_index=index, causal=case.causal)
    got, lse = decode_kernels.prefix_attention_decode(*inputs, spec, out=out, **kwargs)
    assert got is out
    return got, lse


def check_against_reference(case, dtype, against_prefill=True, **kwargs):
    inputs, mask, index = make_inputs(case, dtype, requires_grad=False)
    got, lse = decode(case, inputs, mask, index, **kwargs)
    want = exact(*inputs, causal=case.causal, attention_mask=mask, prefix_index=index)
    assert got.shape == want.shape and got.dtype == dtype
    if dtype == torch.float32:
        assert_close(got, want, dtype)
    else:
        low = reference.prefix_attention(*inputs, causal=case.causal, attention_mask=mask,
                                         prefix_index=index)
        assert_error_within(got, low, want)
    if not against_prefill:
        return
    # Same LSE as the prefill kernel (base 2, scaled-score units, +inf where no key is seen).
    spec = AttentionSpec(attention_mask=mask, prefix_index=index, causal=case.causal)
    _, prefill_lse = fwd_kernels.prefix_attention_fwd(*inputs, spec)
    assert torch.equal(torch.isinf(lse), torch.isinf(prefill_lse))
    finite = torch.isfinite(prefill_lse)
    torch.testing.assert_close(lse[finite], prefill_lse[finite], atol=1e-3, rtol=1e-4)


CASES = [
    Case(2, 4, 1, 1, 53, 32, 5, "shared", "right"),            # decode step, MQA, odd lengths
    Case(3, 8, 2, 1, 37, 64, 37, "task", "left"),              # GQA 4:1, mixed tasks, left pad
    Case(2, 16, 2, 2, 45, 16, 3, "row", "random"),             # GQA 8:1, Lq = 2
    Case(2, 2, 2, 5, 29, 80, 0, "none", "left", layout="blhd"),  # GQA 1:1, D = 80, P = 0
    Case(2, 8, 1, 5, 33, 32, 70, "shared", "none"),            # MQA 8:1, 40 rows: 2 row blocks
    Case(2, 4, 1, 1, 1, 16, 0, "none"),                        # one key
    Case(1, 4, 2, 1, 1, 16, 9, "task"),                        # P > Lk
    Case(2, 4, 2, 2, 7, 16, 40, "row", "right", False),        # P > Lk, not causal
    Case(2, 4, 2, 5, 2, 16, 0, "none"),                        # Lq > Lk: early rows see nothing
    Case(2, 4, 2, 1, 30, 16, 0, "shared", "empty_row"),        # a row with no key: zeros
    Case(1, 4, 2, 2, 0, 32, 6, "shared"),                      # prefix only (Lk = 0)
    Case(2, 4, 4, 5, 48, 128, 32, "shared", "left", layout="d_strided"),  # block multiples
    Case(1, 4, 1, 1, 2049, 16, 17, "shared", "left"),          # long cache, small heads
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case, dtype):
    check_against_reference(case, dtype)


# Speculative decoding (Lq 1..16) at GQA 1:1, 4:1 and 8:1: packed rows from 1 to 128, so both
# tiles (keys-major up to 8 rows, row-major beyond, 2 row blocks past 32 rows under the
# interpreter), every prefix kind, causal and not, odd lengths; fp32 and fp16 taking turns.
SPECULATIVE = [
    (Case(2, 2, 2, 1, 41, 32, 7, "row", "left"), True),
    (Case(1, 3, 3, 3, 19, 24, 0, "none", "random", False), True),
    (Case(2, 4, 4, 8, 27, 32, 13, "task", "right"), True),
    (Case(1, 2, 2, 16, 35, 16, 5, "shared", "none"), False),
    (Case(2, 8, 2, 1, 23, 40, 9, "shared", "random"), True),
    (Case(2, 4, 1, 2, 31, 32, 3, "row", "left", False), True),
    (Case(1, 8, 2, 3, 17, 32, 0, "none", "right"), False),
    (Case(2, 4, 1, 5, 29, 24, 11, "task", "none"), False),
    (Case(1, 8, 1, 1, 43, 32, 6, "task", "left"), True),
    (Case(2, 16, 2, 2, 21, 16, 4, "shared", "random", False), False),
    (Case(1, 8, 1, 16, 37, 32, 3, "row", "right"), False),
]


@pytest.mark.parametrize("i, case, keys_major", [(i, c, k) for i, (c, k) in enumerate(SPECULATIVE)],
                         ids=[str(c) for c, _ in SPECULATIVE])
def test_speculative_lengths_and_gqa_ratios(i, case, keys_major):
    plan = decode_kernels.decode_plan(case.B, case.Hq, case.Hkv, case.Lq, case.Lk, case.P,
                                      case.D, torch.float32, None)
    assert plan.keys_major == keys_major and plan.rows == case.Hq // case.Hkv * case.Lq
    check_against_reference(case, torch.float32 if i % 2 == 0 else torch.float16)


@pytest.mark.parametrize("num_splits", [1, 2, 5, 1000])
def test_every_split_count_gives_the_same_function(num_splits):
    # 1: the split kernel writes the output itself (no merge); 1000: capped at one block each.
    case = Case(2, 8, 2, 2, 75, 32, 21, "task", "random")
    check_against_reference(case, torch.float32, num_splits=num_splits)


def test_split_rows_without_any_visible_key():
    # Every split but the last sees only padding: merged partials with m = -inf, l = 0.
    case = Case(2, 4, 2, 1, 64, 16, 0, "none", "none")
    inputs, _, _ = make_inputs(case, torch.float32, requires_grad=False)
    mask = torch.zeros(2, 64, dtype=torch.bool, device=DEVICE)
    mask[:, -3:] = True
    mask[1] = False                                           # row 1: nothing at all
    got, lse = decode(case, inputs, mask, None, num_splits=4)
    assert_close(got, exact(*inputs, attention_mask=mask), torch.float32)
    assert torch.equal(got[1], torch.zeros_like(got[1])) and torch.isinf(lse[1]).all()


@pytest.mark.parametrize("option, value, shown", [
    ("bias", lambda: torch.zeros(1, 1, 1, 11), "spec.bias=Tensor(shape=(1, 1, 1, 11), "),
    ("sinks", lambda: torch.zeros(4), "spec.sinks=Tensor(shape=(4,), dtype=torch.float32)"),
    ("segments", lambda: (torch.zeros(2, 9, dtype=torch.int32),) * 2,
     "spec.segments=(Tensor(shape=(2, 9), dtype=torch.int32), Tensor("),
    ("window_size", (4, 0), "spec.window_size=(4, 0)"),
    ("softcap", 30.0, "spec.softcap=30.0"),
    ("dropout_p", 0.1, "spec.dropout_p=0.1"),
])
def test_refuses_attention_terms_and_dropout(option, value, shown):
    # The decode kernel computes none of them: a spec with one is refused by name, never run
    # without it (the fused path sends such calls to the prefill kernel).
    case = Case(2, 4, 2, 1, 9, 16, 2, "shared", "left")
    inputs, mask, _ = make_inputs(case, torch.float32, requires_grad=False)
    value = value() if callable(value) else value
    spec = AttentionSpec(attention_mask=mask, **{option: value})
    with pytest.raises(ValueError, match="prefix_attention_decode") as err:
        decode_kernels.prefix_attention_decode(*inputs, spec)
    assert shown in str(err.value)
    assert "computes attention_mask, prefix_index, causal, scale only" in str(err.value)
    assert not decode_kernels.unsupported_options(AttentionSpec(attention_mask=mask))


def test_accepts_options_without_effect():
    # prefix_in_window qualifies a window and dropout_seed a dropout_p: alone they change
    # nothing, so the decode kernel runs them (as the prefill kernel does).
    case = Case(2, 4, 2, 1, 9, 16, 2, "shared", "left")
    inputs, mask, _ = make_inputs(case, torch.float32, requires_grad=False)
    seed = torch.tensor(7, dtype=torch.int64, device=DEVICE)
    spec = AttentionSpec(attention_mask=mask, prefix_in_window=False, dropout_seed=seed)
    got, _ = decode_kernels.prefix_attention_decode(*inputs, spec)
    assert_close(got, exact(*inputs, attention_mask=mask), torch.float32)


def test_bitwise_deterministic():
    case = Case(2, 8, 2, 5, 61, 32, 19, "shared", "random")
    inputs, mask, index = make_inputs(case, torch.float16, requires_grad=False)
    first, lse = decode(case, inputs, mask, index)
    second, lse2 = decode(case, inputs, mask, index)
    assert torch.equal(first, second) and torch.equal(lse, lse2)


@pytest.mark.skipif(HAS_CUDA, reason="interpreter check of the GPU tiles; the GPU runs them")
@pytest.mark.parametrize("target", [launch.H100, launch.A100], ids=["H100", "A100"])
@pytest.mark.parametrize("dtype, case", [
    (torch.float16, Case(1, 8, 2, 1, 1030, 64, 64, "shared", "left")),   # GQA 4:1, BLOCK_N 128
    (torch.float32, Case(1, 4, 1, 2, 300, 128, 33, "task", "right")),     # fp32 tile
    (torch.float16, Case(1, 16, 1, 5, 1000, 32, 7, "row", "none")),      # 80 rows: 2 row blocks
], ids=["fp16-D64", "fp32-D128", "fp16-80rows"])
def test_gpu_tiles_and_split_rule_under_interpreter(target, dtype, case):
    # GPU tiles (BLOCK_N up to 128, BLOCK_M up to 64) and the SM-count split rule, run here.
    with launch.pretend_target(target):
        plan = decode_kernels.decode_plan(case.B, case.Hq, case.Hkv, case.Lq, case.Lk, case.P,
                                          case.D, dtype, target)
        assert plan.num_splits > 1
        check_against_reference(case, dtype)


@pytest.mark.skipif(HAS_CUDA, reason="interpreter run of the GPU tiles; the GPU runs them")
def test_32k_cache_with_gpu_tiles():
    # (The prefill kernel's LSE is left out: its interpreter tiles take ~25 s at this length.)
    with launch.pretend_target(launch.H100):
        check_against_reference(Case(1, 2, 1, 1, 32768, 16, 64, "shared", "left"),
                                 torch.float16, against_prefill=False)


def test_plan_at_the_issue_shape():
    """B = 8, Hq = 32, Hkv = 8, Lk = 4096, D = 128, bf16, on 132 SMs: >= 2 waves of programs,
    each split a run of whole key blocks, the K/V cache read once per kv head; the GQA group in
    the keys-major tile's 8 query columns (the MMA's smallest N), 4 of them used."""
    H100 = launch.H100
    for P in (0, 64):
        plan = decode_kernels.decode_plan(8, 32, 8, 1, 4096, P, 128, torch.bfloat16, H100)
        assert plan.programs >= 2 * H100.sm_count
        assert plan.keys_major and plan.block_m == 8 and plan.row_blocks == 1
        assert plan.row_use == 4 / 8
        assert plan.blocks_per_split >= decode_kernels.MIN_BLOCKS_PER_SPLIT
        assert plan.num_splits * plan.blocks_per_split >= plan.key_blocks
        assert (plan.num_splits - 1) * plan.blocks_per_split < plan.key_blocks   # none empty
    # GQA 8:1, or 2 draft tokens at 4:1: the keys-major tile is full.
    for Hkv, Lq in ((4, 1), (8, 2)):
        plan = decode_kernels.decode_plan(8, 32, Hkv, Lq, 4096, 64, 128, torch.bfloat16, H100)
        assert plan.keys_major and plan.row_use == 1.0 and plan.programs >= 2 * H100.sm_count
    # Speculative decoding, 4 draft tokens: the 16-row tile is full.
    plan = decode_kernels.decode_plan(8, 32, 8, 4, 4096, 64, 128, torch.bfloat16, H100)
    assert not plan.keys_major and plan.block_m == 16
    assert plan.row_use == 1.0 and plan.programs >= 2 * H100.sm_count
    # One query head per kv head, one token: 1 of the 8 columns.
    plan = decode_kernels.decode_plan(8, 32, 32, 1, 4096, 0, 128, torch.bfloat16, H100)
    assert plan.keys_major and plan.row_use == 1 / 8
    # Many rows already fill the GPU: no split, no merge.
    plan = decode_kernels.decode_plan(64, 32, 8, 1, 256, 0, 128, torch.bfloat16, H100)
    assert plan.num_splits == 1
    # Under the interpreter: a few splits, so that the tests exercise the merge.
    plan = decode_kernels.decode_plan(8, 32, 8, 1, 4096, 64, 128, torch.float16, None)
    assert 1 < plan.num_splits <= launch.INTERPRETER_SPLITS


def _spies(monkeypatch):
    spies = {"decode": _LaunchSpy(decode_kernels._decode_split_kernel),
             "merge": _LaunchSpy(decode_kernels._decode_merge_kernel),
             "prefill": _LaunchSpy(fwd_kernels._prefix_attention_fwd_kernel)}
    monkeypatch.setattr(decode_kernels, "_decode_split_kernel", spies["decode"])
    monkeypatch.setattr(decode_kernels, "_decode_merge_kernel", spies["merge"])
    monkeypatch.setattr(fwd_kernels, "_prefix_attention_fwd_kernel", spies["prefill"])
    return spies


@pytest.mark.parametrize("how, path", [
    ("no_grad", "decode"), ("no_input_requires_grad", "decode"), ("inference_mode", "decode"),
    ("requires_grad", "prefill"), ("dropout", "prefill"), ("long_query", "prefill"),
])
def test_dispatch(monkeypatch, how, path):
    Lq = decode_kernels.MAX_QUERIES + 1 if how == "long_query" else 3
    case = Case(2, 4, 2, Lq, 40, 32, 5, "shared", "right")
    inputs, mask, _ = make_inputs(case, torch.float32, requires_grad=how == "requires_grad")
    spies = _spies(monkeypatch)
    kwargs = dict(attention_mask=mask, backend="triton")
    if how == "dropout":
        kwargs.update(dropout_p=0.1, dropout_seed=3)
    if how == "no_grad":
        with torch.no_grad():
            got = pf.prefix_attention(*inputs, **kwargs)
    elif how == "inference_mode":
        with torch.inference_mode():
            got = pf.prefix_attention(*inputs, **kwargs)
    else:
        got = pf.prefix_attention(*inputs, **kwargs)
    assert (spies["decode"].launches, spies["prefill"].launches) == \
        ((1, 0) if path == "decode" else (0, 1))
    if how != "dropout":
        assert_close(got, exact(*inputs, attention_mask=mask), torch.float32)


def test_torch_compile_fullgraph_takes_the_decode_path(monkeypatch):
    case = Case(2, 8, 2, 1, 33, 32, 5, "task", "left")
    inputs, mask, index = make_inputs(case, torch.float32, requires_grad=False)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(q, k, v, pk, pv, mask, index):
        out = pf.prefix_attention(q, k, v, pk, pv, attention_mask=mask, prefix_index=index,
                                  backend="triton")
        return out.transpose(1, 2).reshape(2, 1, -1)

    spies = _spies(monkeypatch)
    with torch.no_grad():
        compiled = step(*inputs, mask, index)
        eager = pf.prefix_attention(*inputs, attention_mask=mask, prefix_index=index,
                                    backend="triton").transpose(1, 2).reshape(2, 1, -1)
    assert torch.equal(compiled, eager)
    assert spies["decode"].launches == 2 and spies["prefill"].launches == 0


def test_eager_decoding_launches_without_the_custom_op(monkeypatch):
    """Eager on plain tensors, the decode launcher runs without the custom op's dispatch (~10 us
    of host time a call, which a decoding loop pays per layer); a traced call goes through
    the op (the test above)."""
    from ptuning_fast.fused import prefix_attention as fused_attention
    calls = []
    real = fused_attention.prefix_attention_decode_op
    monkeypatch.setattr(fused_attention, "prefix_attention_decode_op",
                        lambda *a: calls.append(1) or real(*a))
    case = Case(2, 8, 2, 1, 33, 32, 5, "task", "left")
    inputs, mask, index = make_inputs(case, torch.float32, requires_grad=False)
    spies = _spies(monkeypatch)
    got = pf.prefix_attention(*inputs, attention_mask=mask, prefix_index=index, backend="triton")
    assert calls == [] and spies["decode"].launches == 1
    assert_close(got, exact(*inputs, attention_mask=mask, prefix_index=index), torch.float32)


GENERATE_MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=20, temperature=1.3),
    "beam": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "mixed_tasks": dict(do_sample=False, num_beams=2),
}


@pytest.mark.parametrize("mode", list(GENERATE_MODES))
def test_generate_uses_the_decode_path(monkeypatch, mode):
    from models import batch, tiny_llama
    tasks = 3 if mode == "mixed_tasks" else 1
    model = pf.wrap(tiny_llama(0), pf.PrefixTuningConfig(3, num_tasks=tasks), backend="triton")
    ids, mask, _ = batch("llama", padding="left")
    kw = dict(GENERATE_MODES[mode], attention_mask=mask, max_new_tokens=5, pad_token_id=0)
    if tasks > 1:
        kw["task_ids"] = torch.tensor([2, 0, 1])
    spies = _spies(monkeypatch)
    torch.manual_seed(0)
    ours = model.generate(input_ids=ids, **kw)
    # Prompt (Lq = 7) and every new token: no gradient, few queries.
    assert spies["decode"].launches >= 2 * 5 and spies["prefill"].launches == 0
    assert spies["merge"].launches > 0
    model.backend = "reference"
    torch.manual_seed(0)
    assert torch.equal(ours, model.generate(input_ids=ids, **kw))


def test_compile_specs_cover_every_gpu_tile():
    specs = list(decode_kernels.compile_specs())
    split = {(s.constexprs["BLOCK_D"], s.constexprs["KEYS_MAJOR"], s.constexprs["BLOCK_M"],
              s.constexprs["BLOCK_N"], s.num_warps, s.num_stages, "fp32" not in s.name)
             for s in specs if s.fn is decode_kernels._decode_split_kernel}
    for (sixteen_bit, block_d), tile in decode_kernels.GPU_DECODE.items():
        for keys_major, block_m in ((True, decode_kernels.KEYS_MAJOR_ROWS),
                                    (False, decode_kernels.MIN_ROWS), (False, tile.max_rows)):
            assert (block_d, keys_major, block_m, tile.block_n, tile.warps(block_m),
                    tile.num_stages, sixteen_bit) in split
    flags = {(s.constexprs["IS_CAUSAL"], s.constexprs["HAS_MASK"], s.constexprs["IS_SPLIT"])
             for s in specs if s.fn is decode_kernels._decode_split_kernel}
    assert {f[:2] for f in flags} == set(attention_specs.FLAG_COMBOS)
    assert {f[2] for f in flags} == {True, False}
    merged = {(s.constexprs["BLOCK_D"], s.name.split("[")[1].split(",")[0])
              for s in specs if s.fn is decode_kernels._decode_merge_kernel}
    assert merged == {(d, e) for d in (32, 64, 128, 256) for e in ("fp16", "bf16", "fp32")}


def test_benchmark_decode_case():
    """The GPU grid holds the issue's shape for every provider (flash_attn's kvcache function
    among them); GB/s counts the K/V cache, the prefix, q and the output once; the fused decode
    call computes the reference's function."""
    cases = bench_attention.decode_cases(torch.device("cuda"), False, providers.PROVIDERS)
    issue = [c for c in cases if (c.B, c.Hq, c.Hkv, c.Lk, c.D, c.Lq) == (8, 32, 8, 4096, 128, 1)]
    assert {c.provider for c in issue} >= {"fused", "naive", "cat_sdpa", "flash_attn"}
    quick = bench_attention.decode_cases(torch.device("cuda"), True, ["fused"])
    assert any((c.B, c.Hq, c.Hkv, c.Lk, c.D) == (8, 32, 8, 4096, 128) for c in quick)
    kv, prefix, q_out = 2 * 8 * 8 * 4096 * 128, 2 * 8 * 64 * 128, 2 * 8 * 32 * 128
    assert flops.attention_fwd_bytes(8, 32, 8, 1, 4096, 64, 128, 2) == 2 * (kv + prefix + q_out)
    x = providers.AttnInputs(torch.randn(3, 8, 1, 16, device=DEVICE),
                             *(torch.randn(3, 2, 29, 16, device=DEVICE) for _ in range(2)),
                             *(torch.randn(2, 6, 16, device=DEVICE) for _ in range(2)))
    with torch.no_grad():
        got = providers.fused_attention(x)()
    assert_close(got, exact(x.q, x.k, x.v, x.prefix_k, x.prefix_v), torch.float32)
