"""Tile choice: the fixed first candidate wherever nothing is timed, the fastest candidate
(timed once per key) on a GPU. The GPU's timer is replaced by a fake one here."""
import torch

from ptuning_fast.kernels import autotune, tiles
from ptuning_fast.kernels.launch import H100, pretend_target

CUDA = torch.device("cuda")      # a device object only: nothing runs on it


def _recorder():
    calls = []
    return calls, calls.append


def test_interpreter_runs_its_one_config_untimed():
    calls, launch = _recorder()
    cfg = autotune.launch_tuned("fwd", torch.device("cpu"), torch.float32, 64, ("k",), launch,
                                timer=lambda fn: 1 / 0)
    assert calls == [cfg] == [tiles.INTERPRETER["fwd"]]


def test_gpu_times_each_candidate_once_per_key_and_keeps_the_fastest(monkeypatch):
    monkeypatch.setattr(autotune, "enabled", lambda device: True)
    monkeypatch.setattr(autotune, "_BEST", {})
    cands = tiles.candidates("fwd", 90, torch.bfloat16, 128, tma=True)
    assert len(cands) > 1
    timed = []

    def timer(fn):                   # the last candidate is the fastest
        fn()
        timed.append(1)
        return 10.0 - len(timed)

    with pretend_target(H100):
        calls, launch = _recorder()
        cfg = autotune.launch_tuned("fwd", CUDA, torch.bfloat16, 128, ("a",), launch, timer,
                                    tma=True)
        assert cfg == cands[-1] and len(timed) == len(cands)
        assert calls == cands + [cfg]          # each candidate timed, then the real launch
        calls.clear()
        assert autotune.launch_tuned("fwd", CUDA, torch.bfloat16, 128, ("a",), launch,
                                     timer, tma=True) == cfg
        assert calls == [cfg] and len(timed) == len(cands)      # remembered, not re-timed
        autotune.launch_tuned("fwd", CUDA, torch.bfloat16, 128, ("b",), launch, timer, tma=True)
        assert len(timed) == 2 * len(cands)                     # a new key is timed again


def test_fixed_choice_when_tuning_is_off(monkeypatch):
    monkeypatch.setenv("PTUNING_FAST_AUTOTUNE", "0")
    assert not autotune.enabled(CUDA)
    with pretend_target(H100):
        calls, launch = _recorder()
        cfg = autotune.launch_tuned("dq", CUDA, torch.float16, 64, ("k",), launch,
                                    timer=lambda fn: 1 / 0)
    assert calls == [cfg] == [tiles.candidates("dq", 90, torch.float16, 64)[0]]
    with pretend_target(H100):
        assert autotune.fixed_config("dq", CUDA, torch.float16, 64) == cfg


def test_tma_tiles_only_where_the_tensors_allow_them(monkeypatch):
    # Issue 24: on sm_90 the 16-bit D = 128 forward reads K/V through tensor descriptors by
    # default, 128 keys a block; where the strides forbid descriptors (or PTUNING_FAST_TMA=0)
    # the first pointer-load tile is the fixed choice (128 keys by pointers spill).
    monkeypatch.delenv("PTUNING_FAST_TMA", raising=False)
    first = tiles.candidates("fwd", 90, torch.bfloat16, 128, tma=True)[0]
    assert first.tma and first.block_n == 128
    pointers = tiles.candidates("fwd", 90, torch.bfloat16, 128, tma=False)
    assert pointers and not any(c.tma for c in pointers) and pointers[0].block_n == 64
    assert not any(c.tma for c in tiles.candidates("fwd", 80, torch.bfloat16, 128, tma=True))
    monkeypatch.setenv("PTUNING_FAST_TMA", "0")
    assert tiles.candidates("fwd", 90, torch.bfloat16, 128, tma=True) == pointers
    # Attention terms take the pointer tile's terms variant, never a TMA one.
    assert not tiles.candidates("fwd", 90, torch.bfloat16, 128, terms=True, tma=True)[0].tma


def test_every_table_covers_both_archs_dtypes_and_head_blocks():
    for kernel, table in tiles.CANDIDATES.items():
        assert set(table) == {(a, s, d) for a in (80, 90) for s in (True, False)
                              for d in (32, 64, 128, 256)}, kernel
        assert all(table.values()), kernel
    assert tiles.arch_family(86) == 80 and tiles.arch_family(100) == 90


def test_graph_capture_takes_the_tuned_choice_and_times_nothing(monkeypatch):
    # Issue 26: while capturing, the tuner was bypassed and the graph replayed the first
    # candidate, bitwise different from eager calls with the same key.
    monkeypatch.setattr(autotune, "_BEST", {})
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    cands = tiles.candidates("fwd", 90, torch.bfloat16, 128, tma=True)
    assert len(cands) > 1
    timed = []

    def timer(fn):                   # the last candidate is the fastest
        timed.append(1)
        return 10.0 - len(timed)

    calls, launch = _recorder()
    with pretend_target(H100):
        eager = autotune.launch_tuned("fwd", CUDA, torch.bfloat16, 128, ("a",), launch, timer,
                                      tma=True)
        assert eager == cands[-1] != cands[0]
        capturing[0] = True
        calls.clear()
        assert autotune.launch_tuned("fwd", CUDA, torch.bfloat16, 128, ("a",), launch,
                                     timer=lambda fn: 1 / 0, tma=True) == eager
        assert calls == [eager]
        # A key first seen during capture: no timing, and the choice it gets stays its own.
        fresh = autotune.launch_tuned("fwd", CUDA, torch.bfloat16, 128, ("b",), launch,
                                      timer=lambda fn: 1 / 0)
        capturing[0] = False
        assert autotune.launch_tuned("fwd", CUDA, torch.bfloat16, 128, ("b",), launch,
                                     timer=lambda fn: 1 / 0) == fresh
